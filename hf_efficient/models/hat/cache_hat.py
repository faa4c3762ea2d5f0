"""Hierarchical generation cache for HAT: byte encoder/decoder KV, word-backbone KV, the decoder's word memory,
the encoder states of the still-open word and the word-splitter state; every tensor covers the full batch so the
backbone can step only the rows whose byte closed a word (gather -> step -> scatter)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Cache

from .cache_slots import KVSlots
from .layers_hat import HATStackCache
from .splitter_hat import WordSplitState

__all__ = ["HATCache", "HATState"]


class HATState:
    """Per-level state of a batch (see module docstring); created by `HATForCausalLM` on the first forward."""

    def __init__(self, model, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.encoder: HATStackCache = model.encoder.new_cache(batch_size, device, dtype)
        self.backbone: HATStackCache = model.backbone.new_cache(batch_size, device, dtype)
        self.decoder: HATStackCache = model.decoder.new_cache(batch_size, device, dtype)
        heads, head_dim = (
            model.config.num_attention_heads,
            model.config.hidden_size // model.config.num_attention_heads,
        )
        # slot j of the decoder's word memory holds word j's backbone output, projected per decoder layer
        self.memory = KVSlots(model.config.decoder_layers, batch_size, heads, head_dim, device, dtype)
        self.memory_count = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) words closed
        self.buffer = torch.zeros(batch_size, 0, model.config.hidden_size, device=device, dtype=dtype)  # open word
        self.buffer_len = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.words = torch.zeros(batch_size, dtype=torch.long, device=device)  # words started so far
        self.split = WordSplitState(batch_size, device)

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for part in (self.encoder, self.backbone, self.decoder, self.memory, self.split):
            part.apply_(fn)
        self.memory_count, self.buffer, self.buffer_len, self.words = map(
            fn, (self.memory_count, self.buffer, self.buffer_len, self.words)
        )


class HATCache(Cache):
    """`Cache` of [`HATForCausalLM`]. `get_seq_length()` counts byte slots processed (padding included).

    Not croppable (the word buffer and splitter state cannot roll back), so assisted decoding is refused.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.state: HATState | None = None
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.words.shape[0]

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.state is not None:
            self.state.apply_(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.state, self.seen_tokens = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            f"HATCache cannot crop({tokens_to_remove}): the word buffer and splitter state do not roll back; "
            "use plain generation instead of assisted/speculative decoding with HAT"
        )
