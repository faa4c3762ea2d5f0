"""Shared policy of the eviction caches: keep the `budget` highest-priority slots per batch row and KV head.

A layer stores keys/values `(B, H_kv, L, D)` plus the logical position of every slot `(B, H_kv, L)` (-1 marks
padding, read from the mask at insertion). A concrete method overrides `score()` — the keep priority of each
slot — and, when it needs the queries, `observe()`, which the `"hfe_kv"` attention function calls with each
forward's queries (see `scoring.py`). The base class protects the `recent` newest slots, drops padding first,
keeps the top `budget` slots in position order and masks attention itself, so:

- `get_seq_length()` is logical (tokens seen: generate derives RoPE positions from it), `get_mask_sizes()`
  physical (`kept + q` slots at offset `seen - kept`), keys keep the RoPE rotation of their original position;
- GQA is scored per KV head, never through `repeat_kv`;
- left-padded batches work: padded slots never count as sinks or heavy hitters and are never attended to;
- a forward whose 4-D mask covers every column the cache was ever given (speculative tree verification: holes of
  ragged acceptance included) is masked per kept slot from that mask, so croppable eviction caches verify drafts.

`EvictionCache` routes each layer's attention call to `"hfe_kv"` while the cache is being filled
(`scoring.AttentionRoute`); the model's own attention setting is never changed.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedConfig

from ..compat import CacheLayerMixin
from .base import CompressedKVCache, MeasuredLayer, SlidingWindowLayer, check_choice, tensor_nbytes
from .scoring import grouped_attention, new_token_visibility, sdpa_attention_forward

__all__ = ["EvictionCache", "EvictionLayer"]


class EvictionLayer(MeasuredLayer):
    """A cache layer that evicts down to `budget` slots per KV head after each forward.

    Args:
        budget (`int`): slots kept per batch row and KV head.
        recent (`int`): newest slots always kept (part of the budget).
    """

    is_sliding = False
    is_croppable = False
    needs_queries = False  # whether `observe` must run (it always receives the queries when it does)

    def __init__(self, budget: int, recent: int):
        super().__init__()
        self.budget, self.recent = budget, recent
        self.cumulative_length = 0
        self.positions: torch.Tensor | None = None
        self.contiguous = True  # nothing evicted yet: the standard mask is exact
        self.awaiting_attention = False
        self.record_past = False

    # -- method hooks -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def score(self) -> torch.Tensor:
        """Keep priority of every slot `(B, H_kv, L)`; higher is kept. Recency and padding are handled by the base."""

    def observe(self, query: torch.Tensor, mask: torch.Tensor, scaling: float) -> None:
        """Records what `score()` needs from this forward's queries `(B, H, q, D)` and visibility `(B, H_kv, q, L)`."""

    def should_evict(self) -> bool:
        """Whether this forward ends with an eviction (by default: whenever the budget is exceeded)."""
        return self.keys.shape[-2] > self.budget

    def on_evict(self, keep: torch.Tensor) -> None:
        """Lets a method gather its own per-slot state with the kept indices `(B, H_kv, budget)`."""

    # -- cache layer contract -----------------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.positions = torch.empty(*key_states.shape[:2], 0, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends `(B, H_kv, q, D)` states; the returned keys carry this layer to the `"hfe_kv"` attention."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, kv_heads, q_len, _ = key_states.shape
        new = torch.arange(self.cumulative_length, self.cumulative_length + q_len, device=self.device)
        self.positions = torch.cat([self.positions, new.to(torch.int32).expand(batch, kv_heads, q_len)], dim=-1)
        self.keys = torch.cat([self.keys, key_states], dim=-2)  # (B, H_kv, L, D)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += q_len
        self.hand_off(self.keys)
        return self.keys, self.values

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Attention of `query` `(B, H, q, D)` over the kept slots, then scoring and eviction.

        Returns:
            `torch.Tensor`: the attention output `(B, q, H, D)`.
        """
        self.awaiting_attention = False
        q_len = query.shape[-2]
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask == 0  # an additive float mask: 0 where visible
        new_block = new_token_visibility(attention_mask, q_len, self.keys.shape[0]).to(self.device)  # (B, 1, q, q)
        valid_new = new_block.diagonal(dim1=-2, dim2=-1)  # (B, 1, q): a token is padding iff it cannot see itself
        self.positions[..., -q_len:] = torch.where(valid_new, self.positions[..., -q_len:], -1)
        mask = None
        if not self.contiguous or self.needs_queries:
            mask = self._visibility(attention_mask, new_block, q_len, kwargs.get("sliding_window"))  # (B, H_kv, q, L)
        if self.contiguous:  # exactly the SDPA path of an uncompressed cache
            output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        else:
            output = grouped_attention(query, key, value, mask, scaling)
        if self.needs_queries:
            self.observe(query, mask, scaling)
        if not self.record_past and self.should_evict():
            self.evict()
        return output

    def _visibility(
        self, attention_mask: torch.Tensor | None, new_block: torch.Tensor, q_len: int, sliding_window: int | None
    ) -> torch.Tensor:
        """Visibility of every kept slot from every query `(B, H_kv, q, L)`.

        A slot's position is the index of the column it was given at, among all columns this cache was ever given.
        A mask as wide as that history (the speculative engine's tree masks) is read at those columns; a standard
        mask only covers the kept suffix, so then padding recorded at insertion decides.
        """
        batch, kv_heads, length = self.positions.shape
        old = self.positions[..., : length - q_len]  # (B, H_kv, L_old): all earlier than every query
        if attention_mask is not None and attention_mask.shape[-1] == self.cumulative_length:
            rows = attention_mask[:, 0].unsqueeze(1).expand(batch, kv_heads, q_len, -1)  # (B, H_kv, q, seen)
            old_visible = rows.gather(-1, old.long().clamp(min=0).unsqueeze(-2).expand(-1, -1, q_len, -1))
            old_visible = old_visible & (old >= 0).unsqueeze(-2)
        else:
            old_visible = (old >= 0).unsqueeze(-2).expand(batch, kv_heads, q_len, length - q_len)
        if sliding_window is not None:
            query_positions = torch.arange(self.cumulative_length - q_len, self.cumulative_length, device=self.device)
            old_visible = old_visible & (old.unsqueeze(-2) > query_positions[:, None] - sliding_window)
        return torch.cat([old_visible, new_block.expand(batch, kv_heads, q_len, q_len)], dim=-1)

    def evict(self) -> None:
        """Keeps the `budget` highest-priority slots per row and KV head, in position order."""
        priority = self.score().float().clone()  # (B, H_kv, L)
        if self.recent:
            priority[..., -self.recent :] = float("inf")
        priority = priority.masked_fill(self.positions < 0, float("-inf"))
        keep = priority.topk(min(self.budget, priority.shape[-1]), dim=-1).indices.sort(dim=-1).values
        self.keep_slots(keep)
        self.contiguous = False

    def keep_slots(self, keep: torch.Tensor) -> None:
        """Keeps the slots `keep` `(B, H_kv, K)` (sorted); methods with per-slot state extend `on_evict`."""
        gather = keep.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])  # (B, H_kv, K, D)
        self.keys = self.keys.gather(-2, gather)
        self.values = self.values.gather(-2, gather)
        self.positions = self.positions.gather(-1, keep)
        self.on_evict(keep)

    def crop(self, tokens_to_remove: int) -> None:
        """Removes the last `-tokens_to_remove` tokens, if they are still the newest slots, then evicts what is due.

        Raises:
            `ValueError`: when the method cannot roll back (`is_croppable=False`), or the tokens are gone.
        """
        if not self.is_croppable:
            raise ValueError(f"{type(self).__name__} cannot be rolled back (is_croppable=False)")
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        remove = -tokens_to_remove
        if not self.is_initialized:
            return
        if remove:
            expected = torch.arange(self.cumulative_length - remove, self.cumulative_length, device=self.device)
            tail = self.positions[..., -remove:] if remove <= self.positions.shape[-1] else None
            if tail is None or not ((tail == expected) | (tail < 0)).all():
                raise ValueError(
                    f"cannot crop {remove} tokens: they are no longer all kept; call `activate_past_recording()` "
                    "before the forward passes you may roll back"
                )
            kept = torch.arange(self.positions.shape[-1] - remove, device=self.device)
            self.keep_slots(kept.expand(*self.positions.shape[:2], -1))
            self.cumulative_length -= remove
        if self.should_evict():
            self.evict()

    def activate_past_recording(self, **kwargs) -> None:  # 5.25 passes recurrent_states_to_keep=
        """Defers eviction to the next `crop`, so that a rollback only ever removes the newest slots.

        Raises:
            `ValueError`: for methods that cannot roll back (`is_croppable=False`), e.g. in assisted decoding.
        """
        if not self.is_croppable:
            raise ValueError(f"{type(self).__name__} cannot be rolled back (is_croppable=False): no past recording")
        self.record_past = True

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        kept = self.keys.shape[-2] if self.is_initialized else 0
        return kept + query_length, self.cumulative_length - kept

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.positions = None
        self.cumulative_length = 0
        self.contiguous, self.awaiting_attention, self.is_initialized = True, False, False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.select_rows(indices.to(self.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.select_rows(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))

    def select_rows(self, index: torch.Tensor) -> None:
        """Keeps (reorders, repeats) the batch rows `index`; methods with per-slot state extend it."""
        self.keys, self.values, self.positions = self.keys[index], self.values[index], self.positions[index]

    def nbytes(self) -> int:
        return tensor_nbytes(self.keys, self.values, self.positions) if self.is_initialized else 0


class EvictionCache(CompressedKVCache):
    """A `CompressedKVCache` of eviction layers: they need every attention call (scores, per-slot masks), so models
    whose attention masks cannot be read (not sdpa / eager) are refused.

    Args:
        config (`PreTrainedConfig`): the model's own config object (`model.config`).
        layer_factory (`Callable[[], EvictionLayer]`): builds one layer policy.
        sliding_layers (`str`, *optional*, defaults to `"window"`): a sliding-window layer keeps whichever holds
            less: its window (`SlidingWindowLayer`, full precision) when the window is at most the policy's budget,
            else the policy, whose masks apply the window. `"full"`: the policy on every layer (what speculative
            decoding past the window needs).
    """

    needs_attention_call = True
    SLIDING_LAYER_CHOICES = ("window", "full")

    def __init__(
        self, config: PreTrainedConfig, layer_factory: Callable[[], EvictionLayer], sliding_layers: str = "window"
    ):
        check_choice("sliding_layers", sliding_layers, self.SLIDING_LAYER_CHOICES)
        budget = layer_factory().budget

        def sliding_layer(window: int) -> CacheLayerMixin:
            if sliding_layers == "window" and window <= budget:
                return SlidingWindowLayer(window)
            return layer_factory()

        super().__init__(config, layer_factory, sliding_layer)
