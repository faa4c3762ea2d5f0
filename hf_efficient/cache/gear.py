"""GEAR: quantisation plus a low-rank and a sparse correction of its error.

Each block of `R` tokens' keys or values (per batch row; `(H_kv, R, D)`) is stored as
`X ≈ Quant_b(X - S) + P Qᵀ + S`:

1. **S** — the `outlier_ratio / 2` largest and smallest entries are kept exactly (indices + values) and
   replaced by the block mean before quantisation, so they do not stretch the quantisation range;
2. **Quant_b** — KIVI-style group-wise asymmetric quantisation (keys per channel, values per token);
3. **P Qᵀ** — a rank-`rank` approximation of the remaining quantisation error by subspace (power) iteration,
   started from a fixed seed so compression is deterministic. As in the paper, the error is one `(R, H_kv·D)`
   matrix per block (tokens × all KV heads' channels), so the factors cost `rank·(R + H_kv·D)` numbers per block
   rather than `rank·(R + D)` per head: on small heads (D = 32) per-head factors would cost more than the codes.

`outlier_ratio=0` gives GEAR-L (quantisation + low rank); `rank=0` drops the low-rank term.

Paper: Kang et al., "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of LLM",
2024 (arXiv 2403.05527).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig

from .base import CompressedKVCache, head_dim_of, kv_heads_of, tensor_nbytes
from .kivi import KIVILayer, sliding_layer_factory, validate_quantization
from .quantization import QuantizedTensor, auxiliary_dtype, quantize

__all__ = ["GEARBlock", "GEARCache", "GEARLayer", "gear_compress"]

_POWER_ITERATION_SEED = 0


@dataclass
class GEARBlock:
    """GEAR-compressed blocks `(B, n_blocks, H_kv, R, D)` (any leading axes before `(R, D)`).

    Attributes:
        quantized (`QuantizedTensor`): the quantised blocks, outliers removed.
        left (`torch.Tensor` or `None`): low-rank factors `P` `(B, n_blocks, R, r)`.
        right (`torch.Tensor` or `None`): low-rank factors `Q` `(B, n_blocks, H_kv * D, r)`.
        outlier_index (`torch.Tensor` or `None`): outlier positions in each block `(B, n_blocks, H_kv, s)`.
        outlier_value (`torch.Tensor` or `None`): their exact values `(B, n_blocks, H_kv, s)`.
    """

    quantized: QuantizedTensor
    left: torch.Tensor | None
    right: torch.Tensor | None
    outlier_index: torch.Tensor | None
    outlier_value: torch.Tensor | None

    def dequantize(self) -> torch.Tensor:
        x = self.quantized.dequantize().float()  # (B, n_blocks, H_kv, R, D)
        if self.left is not None:
            correction = self.left.float() @ self.right.float().transpose(-1, -2)  # (B, n_blocks, R, H_kv * D)
            x = x + correction.unflatten(-1, (x.shape[-3], x.shape[-1])).movedim(-2, -3)
        if self.outlier_index is not None:
            shape = x.shape
            x = x.flatten(-2).scatter(-1, self.outlier_index.long(), self.outlier_value.float()).view(shape)
        return x.to(self.quantized.dtype)

    def concat(self, other: GEARBlock) -> GEARBlock:
        """Concatenates along the block axis (1)."""

        def join(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            return None if a is None else torch.cat([a, b], dim=1)

        return GEARBlock(
            self.quantized.concat(other.quantized),
            join(self.left, other.left),
            join(self.right, other.right),
            join(self.outlier_index, other.outlier_index),
            join(self.outlier_value, other.outlier_value),
        )

    def select(self, index: torch.Tensor) -> GEARBlock:
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return GEARBlock(
            self.quantized.select(index),
            pick(self.left),
            pick(self.right),
            pick(self.outlier_index),
            pick(self.outlier_value),
        )

    def drop_leading_blocks(self, count: int) -> GEARBlock:
        """The same blocks without the first `count` (copied, so the dropped storage is freed)."""

        def tail(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, count:].clone()

        return GEARBlock(
            self.quantized.drop_leading_blocks(count),
            tail(self.left),
            tail(self.right),
            tail(self.outlier_index),
            tail(self.outlier_value),
        )

    def nbytes(self) -> int:
        extras = (self.left, self.right, self.outlier_index, self.outlier_value)
        return self.quantized.nbytes() + tensor_nbytes(*extras)


def _low_rank(error: torch.Tensor, rank: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors `P (.., R, r)`, `Q (.., D, r)` with `error ≈ P Qᵀ`, by deterministic subspace iteration."""
    generator = torch.Generator().manual_seed(_POWER_ITERATION_SEED)
    right = torch.randn(error.shape[-1], rank, generator=generator).to(error.device)  # (D, r)
    right = right.expand(*error.shape[:-2], -1, -1)  # (..., D, r)
    for _ in range(iterations):
        left = torch.linalg.qr(error @ right).Q  # (..., R, r), orthonormal columns
        right = error.transpose(-1, -2) @ left  # (..., D, r)
    return left, right


def gear_compress(
    x: torch.Tensor, bits: int, group_size: int, dim: int, rank: int, outlier_ratio: float, iterations: int = 3
) -> GEARBlock:
    """Compresses blocks `x` `(..., H_kv, R, D)` into quantised codes, low-rank factors and sparse outliers.

    Args:
        x (`torch.Tensor`): keys or values of one block, `(B, 1, H_kv, R, D)` in the cache (any leading axes).
        bits (`int`): code width.
        group_size (`int`): group length along `dim`.
        dim (`int`): -2 for keys (per channel, grouped over tokens), -1 for values (per token).
        rank (`int`): rank of the error correction (0 disables it).
        outlier_ratio (`float`): fraction of entries kept exactly, half from each tail (0 disables it).
        iterations (`int`, *optional*, defaults to 3): power iterations.
    """
    *lead, length, head_dim = x.shape
    aux = auxiliary_dtype(x.dtype)
    flat = x.float().reshape(*lead, length * head_dim)  # (..., R * D)
    per_tail = int(outlier_ratio * length * head_dim / 2)
    outlier_index = outlier_value = None
    if per_tail > 0:
        index = torch.cat([flat.topk(per_tail, -1).indices, flat.topk(per_tail, -1, largest=False).indices], -1)
        outlier_value = flat.gather(-1, index).to(aux)  # (..., 2s)
        flat = flat.scatter(-1, index, flat.mean(-1, keepdim=True).expand_as(index))
        outlier_index = index.to(torch.int16 if length * head_dim <= torch.iinfo(torch.int16).max else torch.int32)
    dense = flat.view(*lead, length, head_dim)
    quantized = quantize(dense.to(x.dtype), bits, group_size, dim)
    left = right = None
    if rank > 0:
        error = dense - quantized.dequantize().float()  # (..., H_kv, R, D)
        if outlier_index is not None:  # overwritten by the exact outliers anyway
            error = error.flatten(-2).scatter(-1, outlier_index.long(), 0.0).view_as(error)
        left, right = _low_rank(error.movedim(-3, -2).flatten(-2), rank, iterations)  # of (..., R, H_kv * D)
        left, right = left.to(aux), right.to(aux)
    return GEARBlock(quantized, left, right, outlier_index, outlier_value)


class GEARLayer(KIVILayer):
    """One GEAR layer: KIVI-style quantisation of each residual block plus low-rank and sparse corrections.

    Args:
        bits (`int`): code width.
        group_size (`int`): tokens per key group.
        value_group_size (`int`): channels per value group.
        residual_length (`int`): streaming buffer kept in full precision.
        rank (`int`): low-rank correction rank.
        outlier_ratio (`float`): fraction of exact outliers.
        iterations (`int`): power iterations.
        sliding_window (`int`, *optional*): the attention window of a sliding layer (`None`: full attention).
    """

    def __init__(
        self,
        bits: int,
        group_size: int,
        value_group_size: int,
        residual_length: int,
        rank: int,
        outlier_ratio: float,
        iterations: int,
        sliding_window: int | None = None,
    ):
        super().__init__(bits, group_size, value_group_size, residual_length, sliding_window)
        self.rank, self.outlier_ratio, self.iterations = rank, outlier_ratio, iterations

    def compress_keys(self, keys: torch.Tensor) -> GEARBlock:
        return gear_compress(keys, self.bits, self.group_size, -2, self.rank, self.outlier_ratio, self.iterations)

    def compress_values(self, values: torch.Tensor) -> GEARBlock:
        return gear_compress(
            values, self.bits, self.value_group_size, -1, self.rank, self.outlier_ratio, self.iterations
        )


class GEARCache(CompressedKVCache):
    """GEAR cache: quantised KV with a low-rank error correction, sparse outliers and a full-precision buffer.

    Args:
        config (`PreTrainedConfig`): the model config.
        bits (`int`, *optional*, defaults to 4): code width, one of 2, 4, 8.
        rank (`int`, *optional*, defaults to 4): rank of the error correction per block, across its KV heads
            (0 disables).
        outlier_ratio (`float`, *optional*, defaults to 0.02): fraction of entries kept exactly (0 gives GEAR-L).
        group_size (`int`, *optional*, defaults to 64): tokens per key group / channels per value group.
        residual_length (`int`, *optional*, defaults to 64): streaming buffer; a multiple of `group_size`.
        power_iterations (`int`, *optional*, defaults to 3): subspace iterations of the low-rank fit.
        sliding_layers (`str`, *optional*, defaults to `"compressed"`): the sliding-window layers of hybrid models
            (Gemma 3) keep their window GEAR-compressed (`"compressed"`) or in full precision (`"window"`), or keep
            the whole history compressed (`"full"`, for speculative decoding past the window).

    Example:

    ```python
    >>> cache = GEARCache(config=model.config, bits=4, rank=4)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=32)
    >>> cache.nbytes()
    ```
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        bits: int = 4,
        rank: int = 4,
        outlier_ratio: float = 0.02,
        group_size: int = 64,
        residual_length: int = 64,
        power_iterations: int = 3,
        sliding_layers: str = "compressed",
    ):
        value_group = validate_quantization(config, bits, group_size, residual_length)
        limit = min(residual_length, head_dim_of(config) * kv_heads_of(config))
        if not 0 <= rank <= limit:
            raise ValueError(
                f"rank={rank} must be in [0, min(residual_length, num_key_value_heads * head_dim)={limit}]"
            )
        if not 0 <= outlier_ratio < 1:
            raise ValueError(f"outlier_ratio={outlier_ratio} must be in [0, 1)")
        if power_iterations < 1:
            raise ValueError(f"power_iterations={power_iterations} must be at least 1")

        def layer(window: int | None = None) -> GEARLayer:
            settings = (rank, outlier_ratio, power_iterations)
            return GEARLayer(bits, group_size, value_group, residual_length, *settings, window)

        super().__init__(config, layer, sliding_layer_factory(sliding_layers, layer))
