"""Marked reference layers of our own kernels that live outside the model folders.

`GroupDequantize` computes exactly `QuantizedTensor.dequantize` (`hf_efficient/cache/quantization.py`) as a module
marked `@use_kernel_forward_from_hub("GroupDequantize")`, so `kernelize` can swap in the `group-dequantize`
kernel. (H-Net's `HNetEMAScan` is the reference layer of `ema-scan`; it lives in the H-Net folder, which is remote
code.)
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache.quantization import QuantizedTensor

try:
    from kernels import use_kernel_forward_from_hub
except ImportError:  # `kernels` is optional: without it the layer keeps its PyTorch forward

    def use_kernel_forward_from_hub(layer_name: str):
        return lambda cls: cls


__all__ = ["GroupDequantize"]


@use_kernel_forward_from_hub("GroupDequantize")
class GroupDequantize(nn.Module):
    """Reconstructs a group-wise quantized tensor from its parts (`QuantizedTensor.dequantize`, as a module).

    Example:

    ```python
    q = quantize(x, bits=4, group_size=32, dim=-2)
    x_hat = GroupDequantize()(q.packed, q.scale, q.minimum, q.shape, q.bits, q.dim, q.dtype)  # == q.dequantize()
    ```
    """

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
        """
        Args:
            packed (`torch.Tensor` of shape `(B, N / (8 // bits))`, `uint8`): packed codes.
            scale (`torch.Tensor` of shape `(..., n_groups, 1)`): step of each group.
            minimum (`torch.Tensor` of shape `(..., n_groups, 1)`): minimum of each group.
            shape (`tuple[int, ...]`): shape of the original tensor.
            bits (`int`): 2, 4 or 8.
            dim (`int`): the grouped axis (negative).
            dtype (`torch.dtype`): dtype of the result.

        Returns:
            `torch.Tensor` of `shape` and `dtype`.
        """
        return QuantizedTensor(packed, scale, minimum, torch.Size(shape), bits, dim, dtype).dequantize()
