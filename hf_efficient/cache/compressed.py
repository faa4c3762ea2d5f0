"""Shared policy of the quantised caches: a full-precision residual window flushed into compressed blocks.

Tokens arrive in a full-precision residual buffer; as soon as it holds `residual_length` tokens, the oldest
`residual_length` are compressed into one block (KIVI's residual, GEAR's streaming buffer). A concrete method
only says how a `(B, 1, H_kv, R, D)` block of keys and of values is compressed (`compress_keys` /
`compress_values`); compressed blocks are concatenated along their block axis, so the whole compressed
history `(B, n_blocks, H_kv, R, D)` is dequantised in one call per step, whatever its length.

On a full-attention layer the whole history stays, so positions are contiguous: `get_seq_length()` counts every
token and the standard causal/padding mask applies unchanged. On a sliding-window layer (`sliding_window=W`) the
held tokens are still the most recent contiguous ones: once compressed, a block whose tokens are all older than the
next query's window is dropped (and, before any block exists, residual tokens older than it), so the layer holds at
most `W + residual_length` tokens; `get_mask_sizes` reports the offset of the oldest held token, as transformers'
sliding layers do. Attention runs on the dequantised history (no fused kernel).

Padding never shapes a block: the layer reads which new tokens are padding from the mask of its attention call
(routed to `attend`, see `scoring.AttentionRoute`), compresses only after that call, and fills padded columns with
the mean of the block's real ones before compressing, so a padded row's quantisation ranges, low-rank and outlier
terms come from its real tokens alone, whatever the padding holds. (On attention implementations whose masks
cannot be read, the call is not routed and blocks compress as they arrive.)
"""

from __future__ import annotations

import abc
from typing import Protocol

import torch

from .base import MeasuredLayer, tensor_nbytes
from .scoring import new_token_visibility, sdpa_attention_forward

__all__ = ["CompressedBlock", "ResidualCompressedLayer"]


class CompressedBlock(Protocol):
    """What compressed `(B, n_blocks, H_kv, R, D)` blocks offer."""

    def dequantize(self) -> torch.Tensor: ...

    def concat(self, other: CompressedBlock) -> CompressedBlock: ...

    def select(self, index: torch.Tensor) -> CompressedBlock: ...

    def nbytes(self) -> int: ...

    def drop_leading_blocks(self, count: int) -> CompressedBlock: ...


class ResidualCompressedLayer(MeasuredLayer):
    """A cache layer holding compressed blocks of `residual_length` tokens plus a full-precision residual.

    Rolling back (`crop(-n)`) is exact for the tokens still in the residual. Speculative decoding first calls
    `activate_past_recording()`, which defers compression to the next `crop`, so a rollback never reaches into a
    compressed block.

    Args:
        residual_length (`int`): tokens kept in full precision before a block is compressed.
        sliding_window (`int`, *optional*): the layer's attention window; tokens that no later query can see are
            dropped (`None`: a full-attention layer, everything is kept).
    """

    is_croppable = True

    def __init__(self, residual_length: int, sliding_window: int | None = None):
        super().__init__()
        self.residual_length = residual_length
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.stored_tokens = 0  # tokens in the compressed blocks
        self.cumulative_length = 0
        self.record_past = False
        self.key_store: CompressedBlock | None = None  # every compressed block, (B, n_blocks, H_kv, R, D)
        self.value_store: CompressedBlock | None = None
        self.real: torch.Tensor | None = None  # (B, residual): False where the residual holds padding

    @abc.abstractmethod
    def compress_keys(self, keys: torch.Tensor) -> CompressedBlock:
        """Compresses a key block `(B, 1, H_kv, R, D)`."""

    @abc.abstractmethod
    def compress_values(self, values: torch.Tensor) -> CompressedBlock:
        """Compresses a value block `(B, 1, H_kv, R, D)`."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[..., :0, :]  # (B, H_kv, 0, D): the residual starts empty
        self.values = value_states[..., :0, :]
        self.real = torch.ones(key_states.shape[0], 0, dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends `(B, H_kv, q, D)` states and returns the whole (dequantised) history `(B, H_kv, L, D)`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, q_len, _ = key_states.shape
        self.cumulative_length += q_len
        self.keys = torch.cat([self.keys, key_states], dim=-2)  # (B, H_kv, residual + q, D)
        self.values = torch.cat([self.values, value_states], dim=-2)
        new_real = torch.ones(batch, q_len, dtype=torch.bool, device=self.device)  # until the mask says otherwise
        self.real = torch.cat([self.real, new_real], dim=-1)  # (B, residual + q)
        keys = torch.cat([*self._history(self.key_store), self.keys], dim=-2)  # (B, H_kv, L, D)
        values = torch.cat([*self._history(self.value_store), self.values], dim=-2)
        if not self.hand_off(keys) and not self.record_past:
            self._flush()  # unrouted: compress now, padding unknown
        return keys, values

    def missed_attention(self) -> None:
        """No attention call told which tokens are padding: compress what is due as it is."""
        if not self.record_past:
            self._flush()

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        **kwargs,
    ) -> torch.Tensor:
        """SDPA over the returned history; the new tokens' padding is read from the mask, then blocks compress."""
        self.awaiting_attention = False
        q_len = query.shape[-2]
        new_block = new_token_visibility(attention_mask, q_len, query.shape[0]).to(self.device)  # (B, 1, q, q)
        self.real[:, -q_len:] &= new_block[:, 0].diagonal(dim1=-2, dim2=-1)  # padding cannot see itself
        output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if not self.record_past:
            self._flush()
        return output

    @staticmethod
    def _history(store: CompressedBlock | None) -> list[torch.Tensor]:
        """The dequantised compressed history as `[(B, H_kv, n_blocks * R, D)]` (empty list when none)."""
        if store is None:
            return []
        blocks = store.dequantize()  # (B, n_blocks, H_kv, R, D)
        batch, n_blocks, heads, length, dim = blocks.shape
        return [blocks.transpose(1, 2).reshape(batch, heads, n_blocks * length, dim)]

    @staticmethod
    def _append(store: CompressedBlock | None, block: CompressedBlock) -> CompressedBlock:
        return block if store is None else store.concat(block)

    def _flush(self) -> None:
        """Compresses full blocks of `residual_length` tokens out of the residual."""
        while self.keys.shape[-2] >= self.residual_length:
            rest = self.keys.shape[-2] - self.residual_length
            block_keys, self.keys = self.keys.split([self.residual_length, rest], dim=-2)
            block_values, self.values = self.values.split([self.residual_length, rest], dim=-2)
            block_real, self.real = self.real.split([self.residual_length, rest], dim=-1)
            block_keys, block_values = _fill_padding(block_keys, block_real), _fill_padding(block_values, block_real)
            self.key_store = self._append(self.key_store, self.compress_keys(block_keys.unsqueeze(1).contiguous()))
            self.value_store = self._append(
                self.value_store, self.compress_values(block_values.unsqueeze(1).contiguous())
            )
            self.stored_tokens += self.residual_length
        if self.sliding_window is not None:
            self._drop_outside_window()
        self.keys, self.values = self.keys.contiguous(), self.values.contiguous()

    def _drop_outside_window(self) -> None:
        """Drops held tokens that no later query sees: the next query (position `cumulative_length`) sees positions
        `> cumulative_length - sliding_window`. Whole compressed blocks go first; residual tokens only once no block
        is left, so blocks stay aligned to `residual_length` tokens."""
        oldest_visible = self.cumulative_length - self.sliding_window + 1
        first_held = self.cumulative_length - self.stored_tokens - self.keys.shape[-2]
        blocks = min(
            max(oldest_visible - first_held, 0) // self.residual_length, self.stored_tokens // self.residual_length
        )
        if blocks:
            self.stored_tokens -= blocks * self.residual_length
            first_held += blocks * self.residual_length
            if self.stored_tokens:
                self.key_store = self.key_store.drop_leading_blocks(blocks)
                self.value_store = self.value_store.drop_leading_blocks(blocks)
            else:
                self.key_store = self.value_store = None
        if not self.stored_tokens and oldest_visible > first_held:
            drop = oldest_visible - first_held
            self.keys, self.values = self.keys[..., drop:, :], self.values[..., drop:, :]
            self.real = self.real[:, drop:]

    def activate_past_recording(self, **kwargs) -> None:  # 5.25 passes recurrent_states_to_keep=
        """Defers compression to the next `crop`, so that rolled-back tokens never reach a compressed block."""
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last `-tokens_to_remove` tokens (a negative count), then compresses what is due.

        Raises:
            `ValueError`: for a positive count, or when the tokens to remove were already compressed.
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        remove = -tokens_to_remove
        if remove and self.is_initialized:
            if remove > self.keys.shape[-2]:
                raise ValueError(
                    f"cannot crop {remove} tokens: only the last {self.keys.shape[-2]} are uncompressed; call "
                    "`activate_past_recording()` before the forward passes you may roll back"
                )
            self.keys, self.values = self.keys[..., :-remove, :], self.values[..., :-remove, :]
            self.real = self.real[:, :-remove]
            self.cumulative_length -= remove
        if self.is_initialized:
            self._flush()

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """`(kv_length, kv_offset)`: the held tokens plus the query, and the position of the oldest held token."""
        held = self.stored_tokens + (self.keys.shape[-2] if self.is_initialized else 0)
        return held + query_length, self.cumulative_length - held

    def get_max_length(self) -> int:
        return -1 if self.sliding_window is None else self.sliding_window

    def reset(self) -> None:
        self.keys = self.values = self.real = None
        self.key_store = self.value_store = None
        self.cumulative_length = self.stored_tokens = 0
        self.is_initialized = self.awaiting_attention = False

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self.keys, self.values, self.real = self.keys[index], self.values[index], self.real[index]
        if self.key_store is not None:
            self.key_store, self.value_store = self.key_store.select(index), self.value_store.select(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))

    def nbytes(self) -> int:
        residual = tensor_nbytes(self.keys, self.values) if self.is_initialized else 0
        stores = (self.key_store, self.value_store)
        return residual + sum(store.nbytes() for store in stores if store is not None)


def _fill_padding(block: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """`block` `(B, H_kv, R, D)` with the columns where `real` `(B, R)` is False replaced by the mean of the row's
    real columns (zeros when it has none): attention never reads them, and they leave the block's statistics to
    the real tokens."""
    weight = real[:, None, :, None].to(block.dtype)  # (B, 1, R, 1)
    mean = (block * weight).sum(dim=-2, keepdim=True) / weight.sum(dim=-2, keepdim=True).clamp(min=1)  # (B, H, 1, D)
    return torch.where(real[:, None, :, None], block, mean)
