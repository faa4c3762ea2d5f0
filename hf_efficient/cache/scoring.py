"""The attention function eviction caches need: it sees the queries, records score rows and masks kept slots.

An eviction cache keeps, per batch row and KV head, a non-contiguous subset of past tokens, which the standard
mask contract (a contiguous suffix of positions, see `masking_utils._preprocess_mask_arguments`) cannot
describe, and scored eviction needs attention rows that SDPA never materialises. So every eviction layer hands
itself to this function through the key tensor its `update` returns; the function then lets the layer build
its own mask (per-slot validity from the padding seen at insertion) and record the score rows it needs, and
falls back to plain SDPA for any other cache. It is registered under `ATTENTION_NAME` in both
`AttentionInterface` and `AttentionMaskInterface` (without the latter, `create_causal_mask` silently returns
`None`); the mask interface is plain `sdpa_mask`, so a model switched to it computes exactly what SDPA computes.

```python
>>> model.set_attn_implementation("hfe_kv")   # done for you by the eviction caches' constructors
```
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedConfig

from ..compat import AttentionInterface, AttentionMaskInterface, sdpa_attention_forward, sdpa_mask

__all__ = [
    "ATTENTION_NAME",
    "HANDOFF_ATTRIBUTE",
    "compressed_attention_forward",
    "grouped_attention",
    "grouped_logits",
    "masked_softmax",
    "use_compressed_attention",
]

logger = logging.getLogger(__name__)

ATTENTION_NAME = "hfe_kv"
HANDOFF_ATTRIBUTE = "_hfe_eviction_layer"


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
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return layer.attend(module, query, key, value, attention_mask, scaling=scaling, **kwargs), None


AttentionInterface.register(ATTENTION_NAME, compressed_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_compressed_attention(config: PreTrainedConfig, cache_name: str) -> None:
    """Switches `config` (shared with the model) to the `"hfe_kv"` attention that eviction caches need.

    `"hfe_kv"` computes exactly what SDPA computes for every other cache, so the switch is harmless for later
    calls; it is logged once per config.
    """
    current = config._attn_implementation
    if current == ATTENTION_NAME:
        return
    logger.info(
        "%s needs the queries: switching attn_implementation %r -> %r (SDPA for other caches)",
        cache_name,
        current,
        ATTENTION_NAME,
    )
    config._attn_implementation = ATTENTION_NAME
