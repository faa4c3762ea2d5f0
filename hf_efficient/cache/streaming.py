"""StreamingLLM: attention sinks plus a sliding window of recent tokens.

The first `sink_tokens` real tokens of each row (the "attention sinks" that absorb excess attention) and the
last `window` tokens are kept; the middle is dropped. Keys keep the RoPE rotation of their original position
and new tokens continue from the logical length, as in HF's sliding-window layers (no re-rotation).

Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024 (arXiv 2309.17453).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig

from .eviction import EvictionCache, EvictionLayer

__all__ = ["StreamingCache", "StreamingLayer"]


class StreamingLayer(EvictionLayer):
    """Keeps the first `sink_tokens` real tokens and the last `window` slots.

    Eviction depends on positions only, so a rollback is exact once `activate_past_recording()` defers it.

    Args:
        sink_tokens (`int`): attention sinks per row.
        window (`int`): recent slots.
    """

    is_croppable = True

    def __init__(self, sink_tokens: int, window: int):
        super().__init__(budget=sink_tokens + window, recent=window)
        self.sink_tokens = sink_tokens

    def score(self) -> torch.Tensor:
        valid = self.positions >= 0  # (B, H_kv, L)
        return (valid & (valid.cumsum(dim=-1) <= self.sink_tokens)).float()  # 1 for the first real tokens


class StreamingCache(EvictionCache):
    """StreamingLLM cache: `sink_tokens` attention sinks plus a window of the `window` most recent tokens.

    Args:
        config (`PreTrainedConfig`): the model's own config (`model.config`); while the cache is filled its attention
            calls are routed to `"hfe_kv"`, and the model's setting is left as it was (see `scoring.py`).
        sink_tokens (`int`, *optional*, defaults to 4): first tokens always kept.
        window (`int`, *optional*, defaults to 252): most recent tokens kept.
        sliding_layers (`str`, *optional*, defaults to `"window"`): on sliding-window layers, the window when it
            holds less than the budget (`"window"`), or the policy over the whole history (`"full"`, for speculative
            decoding past the window).

    Example:

    ```python
    >>> cache = StreamingCache(config=model.config, sink_tokens=4, window=60)
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=200)   # never holds more than 64
    ```
    """

    def __init__(
        self, config: PreTrainedConfig, sink_tokens: int = 4, window: int = 252, sliding_layers: str = "window"
    ):
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens={sink_tokens} must be >= 0")
        if window < 1:
            raise ValueError(f"window={window} must be >= 1 (the budget is sink_tokens + window)")
        super().__init__(config, lambda: StreamingLayer(sink_tokens, window), sliding_layers)
