"""Scored eviction by accumulated attention: H2O heavy hitters and Keyformer's Gumbel-softmax scores.

Every forward adds, for each kept slot, the attention it receives from the new queries (summed over the query
heads of its KV group, no `repeat_kv`); eviction keeps the `recent` newest slots plus the slots with the
largest accumulated score. Keyformer replaces the softmax by a Gumbel softmax with a temperature that grows
every step, which regularises the choice of key tokens.

Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023 (arXiv 2306.14048); Adnan et al., "Keyformer: KV Cache Reduction through Key Tokens Selection for
Efficient Generative Inference", MLSys 2024 (arXiv 2403.09054).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig

from .base import tensor_nbytes
from .eviction import EvictionCache, EvictionLayer
from .scoring import grouped_logits, masked_softmax

__all__ = ["HeavyHitterCache", "HeavyHitterLayer", "KeyformerLayer"]

_QUERY_CHUNK = 256  # score rows computed at once: bounds prefill memory to (B, H, 256, L)


class HeavyHitterLayer(EvictionLayer):
    """H2O: keep the `recent` newest slots and the heaviest accumulated-attention slots, per KV head.

    Args:
        budget (`int`): slots kept per row and KV head.
        recent (`int`): newest slots always kept.
    """

    needs_queries = True

    def __init__(self, budget: int, recent: int):
        super().__init__(budget, recent)
        self.scores: torch.Tensor | None = None  # accumulated attention (B, H_kv, L), float32

    def score_rows(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention rows `(B, H_kv, G, q, L)` from logits and visibility (broadcastable)."""
        return masked_softmax(logits, mask)

    def observe(self, query: torch.Tensor, mask: torch.Tensor, scaling: float) -> None:
        length = self.keys.shape[-2]
        seen = 0 if self.scores is None else self.scores.shape[-1]
        scores = torch.zeros(*self.keys.shape[:2], length - seen, device=self.device)
        self.scores = scores if self.scores is None else torch.cat([self.scores, scores], dim=-1)
        for start in range(0, query.shape[-2], _QUERY_CHUNK):
            rows = slice(start, start + _QUERY_CHUNK)
            logits = grouped_logits(query[..., rows, :], self.keys, scaling)  # (B, H_kv, G, c, L)
            self.scores += self.score_rows(logits, mask[:, :, None, rows, :]).sum(dim=(2, 3))

    def score(self) -> torch.Tensor:
        return self.scores

    def on_evict(self, keep: torch.Tensor) -> None:
        self.scores = self.scores.gather(-1, keep)

    def select_rows(self, index: torch.Tensor) -> None:
        super().select_rows(index)
        self.scores = None if self.scores is None else self.scores[index]

    def reset(self) -> None:
        super().reset()
        self.scores = None

    def nbytes(self) -> int:
        return super().nbytes() + tensor_nbytes(self.scores)


class KeyformerLayer(HeavyHitterLayer):
    """Keyformer: accumulates a Gumbel softmax of the logits, temperature `tau_init + step * tau_delta`.

    The noise comes from a generator seeded with `seed`, so a run is reproducible.

    Args:
        budget (`int`): slots kept per row and KV head.
        recent (`int`): newest slots always kept.
        tau_init (`float`): initial temperature.
        tau_delta (`float`): temperature increase per forward.
        seed (`int`): seed of the Gumbel noise.
    """

    def __init__(self, budget: int, recent: int, tau_init: float, tau_delta: float, seed: int):
        super().__init__(budget, recent)
        self.tau_init, self.tau_delta, self.seed = tau_init, tau_delta, seed
        self.step = 0
        self.generator: torch.Generator | None = None

    def score_rows(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        uniform = torch.rand(logits.shape, generator=self.generator, device=logits.device).clamp(1e-10, 1 - 1e-7)
        gumbel = -torch.log(-torch.log(uniform))  # standard Gumbel noise
        tau = self.tau_init + self.step * self.tau_delta
        return masked_softmax((logits + gumbel) / tau, mask)

    def observe(self, query: torch.Tensor, mask: torch.Tensor, scaling: float) -> None:
        super().observe(query, mask, scaling)
        self.step += 1

    def reset(self) -> None:
        super().reset()
        self.step, self.generator = 0, None


class HeavyHitterCache(EvictionCache):
    """Scored-eviction cache (H2O or Keyformer): `recent` newest tokens plus the heaviest hitters, per KV head.

    Accumulated scores cannot be rolled back, so the cache is not croppable (`is_croppable=False`).

    Args:
        config (`PreTrainedConfig`): the model's own config (`model.config`); while the cache is filled its attention
            calls are routed to `"hfe_kv"`, and the model's setting is left as it was (see `scoring.py`).
        budget (`int`, *optional*, defaults to 256): tokens kept per sequence and KV head.
        recent (`int`, *optional*): newest tokens always kept; defaults to `budget // 2` (H2O's equal split).
        score (`str`, *optional*, defaults to `"h2o"`): `"h2o"` (accumulated softmax) or `"keyformer"`.
        tau_init (`float`, *optional*, defaults to 1.0): Keyformer's initial temperature.
        tau_delta (`float`, *optional*, defaults to 0.01): Keyformer's temperature increase per step.
        seed (`int`, *optional*, defaults to 0): Keyformer's noise seed.
        sliding_layers (`str`, *optional*, defaults to `"window"`): on sliding-window layers, the window when it
            holds less than the budget (`"window"`), or the policy over the whole history (`"full"`, for speculative
            decoding past the window).

    Example:

    ```python
    >>> cache = HeavyHitterCache(config=model.config, budget=128, recent=64, score="keyformer")
    >>> out = model.generate(**inputs, cache=cache, max_new_tokens=256)
    ```
    """

    SCORES = ("h2o", "keyformer")

    def __init__(
        self,
        config: PreTrainedConfig,
        budget: int = 256,
        recent: int | None = None,
        score: str = "h2o",
        tau_init: float = 1.0,
        tau_delta: float = 0.01,
        seed: int = 0,
        sliding_layers: str = "window",
    ):
        recent = budget // 2 if recent is None else recent
        if budget < 1:
            raise ValueError(f"budget={budget} must be >= 1")
        if not 0 <= recent < budget:
            raise ValueError(f"recent={recent} must be in [0, budget={budget}) to leave room for heavy hitters")
        if score not in self.SCORES:
            raise ValueError(f"score={score!r} must be one of {self.SCORES}")
        if tau_init <= 0:
            raise ValueError(f"tau_init={tau_init} must be > 0")
        if score == "h2o":
            super().__init__(config, lambda: HeavyHitterLayer(budget, recent), sliding_layers)
        else:
            super().__init__(config, lambda: KeyformerLayer(budget, recent, tau_init, tau_delta, seed), sliding_layers)
