"""Group-wise asymmetric uniform quantisation with real bit packing, shared by `GEARCache` and `KIVICache`.

A tensor is split into groups of `group_size` consecutive elements along one axis; each group stores its
minimum and step (`scale = (max - min) / (2**bits - 1)`) and every element an integer code in
`[0, 2**bits - 1]`. Codes are packed `8 // bits` per byte in a flat `uint8` buffer, so `nbytes()` is the
real footprint (codes + per-group scale and minimum).

```python
>>> x = torch.randn(1, 2, 64, 8)                                  # (B, H_kv, L, D)
>>> q = quantize(x, bits=4, group_size=32, dim=-2)                # keys: per channel, grouped over tokens
>>> (q.dequantize() - x).abs().max() <= q.max_error()
tensor(True)
```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SUPPORTED_BITS", "QuantizedTensor", "auxiliary_dtype", "pack_bits", "quantize", "unpack_bits"]

SUPPORTED_BITS = (2, 4, 8)


def auxiliary_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage dtype for side information (scales, low-rank factors, outliers): bf16 for bf16 models, else fp16."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs integer codes in `[0, 2**bits)` into a `uint8` tensor `(B, N / (8 // bits))`, `8 // bits` codes per byte.

    The leading (batch) axis is kept so that beam reordering and batch selection index the packed codes directly.

    Args:
        codes (`torch.Tensor`): integer codes `(B, ...)`; the elements per batch row must be a multiple of `8 // bits`.
        bits (`int`): one of `SUPPORTED_BITS`.
    """
    per_byte = 8 // bits
    flat = codes.reshape(codes.shape[0], -1, per_byte).to(torch.uint8)  # (B, N / per_byte, per_byte)
    shifts = torch.arange(per_byte, device=codes.device, dtype=torch.uint8) * bits
    return (flat << shifts).sum(dim=-1, dtype=torch.uint8)  # bit fields do not overlap: the sum is an OR


def unpack_bits(packed: torch.Tensor, bits: int, shape: torch.Size) -> torch.Tensor:
    """Inverse of `pack_bits`: returns `uint8` codes of `shape`."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)  # (B, N / per_byte, per_byte)
    return codes.reshape(shape)


@dataclass
class QuantizedTensor:
    """A group-wise quantised tensor: packed codes plus one minimum and one step per group.

    Attributes:
        packed (`torch.Tensor`): `uint8` codes `(B, N / (8 // bits))`, `8 // bits` per byte.
        scale (`torch.Tensor`): step per group, `(..., n_groups, 1)` in the auxiliary dtype.
        minimum (`torch.Tensor`): minimum per group, same shape as `scale`.
        shape (`torch.Size`): shape of the original tensor.
        bits (`int`): bit width of the codes.
        dim (`int`): axis along which the groups were taken (negative).
        dtype (`torch.dtype`): dtype returned by `dequantize`.
    """

    packed: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    shape: torch.Size
    bits: int
    dim: int
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        """Returns the reconstructed tensor in the original shape and dtype (`code * scale + minimum` per group)."""
        moved = _moved_shape(self.shape, self.dim)
        n_groups = self.scale.shape[-2]
        codes = _float_codes(self.packed, self.bits)  # (B, N / per_byte, per_byte), float32
        grouped = codes.reshape(*moved[:-1], n_groups, moved[-1] // n_groups)  # (..., n_groups, group_size)
        values = grouped.mul_(self.scale.float()).add_(self.minimum.float())  # in place: one float buffer in all
        return values.reshape(moved).movedim(-1, self.dim).to(self.dtype)

    def select(self, index: torch.Tensor) -> QuantizedTensor:
        """The same quantised tensor restricted (or reordered, repeated) to the batch rows `index`."""
        shape = torch.Size((index.numel(), *self.shape[1:]))
        return QuantizedTensor(
            self.packed[index], self.scale[index], self.minimum[index], shape, self.bits, self.dim, self.dtype
        )

    def concat(self, other: QuantizedTensor) -> QuantizedTensor:
        """Concatenates along axis 1 (the block axis of a `(B, n_blocks, ...)` tensor) without dequantising."""
        shape = torch.Size((self.shape[0], self.shape[1] + other.shape[1], *self.shape[2:]))
        return QuantizedTensor(
            torch.cat([self.packed, other.packed], dim=1),
            torch.cat([self.scale, other.scale], dim=1),
            torch.cat([self.minimum, other.minimum], dim=1),
            shape,
            self.bits,
            self.dim,
            self.dtype,
        )

    def drop_leading_blocks(self, count: int) -> QuantizedTensor:
        """The same blocks without the first `count` along axis 1 (copied, so the dropped storage is freed)."""
        per_block = self.packed.shape[1] // self.shape[1]  # packed codes of one block, per batch row
        shape = torch.Size((self.shape[0], self.shape[1] - count, *self.shape[2:]))
        return QuantizedTensor(
            self.packed[:, count * per_block :].clone(),
            self.scale[:, count:].clone(),
            self.minimum[:, count:].clone(),
            shape,
            self.bits,
            self.dim,
            self.dtype,
        )

    def max_error(self) -> torch.Tensor:
        """Upper bound of the absolute round-trip error: half the largest step, plus the rounding to `dtype`."""
        largest = (self.minimum.float().abs() + self.scale.float() * (2**self.bits - 1)).max()
        return self.scale.float().max() * 0.5 * (1 + 1e-3) + largest * torch.finfo(self.dtype).eps + 1e-6

    def nbytes(self) -> int:
        """True storage in bytes (codes, scales and minima)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.minimum))


def _float_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """`unpack_bits` straight into float32 `(B, N / per_byte, per_byte)`: each code slot is shifted, masked and
    converted in one copy, with no full-size integer intermediate (2-8x faster than unpacking then converting)."""
    per_byte, mask = 8 // bits, 2**bits - 1
    codes = torch.empty(*packed.shape, per_byte, dtype=torch.float32, device=packed.device)
    for slot in range(per_byte):
        shifted = packed >> (slot * bits) if slot else packed
        codes[..., slot] = shifted & mask if slot < per_byte - 1 else shifted  # the top slot needs no mask
    return codes


def _moved_shape(shape: torch.Size, dim: int) -> tuple[int, ...]:
    dims = list(shape)
    size = dims.pop(dim)
    return (*dims, size)


def quantize(x: torch.Tensor, bits: int, group_size: int, dim: int = -1) -> QuantizedTensor:
    """Group-wise asymmetric uniform quantisation of `x` along `dim`.

    Args:
        x (`torch.Tensor`): the tensor to quantise, e.g. keys or values `(B, H_kv, L, D)`.
        bits (`int`): bit width, one of `SUPPORTED_BITS`.
        group_size (`int`): consecutive elements along `dim` sharing one scale and minimum; `x.shape[dim]` must be a
            multiple of it.
        dim (`int`, *optional*, defaults to -1): the grouping axis (-1 = per token for `(B, H, L, D)` values,
            -2 = per channel grouped over tokens for keys, as in KIVI).

    Returns:
        `QuantizedTensor`: packed codes and per-group side information.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")
    dim = dim if dim < 0 else dim - x.dim()
    if group_size <= 0 or x.shape[dim] % group_size:
        raise ValueError(
            f"group_size={group_size} must be positive and divide the grouped axis of length {x.shape[dim]}"
        )
    moved = x.movedim(dim, -1).float()
    grouped = moved.reshape(*moved.shape[:-1], moved.shape[-1] // group_size, group_size)  # (..., n_groups, G)
    aux = auxiliary_dtype(x.dtype)
    eps = torch.finfo(aux).eps
    # side information is stored rounded: the minimum is rounded down and the step up, so every code stays in range
    # and the round-trip error stays within half a step
    true_min = grouped.amin(dim=-1, keepdim=True)
    minimum = (true_min - true_min.abs() * eps).to(aux)
    maximum = grouped.amax(dim=-1, keepdim=True)
    scale = ((maximum - minimum.float()) / (2**bits - 1) * (1 + eps)).clamp(min=1e-6).to(aux)
    codes = ((grouped - minimum.float()) / scale.float()).round().clamp(0, 2**bits - 1)
    return QuantizedTensor(
        packed=pack_bits(codes, bits), scale=scale, minimum=minimum, shape=x.shape, bits=bits, dim=dim, dtype=x.dtype
    )
