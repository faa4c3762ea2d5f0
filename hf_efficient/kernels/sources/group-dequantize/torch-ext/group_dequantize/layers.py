"""Layers for `kernels.kernelize`: stateless modules whose `forward` replaces that of a layer marked with
`@use_kernel_forward_from_hub("GroupDequantize")` (`hf_efficient.kernels.GroupDequantize`)."""

from __future__ import annotations

import torch
from torch import nn

from .dequantize import dequantize

__all__ = ["GroupDequantize"]


class GroupDequantize(nn.Module):
    """`code * scale + minimum` per group, reshaped and cast back: see `dequantize`."""

    has_backward = False  # codes are integers: nothing to differentiate
    can_torch_compile = False  # not validated under `torch.compile`

    def forward(
        self,
        packed: torch.Tensor,
        scale: torch.Tensor,
        minimum: torch.Tensor,
        shape: tuple[int, ...],
        bits: int,
        dim: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        return dequantize(packed, scale, minimum, shape, bits, dim, dtype)
