"""The attention function our caches see their calls through: queries, score rows, per-slot masks, padding.

An eviction cache keeps, per batch row and KV head, a non-contiguous subset of past tokens, which the standard
mask contract (a contiguous suffix of positions, see `masking_utils._preprocess_mask_arguments`) cannot
describe, and scored eviction needs attention rows that SDPA never materialises; a quantised cache must know
which tokens are padding before it compresses them. So every layer of our caches hands itself to this function
through the key tensor its `update` returns; the function lets the layer attend (`MeasuredLayer.attend`: its own
mask, score rows, padding) and falls back to plain SDPA for any other cache. It is registered under
`ATTENTION_NAME` in both `AttentionInterface` and `AttentionMaskInterface` (without the latter,
`create_causal_mask` silently returns `None`); the mask interface is plain `sdpa_mask`, so a model switched to it
computes exactly what SDPA computes.

Nobody needs to switch a model to it: while one of our caches is being filled, each layer's `update` routes the
attention call that follows it here (`AttentionRoute`) and the call routes it back, so the model's own setting
(`"sdpa"` or `"eager"`) is what every other cache, `generate` call and speculative strategy sees. Opting in for
good is allowed and changes nothing else:

```python
>>> model.set_attn_implementation("hfe_kv")   # optional: SDPA for every other cache
```
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedConfig

from ..compat import AttentionInterface, AttentionMaskInterface, sdpa_attention_forward, sdpa_mask

__all__ = [
    "ATTENTION_NAME",
    "HANDOFF_ATTRIBUTE",
    "ROUTABLE_ATTENTION",
    "AttentionRoute",
    "compressed_attention_forward",
    "grouped_attention",
    "grouped_logits",
    "masked_softmax",
    "new_token_visibility",
]

ATTENTION_NAME = "hfe_kv"
HANDOFF_ATTRIBUTE = "_hfe_eviction_layer"
ROUTABLE_ATTENTION = ("sdpa", "eager", ATTENTION_NAME)  # settings whose masks the eviction layers can read


def grouped_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention logits per KV group without `repeat_kv`.

    Args:
        query (`torch.Tensor`): `(B, H, q, D)`.
        key (`torch.Tensor`): `(B, H_kv, L, D)`.
        scaling (`float`): the softmax scale.

    Returns:
        `torch.Tensor`: float32 logits `(B, H_kv, G, q, L)` with `G = H // H_kv`.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.float().reshape(batch, kv_heads, heads // kv_heads * q_len, head_dim)  # (B, H_kv, G*q, D)
    logits = grouped @ key.float().transpose(-1, -2) * scaling  # (B, H_kv, G*q, L): keys are never expanded
    return logits.view(batch, kv_heads, heads // kv_heads, q_len, -1)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where `mask` is True; rows with no visible slot give zeros, not NaN."""
    probs = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return probs.nan_to_num(0.0)


def grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """SDPA with a per-KV-head boolean mask and no `repeat_kv`: the G query heads of a group become G query blocks.

    Args:
        query (`torch.Tensor`): `(B, H, q, D)`.
        key (`torch.Tensor`): `(B, H_kv, L, D)`.
        value (`torch.Tensor`): `(B, H_kv, L, D)`.
        mask (`torch.Tensor`): visibility `(B, H_kv, q, L)`.
        scaling (`float`): the softmax scale.

    Returns:
        `torch.Tensor`: `(B, q, H, D)`, the layout attention functions return.
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * q_len, head_dim)  # (B, H_kv, G*q, D)
    expanded = mask.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(batch, kv_heads, groups * q_len, -1)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=expanded, scale=scaling)  # (B, H_kv, G*q, D)
    out = out.nan_to_num(0.0)  # a query that sees nothing (a padding row) gives zeros
    return out.view(batch, heads, q_len, -1).transpose(1, 2).contiguous()


def new_token_visibility(attention_mask: torch.Tensor | None, q_len: int, batch: int) -> torch.Tensor:
    """Visibility among a forward's `q_len` new tokens `(B, 1, q, q)` (causal + padding) from its mask.

    Args:
        attention_mask (`torch.Tensor`, *optional*): the boolean or additive (0 = visible) 4-D mask `(B, 1, q, L)`;
            `None` means causal without padding.
    """
    if attention_mask is None:
        causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
        return causal.expand(batch, 1, q_len, q_len)
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0
    return attention_mask[..., -q_len:]


def compressed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The `"hfe_kv"` attention function: delegates to the eviction layer that produced `key`, else to SDPA.

    Args:
        module (`torch.nn.Module`): the attention module.
        query (`torch.Tensor`): `(B, H, q, D)`.
        key (`torch.Tensor`): `(B, H_kv, L, D)`, as returned by the cache.
        value (`torch.Tensor`): `(B, H_kv, L, D)`.
        attention_mask (`torch.Tensor`, *optional*): the boolean mask built by `sdpa_mask` `(B, 1, q, L)`.
        scaling (`float`, *optional*): softmax scale, defaults to `D ** -0.5`.
        dropout (`float`, *optional*, defaults to 0.0): attention dropout (training only).
    """
    layer = getattr(key, HANDOFF_ATTRIBUTE, None)
    if layer is None:  # another cache; a route left open by a layer filled by hand closes here
        route = _OPEN_ROUTES.pop(id(getattr(module, "config", None)), None)
        if route is not None:
            route.back()
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    try:
        return layer.attend(module, query, key, value, attention_mask, scaling=scaling, **kwargs), None
    finally:
        if layer.route is not None:
            layer.route.back()


AttentionInterface.register(ATTENTION_NAME, compressed_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class AttentionRoute:
    """Routes one attention call of a model to `"hfe_kv"` and back, leaving the model's setting as it was.

    A decoder layer looks its attention function up in `config._attn_implementation` right after `cache.update`
    returns; our cache layers call `to_scoring()` in `update` and `compressed_attention_forward` calls `back()`
    once the layer has attended, so the switch lasts one attention call. A model whose setting already is
    `"hfe_kv"` (opted in) is left alone.

    Args:
        config (`PreTrainedConfig`): the config the model's attention modules read (`config=model.config`).
        cache_name (`str`): for error messages.
        required (`bool`): whether the cache cannot work without the routed call (eviction) or only learns the
            padding from it (quantised caches, which then run unrouted on other attention implementations).
    """

    def __init__(self, config: PreTrainedConfig, cache_name: str, required: bool):
        self.config = config.get_text_config(decoder=True)
        self.cache_name, self.required = cache_name, required
        self.user_setting: str | None = None  # the model's own setting while routed

    def to_scoring(self) -> bool:
        """Route the next attention call to `"hfe_kv"`; whether it was routed.

        Raises:
            `ValueError`: when `required` and the model's attention masks cannot be read (not sdpa / eager).
        """
        current = self.config._attn_implementation
        if current not in ROUTABLE_ATTENTION:
            if not self.required:
                return False
            raise ValueError(
                f"{self.cache_name} needs a model with attn_implementation 'sdpa' or 'eager', got {current!r}: "
                "load it with attn_implementation='sdpa'."
            )
        if current != ATTENTION_NAME:
            self.user_setting = current
            self.config._attn_implementation = ATTENTION_NAME
            _OPEN_ROUTES[id(self.config)] = self
        return True

    def back(self) -> None:
        """Restore the model's own setting (no-op when the model opted in to `"hfe_kv"`)."""
        if self.user_setting is not None:
            self.config._attn_implementation, self.user_setting = self.user_setting, None
            _OPEN_ROUTES.pop(id(self.config), None)


_OPEN_ROUTES: dict[int, AttentionRoute] = {}  # id(config) -> the route that switched it, until it switches back
