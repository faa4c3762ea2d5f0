"""The dequantization itself (`dequantize`); `layers.GroupDequantize` wraps it for `kernels.kernelize`."""

from __future__ import annotations

import torch

__all__ = ["dequantize"]


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """`(B, N / per_byte)` packed bytes -> `(B, N / per_byte, per_byte)` float32 codes, lowest bits first.

    Each code slot is written straight into the float buffer (`(byte >> shift) & mask`, converted on the copy): no
    broadcast over a trailing axis of 2 or 4 bytes, no intermediate `uint8` tensor of the full size.
    """
    per_byte, mask = 8 // bits, 2**bits - 1
    codes = torch.empty(*packed.shape, per_byte, dtype=torch.float32, device=packed.device)  # (B, N / pb, pb)
    for slot in range(per_byte):
        shifted = packed >> (slot * bits) if slot else packed
        codes[..., slot] = shifted & mask if slot < per_byte - 1 else shifted  # the top slot needs no mask
    return codes


def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    shape: tuple[int, ...],
    bits: int,
    dim: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reconstructs a group-wise quantized tensor.

    Args:
        packed (`torch.Tensor` of shape `(B, N / (8 // bits))`, `uint8`): codes, `8 // bits` per byte, lowest bits
            first, in the order of the tensor with the grouped axis moved last.
        scale (`torch.Tensor` of shape `(..., n_groups, 1)`): step of each group.
        minimum (`torch.Tensor` of shape `(..., n_groups, 1)`): minimum of each group.
        shape (`tuple[int, ...]`): shape of the original tensor, e.g. `(B, H_kv, L, D)`.
        bits (`int`): 2, 4 or 8.
        dim (`int`): the grouped axis (negative).
        dtype (`torch.dtype`): dtype of the result.

    Returns:
        `torch.Tensor` of `shape` and `dtype`.
    """
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits} is not supported; use 2, 4 or 8")
    moved = [*shape]
    moved.append(moved.pop(dim))  # the grouped axis last: (..., G_total)
    n_groups = scale.shape[-2]
    codes = packed.float() if bits == 8 else unpack_codes(packed, bits)  # (B, N) or (B, N / per_byte, per_byte)
    grouped = codes.reshape(*moved[:-1], n_groups, moved[-1] // n_groups)  # (..., n_groups, group_size)
    values = grouped.mul_(scale.float()).add_(minimum.float())  # the reference's `codes * scale + minimum`
    return values.reshape(moved).movedim(-1, dim).to(dtype)
