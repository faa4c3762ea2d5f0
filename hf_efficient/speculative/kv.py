"""KV-cache bookkeeping for tree verification: per-row column validity and positions, tree masks, compaction.

After a verification step every row keeps a different number of tree nodes (ragged acceptance). The cache
stays rectangular: row `b` keeps its accepted path in the first columns of the step's slot and the unused
columns become *holes*, masked out for every later query. `KVLayout` records, per row and per cache column,
whether the column holds a real token and at which position, and builds the 4-D additive masks from that.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig

from ..compat import Cache, DynamicCache

__all__ = ["KVLayout", "compact_cache", "full_history_cache", "sliding_window_of", "tree_attention_mask"]


class KVLayout:
    """Validity and position of every column of a (full-attention) KV cache, per row.

    Args:
        valid (`torch.BoolTensor` of shape `(B, K)`): `True` where cache column `k` of row `b` holds a real token
            (left padding and holes are `False`).
        positions (`torch.LongTensor` of shape `(B, K)`): position id of each column's token.
    """

    def __init__(self, valid: torch.BoolTensor, positions: torch.LongTensor) -> None:
        if valid.shape != positions.shape:
            raise ValueError(f"valid {tuple(valid.shape)} and positions {tuple(positions.shape)} differ in shape")
        self.valid = valid.bool()
        self.positions = positions.long()

    @classmethod
    def from_prompt(cls, attention_mask: torch.Tensor | None, input_ids: torch.LongTensor) -> KVLayout:
        """Layout of a prompt `(B, L)` with an optional 2-D padding mask, positions as `generate` numbers them."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L), left padding -> 0
        return cls(attention_mask.bool(), positions)

    @property
    def length(self) -> int:
        """Number of cache columns `K`."""
        return self.valid.shape[1]

    def next_positions(self) -> torch.LongTensor:
        """`(B,)` position of the next token of every row."""
        return (self.positions.masked_fill(~self.valid, -1).amax(-1) + 1).clamp(min=0)

    def tree_mask(
        self,
        ancestors: torch.BoolTensor,
        dtype: torch.dtype,
        window: int | None = None,
        node_positions: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """The additive 4-D mask for a forward of `T` new tokens after the recorded columns.

        Args:
            ancestors (`torch.BoolTensor` of shape `(B, T, N)`): which of the `N` columns after the recorded
                ones each new token may see: the new tokens themselves (`N = T`; itself and its ancestors for a
                tree, a lower triangle for a chain), possibly preceded by unrecorded columns (drafter trees).
            dtype (`torch.dtype`): the model dtype (eager attention adds the mask to the scores).
            window (`int`, *optional*): a sliding window: a token at position `p` sees recorded columns at
                positions `> p - window` only (HF's sliding layers; the new columns are always inside it).
            node_positions (`torch.LongTensor` of shape `(B, T)`, *optional*): positions of the new tokens (with
                `window`).

        Returns:
            `torch.Tensor` of shape `(B, 1, T, K + N)`: 0 where attention is allowed, the dtype's minimum elsewhere.
        """
        B, T, _ = ancestors.shape
        past = self.valid[:, None, :].expand(B, T, self.length)  # (B, T, K)
        if window is not None:
            past = past & (self.positions[:, None, :] > node_positions[:, :, None] - window)  # (B, T, K)
        allowed = torch.cat([past, ancestors], dim=-1)[:, None]  # (B, 1, T, K + T)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)

    def append(self, valid: torch.BoolTensor, positions: torch.LongTensor) -> None:
        """Record `A` new columns: `valid` and `positions` of shape `(B, A)`."""
        self.valid = torch.cat([self.valid, valid.bool()], dim=1)
        self.positions = torch.cat([self.positions, positions.long()], dim=1)


def sliding_window_of(config: PreTrainedConfig) -> int | None:
    """The sliding window of a decoder's sliding layers (`None` when every layer attends to the full history)."""
    config = config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return window


def tree_attention_mask(
    config: PreTrainedConfig,
    layout: KVLayout,
    ancestors: torch.BoolTensor,
    node_positions: torch.LongTensor,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The `attention_mask` of a tree forward for a model of `config` (shapes as in `KVLayout.tree_mask`).

    Full-attention models get one 4-D mask. Models with sliding layers get it windowed by position (every layer
    sliding, e.g. Mistral), or one mask per layer type (sliding and full layers mixed, e.g. Gemma 3, whose forward
    takes a `{layer type: mask}` mapping). The cache must then hold the full history (`full_history_cache`).
    """
    window = sliding_window_of(config)
    if window is None:
        return layout.tree_mask(ancestors, dtype)
    windowed = layout.tree_mask(ancestors, dtype, window=window, node_positions=node_positions)
    layer_types = getattr(config.get_text_config(decoder=True), "layer_types", None)
    if layer_types is None or set(layer_types) == {"sliding_attention"}:
        return windowed
    return {"full_attention": layout.tree_mask(ancestors, dtype), "sliding_attention": windowed}


def full_history_cache(cache: Cache) -> Cache:
    """`cache`, or an empty `DynamicCache` of full layers in place of an empty `DynamicCache` with sliding layers.

    A sliding layer keeps its last `window - 1` columns; with ragged acceptance some of them are holes, so it would
    drop tokens a row still sees. Keeping every column and expressing the window in the mask
    (`tree_attention_mask`) is exact.
    """
    sliding = any(getattr(layer, "is_sliding", False) for layer in cache.layers)
    if sliding and type(cache) is DynamicCache and cache.get_seq_length() == 0:
        return DynamicCache()
    return cache


def compact_cache(cache: Cache, num_new: int, keep: torch.LongTensor) -> None:
    """Keep, per row, the new cache columns `keep` (tree nodes) and drop the other new columns.

    The last `num_new` columns of every layer came from one forward of `num_new` tree nodes. Row `b` keeps
    nodes `keep[b]` (its accepted path, root first), written to the first `A` new columns; the remaining
    `num_new - A` columns are removed with the cache's own `crop`, so layer bookkeeping stays the cache's job.
    Paths that are already prefixes (chains at batch 1) need no gather, so any croppable cache works for them.

    Args:
        cache (`Cache`): the target (or drafter) cache after the tree forward.
        num_new (`int`): number of columns appended by that forward (`T`).
        keep (`torch.LongTensor` of shape `(B, A)`): node indices to keep per row, `A <= num_new`.
    """
    A = keep.shape[1]
    identity = torch.arange(A, device=keep.device)
    if not torch.equal(keep, identity.expand_as(keep)):
        for layer in cache.layers:
            if not getattr(layer, "is_initialized", True) or getattr(layer, "keys", None) is None:
                continue
            start = layer.keys.shape[-2] - num_new
            for states in (layer.keys, layer.values):
                index = keep[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1])  # (B, H_kv, A, D)
                states[:, :, start : start + A] = states[:, :, start:].gather(2, index)
    cache.crop(-(num_new - A))
