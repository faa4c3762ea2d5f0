"""SnapKV: compress the prompt once, keeping the keys its last queries (the observation window) attend to.

After prefill, the attention of the last `window` prompt queries is summed over the window and the query heads
of each KV group, smoothed by average pooling (`kernel`, so neighbours of an important token survive with it),
and each KV head keeps its window plus the `budget - window` best-scored earlier tokens. Decoding then appends
normally. The window rows are recomputed from the queries, so no attention matrix is ever materialised beyond
`(B, H, window, L)`.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024 (arXiv 2404.14469).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedConfig

from .eviction import EvictionCache, EvictionLayer
from .scoring import grouped_logits, masked_softmax

__all__ = ["SnapKVCache", "SnapKVLayer"]


class SnapKVLayer(EvictionLayer):
    """Compresses the prompt to `budget` slots per KV head at the end of prefill; decoding appends.

    Rolling back decoded tokens is exact (they are never evicted), so the layer is croppable; eviction only
    ever touches the prompt, so past recording does not defer it.

    Args:
        budget (`int`): prompt slots kept per row and KV head (window included).
        window (`int`): observation window (last prompt tokens), always kept.
        kernel (`int`): odd average-pooling width.
    """

    is_croppable = True

    def __init__(self, budget: int, window: int, kernel: int):
        super().__init__(budget, recent=window)
        self.window, self.kernel = window, kernel
        self.prefilled = False
        self.window_scores: torch.Tensor | None = None

    @property
    def needs_queries(self) -> bool:
        return not self.prefilled

    def observe(self, query: torch.Tensor, mask: torch.Tensor, scaling: float) -> None:
        self.prefilled = True
        batch, kv_heads, length, _ = self.keys.shape
        if length <= self.budget:
            return
        rows = min(self.window, query.shape[-2])
        logits = grouped_logits(query[..., -rows:, :], self.keys, scaling)  # (B, H_kv, G, w, L)
        scores = masked_softmax(logits, mask[:, :, None, -rows:, :]).sum(dim=(2, 3))  # (B, H_kv, L)
        pooled = F.avg_pool1d(scores.view(batch * kv_heads, 1, length), self.kernel, 1, self.kernel // 2)
        self.window_scores = pooled.view(batch, kv_heads, length)

    def should_evict(self) -> bool:
        return self.window_scores is not None

    def score(self) -> torch.Tensor:
        return self.window_scores

    def on_evict(self, keep: torch.Tensor) -> None:
        self.window_scores = None

    def activate_past_recording(self, **kwargs) -> None:  # 5.25 passes recurrent_states_to_keep=
        """Nothing to defer: eviction happens once, on the prompt, which speculative decoding never rolls back."""

    def reset(self) -> None:
        super().reset()
        self.prefilled, self.window_scores = False, None


class SnapKVCache(EvictionCache):
    """SnapKV cache: the prompt is compressed once to `budget` tokens per KV head, chosen by the observation window.

    Args:
        config (`PreTrainedConfig`): the model's own config (`model.config`); while the cache is filled its attention
            calls are routed to `"hfe_kv"`, and the model's setting is left as it was (see `scoring.py`).
        budget (`int`, *optional*, defaults to 1024): prompt tokens kept per sequence and KV head.
        window (`int`, *optional*, defaults to 32): observation window, always kept.
        kernel (`int`, *optional*, defaults to 7): odd pooling width.
        sliding_layers (`str`, *optional*, defaults to `"window"`): on sliding-window layers, the window when it
            holds less than the budget (`"window"`), or the policy over the whole history (`"full"`, for speculative
            decoding past the window).

    Example:

    ```python
    >>> cache = SnapKVCache(config=model.config, budget=256, window=32, kernel=7)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=64)
    ```
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        budget: int = 1024,
        window: int = 32,
        kernel: int = 7,
        sliding_layers: str = "window",
    ):
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        if budget <= window:
            raise ValueError(f"budget={budget} must exceed window={window} to keep any earlier prompt token")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel={kernel} must be a positive odd number (pooling keeps the length)")
        super().__init__(config, lambda: SnapKVLayer(budget, window, kernel), sliding_layers)
