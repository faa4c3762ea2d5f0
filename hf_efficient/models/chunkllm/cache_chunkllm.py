"""ChunkLLM cache: full keys/values plus the chunk bookkeeping that chunk-selective attention reads.

Chunks are the spans between boundary tokens (a boundary token closes its chunk). For a query in chunk `c` the
visible keys are the sink tokens, chunk `c` itself, the `local_chunks` chunks before it and the `top_k_chunks`
older chunks that score highest against the adapter query of chunk `c`'s first token (per KV head). The selection
therefore changes only when a new chunk starts, i.e. right after the boundary adapter fired, and is the same in
prefill and in decoding.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer


def _append(
    buffer: torch.Tensor | None, current: torch.Tensor, new: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.cat([current, new], dim)` written into `buffer`, which holds `current` at its start and spare room.

    Returns `(buffer, view of current + new)`. A full buffer is reallocated with a quarter (at least 256 entries)
    of spare room, so appending one token copies one token, not the whole cache (amortised O(1) instead of the
    O(length) of `torch.cat`), for at most 25% more memory. A `current` that is not the buffer's view (replaced
    from outside) is copied into a fresh buffer.
    """
    used = current.shape[dim] if current.numel() else 0
    needed = used + new.shape[dim]
    shared = buffer is not None and (used == 0 or current.data_ptr() == buffer.data_ptr())
    if not shared or buffer.shape[dim] < needed or buffer.shape[:dim] != new.shape[:dim]:
        shape = list(new.shape)
        shape[dim] = needed + max(needed // 4, 256)
        grown = new.new_empty(shape)
        if used:
            grown.narrow(dim, 0, used).copy_(current)
        buffer = grown
    buffer.narrow(dim, used, new.shape[dim]).copy_(new)
    return buffer, buffer.narrow(dim, 0, needed)


class DecodeSelection:
    """What single-token steps of one layer read inside a chunk: the selected keys/values, then the open chunk,
    with the `keep` mask `(B, H_kv, M + T)`; each step appends its token in place (growable buffers, see `_append`).

    Args:
        keys (`torch.Tensor` of shape `(B, H_kv, M + T, D)`): gathered at the chunk's first decoding step.
        values (`torch.Tensor` of shape `(B, H_kv, M + T, D)`): likewise.
        keep (`torch.BoolTensor` of shape `(B, H_kv, M + T)`): which of them the query may attend.
        length (`int`): cache length these cover.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, length: int) -> None:
        self.keys, self.values, self.keep, self.length = keys, values, keep, length
        self._buffers: list[torch.Tensor | None] = [None, None, None]

    def append(self, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor) -> None:
        """Add one token: `key`/`value` `(B, H_kv, 1, D)`, `keep` `(B, H_kv, 1)`."""
        self._buffers[0], self.keys = _append(self._buffers[0], self.keys, key, dim=-2)
        self._buffers[1], self.values = _append(self._buffers[1], self.values, value, dim=-2)
        self._buffers[2], self.keep = _append(self._buffers[2], self.keep, keep, dim=-1)
        self.length += 1


class ChunkLLMLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values live in a buffer with spare room: `update` writes the new tokens in place
    and returns views, so a decoding step no longer copies the whole cache (the keys a step reads are the small
    selection, see `_decode_attention`). Operations that replace `keys`/`values` (beam reordering, batch
    selection) simply start a new buffer at the next `update`."""

    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._key_buffer, self.keys = _append(self._key_buffer, self.keys, key_states, dim=-2)
        self._value_buffer, self.values = _append(self._value_buffer, self.values, value_states, dim=-2)
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None


class ChunkLLMCache(Cache):
    r"""
    KV cache for [`ChunkLLMForCausalLM`]: keeps every key/value (so a chunk dropped now can be selected again after
    the next boundary) and, per layer, the running sums of the adapter keys of every chunk, the adapter query that
    selects the open chunk's context and, for decoding, the keys/values that selection reads: gathered once at the
    chunk start, then grown by one token per step (the selection cannot change inside a chunk).

    Paper: ChunkLLM (Ouyang et al., 2025, arXiv:2510.02361), §3 chunk selection at boundary tokens.

    Args:
        num_hidden_layers (`int`): layers of the backbone.
        top_k_chunks (`int`): closed chunks selected per KV head, besides the local window.
        sink_tokens (`int`): first real tokens of every row that are always attended.
        local_chunks (`int`, *optional*, defaults to 0): most recent closed chunks always attended.

    `kv_retention` is the fraction of the causally visible (query, key) pairs, over layers and KV heads, that the
    attention actually read since the cache was created.
    """

    is_compileable = False

    def __init__(self, num_hidden_layers: int, top_k_chunks: int, sink_tokens: int, local_chunks: int = 0):
        super().__init__(layers=[ChunkLLMLayer() for _ in range(num_hidden_layers)])
        self.top_k_chunks = top_k_chunks
        self.sink_tokens = sink_tokens
        self.local_chunks = local_chunks
        # shared by all layers, one entry per cached position
        self.chunk_of: torch.Tensor | None = None  # (B, L) chunk index, -1 for padding
        self.is_sink: torch.Tensor | None = None  # (B, L)
        self.chunk_sizes: torch.Tensor | None = None  # (B, C) real tokens per chunk
        self.current_chunk: torch.Tensor | None = None  # (B,) open chunk, -1 before the first real token
        self.current_start: torch.Tensor | None = None  # (B,) position of the open chunk's first token
        self.chunk_pending: torch.Tensor | None = None  # (B,) the last token closed its chunk
        self.real_seen: torch.Tensor | None = None  # (B,) real tokens seen
        # the block being processed
        self.block_starts: torch.Tensor | None = None  # (B, Lq) first tokens of chunks
        self.block_chunk_of: torch.Tensor | None = None  # (B, Lq)
        self.block_dense = True  # every query of the block sees all its closed chunks
        self.block_visible: float | None = None  # causally visible (query, key) pairs of the block, per KV head
        self.needs_adapter_queries = True  # a chunk starts in the block (or it is a prefill block)
        # per layer
        self.chunk_key_sums: list[torch.Tensor | None] = [None] * num_hidden_layers  # (B, H_kv, C, d)
        self.select_queries: list[torch.Tensor | None] = [None] * num_hidden_layers  # (B, H_kv, d)
        self.block_queries: list[torch.Tensor | None] = [None] * num_hidden_layers  # select_queries before the block
        self.decode_index: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_hidden_layers
        # per layer, what single-token steps read: the selection, then the open chunk
        self.decode_kv: list[DecodeSelection | None] = [None] * num_hidden_layers
        self.adapter_states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # filled by the adapter hooks
        self._chunk_of_buffer: torch.Tensor | None = None  # chunk_of / is_sink are views of these (room to grow)
        self._is_sink_buffer: torch.Tensor | None = None
        self.attended = 0.0
        self.visible = 0.0

    @property
    def is_croppable(self) -> bool:
        return False  # chunk sums and selections cannot be rolled back token by token

    def crop(self, max_length: int):
        raise ValueError(
            f"ChunkLLMCache cannot be cropped (crop({max_length})): the chunk keys and selections are not "
            "recorded per token. Use ChunkLLM without assisted / speculative decoding."
        )

    @property
    def kv_retention(self) -> float:
        """Fraction of visible (query, key) pairs attended since creation; 1.0 before any attention ran."""
        return self.attended / self.visible if self.visible else 1.0

    def begin_block(self, boundaries: torch.Tensor, real: torch.Tensor) -> None:
        """Assign the new tokens to chunks before the backbone sees them.

        Args:
            boundaries (`torch.BoolTensor` of shape `(B, Lq)`): tokens on which the boundary adapter fired.
            real (`torch.BoolTensor` of shape `(B, Lq)`): non-padding tokens.
        """
        batch_size, length = boundaries.shape
        device = boundaries.device
        if self.chunk_of is None:
            self.chunk_of = torch.empty(batch_size, 0, dtype=torch.long, device=device)
            self.is_sink = torch.empty(batch_size, 0, dtype=torch.bool, device=device)
            self.chunk_sizes = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
            self.current_chunk = torch.full((batch_size,), -1, dtype=torch.long, device=device)
            self.current_start = torch.zeros(batch_size, dtype=torch.long, device=device)
            self.chunk_pending = torch.ones(batch_size, dtype=torch.bool, device=device)
            self.real_seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        offset = self.chunk_of.shape[1]
        positions = torch.arange(offset, offset + length, device=device)  # (Lq,)

        # padding passes the "start a new chunk" flag on, so the first real token of a left-padded row opens chunk 0
        closes = boundaries | ~real  # (B, Lq)
        previous_closes = torch.cat([self.chunk_pending[:, None], closes[:, :-1]], dim=1)
        starts = real & previous_closes  # (B, Lq)
        chunk_of = self.current_chunk[:, None] + starts.cumsum(dim=1)
        chunk_of = chunk_of.masked_fill(~real, -1)  # (B, Lq)
        real_index = self.real_seen[:, None] + real.cumsum(dim=1) - 1
        is_sink = real & (real_index < self.sink_tokens)

        last_start = torch.where(starts, positions, -1).amax(dim=1)  # (B,)
        self.current_start = torch.where(last_start >= 0, last_start, self.current_start)
        self.current_chunk = self.current_chunk + starts.sum(dim=1)
        self.chunk_pending = closes[:, -1]
        self.real_seen = self.real_seen + real.sum(dim=1)
        self._chunk_of_buffer, self.chunk_of = _append(self._chunk_of_buffer, self.chunk_of, chunk_of, dim=1)
        self._is_sink_buffer, self.is_sink = _append(self._is_sink_buffer, self.is_sink, is_sink, dim=1)

        num_chunks = int(self.current_chunk.max().item()) + 1
        grow = num_chunks - self.chunk_sizes.shape[1]
        if grow > 0:
            self.chunk_sizes = torch.nn.functional.pad(self.chunk_sizes, (0, grow))
        self.chunk_sizes.scatter_add_(1, chunk_of.clamp(min=0), real.long())

        self.block_starts = starts
        self.block_chunk_of = chunk_of
        self.block_visible = None
        # a query in chunk c sees closed chunks 0..c-1: all of them are kept while c <= top_k + local
        self.block_dense = num_chunks - 1 <= self.top_k_chunks + self.local_chunks
        self.needs_adapter_queries = length > 1 or bool(starts.any())
        if self.needs_adapter_queries:
            self.decode_index = [None] * len(self.decode_index)
            self.decode_kv = [None] * len(self.decode_kv)

    def add_adapter_states(self, layer_idx: int, adapter_queries: torch.Tensor, adapter_keys: torch.Tensor) -> None:
        """Fold the block's adapter keys into the chunk sums and remember the query of the newest chunk start.

        Args:
            adapter_queries (`torch.Tensor` of shape `(B, H_kv, Lq, d)` or `None`): Q-adapter outputs of the block,
                `None` when `needs_adapter_queries` was False (a decoding step inside a chunk).
            adapter_keys (`torch.Tensor` of shape `(B, H_kv, Lq, d)`): K-adapter outputs of the block.
        """
        batch_size, num_kv_heads, length, dim = adapter_keys.shape
        num_chunks = self.chunk_sizes.shape[1]
        sums = self.chunk_key_sums[layer_idx]
        if sums is None:
            sums = adapter_keys.new_zeros(batch_size, num_kv_heads, num_chunks, dim)
        elif sums.shape[2] < num_chunks:
            sums = torch.nn.functional.pad(sums, (0, 0, 0, num_chunks - sums.shape[2]))
        real = (self.block_chunk_of >= 0)[:, None, :, None]  # (B, 1, Lq, 1)
        index = self.block_chunk_of.clamp(min=0)[:, None, :, None].expand(-1, num_kv_heads, -1, dim)
        self.chunk_key_sums[layer_idx] = sums.scatter_add_(2, index, adapter_keys * real)  # (B, H_kv, C, d)
        if adapter_queries is None:  # no chunk starts here: the selecting query stays
            self.block_queries[layer_idx] = self.select_queries[layer_idx]
            return

        in_block = torch.arange(length, device=adapter_keys.device)
        last_start = torch.where(self.block_starts, in_block, -1).amax(dim=1)  # (B,)
        newest = adapter_queries.gather(
            2, last_start.clamp(min=0)[:, None, None, None].expand(-1, num_kv_heads, 1, dim)
        )
        previous = self.select_queries[layer_idx]
        if previous is None:
            previous = torch.zeros_like(newest[:, :, 0])
        self.block_queries[layer_idx] = previous
        self.select_queries[layer_idx] = torch.where((last_start >= 0)[:, None, None], newest[:, :, 0], previous)

    def chunk_keys(self, layer_idx: int) -> torch.Tensor:
        """Mean adapter key of every chunk, `(B, H_kv, C, d)`."""
        sizes = self.chunk_sizes.clamp(min=1)[:, None, :, None]
        return self.chunk_key_sums[layer_idx] / sizes

    def select_chunks(self, layer_idx: int, queries: torch.Tensor, query_chunks: torch.Tensor) -> torch.Tensor:
        """The local window and the top-k older closed chunks for each query.

        Args:
            queries (`torch.Tensor` of shape `(B, H_kv, Lq, d)`): selecting adapter queries.
            query_chunks (`torch.LongTensor` of shape `(B, Lq)`): chunk of each query; chunks below it are closed.

        Returns:
            `torch.BoolTensor` of shape `(B, H_kv, Lq, C)`: the selected chunks.
        """
        chunk_keys = self.chunk_keys(layer_idx)  # (B, H_kv, C, d)
        num_chunks = chunk_keys.shape[2]
        chunk_index = torch.arange(num_chunks, device=chunk_keys.device)
        closed = chunk_index < query_chunks[:, :, None]  # (B, Lq, C)
        local = closed & (chunk_index >= query_chunks[:, :, None] - self.local_chunks)  # (B, Lq, C)
        candidates = closed & ~local
        # ties (identical chunks) go to the more recent chunk, whatever the summation order of the chunk keys
        scores = queries @ chunk_keys.transpose(-1, -2) + 1e-6 * chunk_index  # (B, H_kv, Lq, C)
        scores = scores.masked_fill(~candidates[:, None], float("-inf"))
        top = scores.topk(min(self.top_k_chunks, num_chunks), dim=-1).indices
        selected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
        return (selected & candidates[:, None]) | local[:, None]

    def block_keep_mask(self, layer_idx: int, adapter_queries: torch.Tensor) -> torch.Tensor:
        """Keys each query of the block may read: sinks, its own chunk and its chunk's selection.

        Returns:
            `torch.BoolTensor` of shape `(B, H_kv, Lq, L)` (before causal / padding masking).
        """
        _, num_kv_heads, length, dim = adapter_queries.shape
        in_block = torch.arange(length, device=adapter_queries.device)
        # the first token of each query's chunk, or -1 when the chunk started before this block
        start_index = torch.where(self.block_starts, in_block, -1).cummax(dim=1).values  # (B, Lq)
        gathered = adapter_queries.gather(
            2, start_index.clamp(min=0)[:, None, :, None].expand(-1, num_kv_heads, -1, dim)
        )
        previous = self.block_queries[layer_idx][:, :, None]  # query of the chunk open before this block
        queries = torch.where((start_index >= 0)[:, None, :, None], gathered, previous)
        selected = self.select_chunks(layer_idx, queries, self.block_chunk_of)  # (B, H_kv, Lq, C)

        key_chunks = self.chunk_of.clamp(min=0)[:, None, None, :]  # (B, 1, 1, L)
        keep = selected.gather(-1, key_chunks.expand(-1, num_kv_heads, length, -1))  # (B, H_kv, Lq, L)
        keep &= (self.chunk_of >= 0)[:, None, None, :]
        keep |= self.is_sink[:, None, None, :]
        keep |= (self.chunk_of[:, None, :] == self.block_chunk_of[:, :, None])[:, None]  # own chunk
        keep |= (self.block_chunk_of < 0)[:, None, :, None]  # padding queries keep the backbone's mask
        return keep

    def decode_positions(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached positions read by single-token steps before the open chunk, recomputed at chunk starts.

        Returns:
            `(index, valid)`, both of shape `(B, H_kv, M)`: ascending positions (padded) and which are real.
        """
        if self.decode_index[layer_idx] is None:
            queries = self.select_queries[layer_idx][:, :, None]  # (B, H_kv, 1, d)
            selected = self.select_chunks(layer_idx, queries, self.current_chunk[:, None])[:, :, 0]  # (B, H_kv, C)
            num_kv_heads, length = selected.shape[1], self.chunk_of.shape[1]
            key_chunks = self.chunk_of.clamp(min=0)[:, None, :].expand(-1, num_kv_heads, -1)
            keep = selected.gather(-1, key_chunks) & (self.chunk_of >= 0)[:, None]
            keep |= self.is_sink[:, None]
            positions = torch.arange(length, device=keep.device)
            keep &= (positions < self.current_start[:, None])[:, None]  # (B, H_kv, L), the open chunk comes apart
            # kept positions in ascending order, padded with position 0: each scattered to its rank (no sort over L)
            rank = keep.cumsum(dim=-1) - 1  # (B, H_kv, L)
            counts = rank[..., -1] + 1  # (B, H_kv)
            width = int(counts.max().item())
            index = torch.zeros(*keep.shape[:2], width + 1, dtype=torch.long, device=keep.device)
            index.scatter_(-1, torch.where(keep, rank, width), positions.expand_as(keep))
            index = index[..., :width]  # slot `width` collected the dropped positions
            valid = torch.arange(width, device=keep.device) < counts[..., None]
            self.decode_index[layer_idx] = (index, valid)
        return self.decode_index[layer_idx]

    def count(self, attended: torch.Tensor | float, num_kv_heads: int) -> None:
        """Add the block's attended (query, key) pairs; visible pairs are the real tokens up to each real query."""
        if self.block_visible is None:  # the same for every layer: computed by the first one
            real = self.block_chunk_of >= 0  # (B, Lq)
            seen_before = self.real_seen - real.sum(dim=1)  # (B,)
            visible_per_query = seen_before[:, None] + real.cumsum(dim=1)  # (B, Lq)
            self.block_visible = float((visible_per_query * real).sum().item())
        visible = self.block_visible * num_kv_heads
        self.visible += visible
        self.attended += visible if attended is None else float(attended)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for name in ("chunk_of", "is_sink", "chunk_sizes", "current_chunk", "current_start", "chunk_pending"):
            setattr(self, name, getattr(self, name).index_select(0, beam_idx))
        self.real_seen = self.real_seen.index_select(0, beam_idx)
        for layer_idx, sums in enumerate(self.chunk_key_sums):
            if sums is not None:
                self.chunk_key_sums[layer_idx] = sums.index_select(0, beam_idx)
                self.select_queries[layer_idx] = self.select_queries[layer_idx].index_select(0, beam_idx)
        self.decode_index = [None] * len(self.decode_index)
        self.decode_kv = [None] * len(self.decode_kv)


__all__ = ["ChunkLLMCache"]
