"""Hierarchical generation cache for H-Net: one state per stage, nested like the model.

Each routed stage keeps its encoder and decoder stack states (KV / recurrent), the router state (last encoder
output, whether the row has history) and the de-chunking EMA state (last smoothed value); its inner state is the
next stage, down to the main network's stack state. Every tensor covers the full batch, so an inner network can
be stepped on only the rows whose byte closed a chunk: gather those rows, step, scatter back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Cache

from .layers_hnet import HNetStackCache

__all__ = ["HNetCache", "HNetStageCache"]


class HNetStageCache:
    """State of one routed stage (see module docstring); `inner` is the next stage's state."""

    def __init__(
        self,
        encoder: HNetStackCache,
        inner: HNetStageCache | HNetStackCache,
        decoder: HNetStackCache,
        hidden_size: int,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.encoder, self.inner, self.decoder = encoder, inner, decoder
        self.last_hidden = torch.zeros(batch_size, hidden_size, device=device, dtype=dtype)  # (B, D) router
        self.has_history = torch.zeros(batch_size, dtype=torch.bool, device=device)  # (B,)
        self.last_value = torch.zeros(batch_size, hidden_size, device=device, dtype=dtype)  # (B, D) EMA

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for part in (self.encoder, self.inner, self.decoder):
            part.apply_(fn)
        self.last_hidden, self.has_history, self.last_value = map(
            fn, (self.last_hidden, self.has_history, self.last_value)
        )


class HNetCache(Cache):
    """`Cache` of [`HNetForCausalLM`]: the nested per-stage states, created on the first forward.

    `get_seq_length()` counts byte slots processed (padding included), which is what `generate` slices
    `input_ids` with. Not croppable (recurrent states cannot roll back), so assisted decoding is refused.

    Example:

    ```python
    >>> cache = HNetCache()
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=20)
    ```
    """

    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.root: HNetStageCache | HNetStackCache | None = None
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return -1 if self.root is None else self._count().shape[0]

    @property
    def is_initialized(self) -> bool:
        return self.root is not None

    def _count(self) -> torch.Tensor:
        node = self.root
        return node.encoder.count if isinstance(node, HNetStageCache) else node.count

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.root is not None:
            self.root.apply_(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        self.root, self.seen_tokens = None, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            f"HNetCache cannot crop({tokens_to_remove}): recurrent and EMA states do not roll back; "
            "use plain generation instead of assisted/speculative decoding with H-Net"
        )
