"""Layers for `kernels.kernelize`: stateless modules whose `forward` replaces that of a layer marked with
`@use_kernel_forward_from_hub("EMAScan")` (H-Net's `HNetEMAScan`)."""

from __future__ import annotations

import torch
from torch import nn

from .scan import ema_scan

__all__ = ["EMAScan"]


class EMAScan(nn.Module):
    """`h_t = a_t * h_{t-1} + b_t` along axis 1: `forward(a (B, L, C|1), b (B, L, C), h0 (B, C) | None)`."""

    has_backward = True  # the autograd path is the reference algorithm
    can_torch_compile = False  # not validated under `torch.compile`

    def forward(self, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        return ema_scan(a, b, h0)
