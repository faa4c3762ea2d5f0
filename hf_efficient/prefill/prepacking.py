"""Prepacking: prefill prompts of mixed lengths packed into few rows instead of padded to the longest.

1. Each prompt but its last token is bin-packed (first-fit decreasing) into rows of capacity = the longest one;
2. one forward over the packed rows, with a block-diagonal causal 4-D mask (a 4-D mask passes through
   `create_causal_mask` untouched) and position ids restarting at 0 for every prompt;
3. each prompt's key/value span is unpacked into a left-padded `DynamicCache`;
4. `generate` then runs as usual from the last prompt tokens, so greedy outputs equal per-prompt generation.

Paper: Zhao et al., "Prepacking: A Simple Method for Fast Prefilling and Increased Throughput in Large Language
Models", AISTATS 2025 (arXiv 2404.09529).

```python
>>> outputs = prepacked_generate(model, ["def f(x):", "A much longer prompt ..."], tokenizer, max_new_tokens=16)
>>> [tokenizer.decode(ids) for ids in outputs]
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..compat import CACHE_ARG_SPELLINGS, DynamicCache, cache_kwarg, output_cache

__all__ = ["PackedBatch", "first_fit_decreasing", "pack_prompts", "prepacked_generate", "prepacked_prefill"]


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each summing to at most `capacity`, by first-fit decreasing.

    Args:
        lengths (`Sequence[int]`): item sizes, each `<= capacity`.
        capacity (`int`): bin size.

    Returns:
        `list[list[int]]`: indices of the items in each bin, in packing order.
    """
    if any(length > capacity for length in lengths):
        raise ValueError(f"an item of length {max(lengths)} exceeds capacity={capacity}")
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        target = next((b for b, room in enumerate(free) if room >= lengths[index]), None)
        if target is None:
            bins.append([])
            free.append(capacity)
            target = len(bins) - 1
        bins[target].append(index)
        free[target] -= lengths[index]
    return bins


@dataclass
class PackedBatch:
    """Packed prompts ready for one forward.

    Attributes:
        input_ids (`torch.LongTensor`): `(R, C)` packed rows, right-padded with `pad_token_id`.
        position_ids (`torch.LongTensor`): `(R, C)`, restarting at 0 for every prompt.
        attention_mask (`torch.Tensor`): additive block-diagonal causal mask `(R, 1, C, C)` in the model dtype.
        row (`torch.LongTensor`): packed row of every prompt `(N,)`.
        offset (`torch.LongTensor`): start of every prompt in its row `(N,)`.
        length (`torch.LongTensor`): packed length of every prompt `(N,)`.
    """

    input_ids: torch.LongTensor
    position_ids: torch.LongTensor
    attention_mask: torch.Tensor
    row: torch.LongTensor
    offset: torch.LongTensor
    length: torch.LongTensor


def pack_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int, dtype: torch.dtype) -> PackedBatch:
    """Packs token-id lists into rows of capacity `max(len)` with a block-diagonal causal mask.

    Args:
        prompts (`Sequence[Sequence[int]]`): token ids of each prompt (possibly empty).
        pad_token_id (`int`): id used to fill the end of rows.
        dtype (`torch.dtype`): dtype of the additive mask (the model's).
    """
    lengths = [len(p) for p in prompts]
    capacity = max(max(lengths), 1)
    bins = first_fit_decreasing(lengths, capacity)
    input_ids = torch.full((len(bins), capacity), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(len(bins), capacity, dtype=torch.long)
    segment = torch.full((len(bins), capacity), -1, dtype=torch.long)  # prompt index of each packed token
    row, offset = torch.zeros(len(prompts), dtype=torch.long), torch.zeros(len(prompts), dtype=torch.long)
    for r, members in enumerate(bins):
        start = 0
        for index in members:
            n = lengths[index]
            input_ids[r, start : start + n] = torch.tensor(prompts[index], dtype=torch.long)
            position_ids[r, start : start + n] = torch.arange(n)
            segment[r, start : start + n] = index
            row[index], offset[index] = r, start
            start += n
    causal = torch.ones(capacity, capacity, dtype=torch.bool).tril()  # (C, C)
    same = segment.unsqueeze(-1) == segment.unsqueeze(-2)  # (R, C, C), padding attends to padding only
    visible = (same & causal).unsqueeze(1)  # (R, 1, C, C)
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return PackedBatch(input_ids, position_ids, mask, row, offset, torch.tensor(lengths, dtype=torch.long))


@torch.no_grad()
def prepacked_prefill(model: PreTrainedModel, prompts: Sequence[Sequence[int]]) -> DynamicCache:
    """Prefills `prompts` packed, and returns their caches unpacked and left-padded to the longest.

    Args:
        model (`PreTrainedModel`): a causal LM whose attention accepts 4-D masks (eager, sdpa).
        prompts (`Sequence[Sequence[int]]`): token ids (the tokens to prefill, e.g. all but the last).

    Returns:
        `DynamicCache`: `(N, H_kv, max_len, D)` per layer; row `i` holds prompt `i` right-aligned.
    """
    device = model.device
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    packed = pack_prompts(prompts, pad, model.dtype)
    out = model(
        input_ids=packed.input_ids.to(device),
        position_ids=packed.position_ids.to(device),
        attention_mask=packed.attention_mask.to(device),
        use_cache=True,
        logits_to_keep=1,  # the prefill logits are not used: each prompt's last token is decoded next
        **cache_kwarg(DynamicCache()),
    )
    width = int(packed.length.max())
    slots = torch.arange(width)  # (W,)
    start = width - packed.length  # (N,) first filled slot of each unpacked row
    source = (packed.offset[:, None] + slots[None, :] - start[:, None]).clamp(min=0)  # (N, W)
    filled = (slots[None, :] >= start[:, None]).to(device)  # (N, W)
    source, row = source.to(device), packed.row.to(device)
    cache = DynamicCache(config=model.config)
    for layer_idx, layer in enumerate(output_cache(out).layers):
        keys, values = layer.keys[row], layer.values[row]  # (N, H_kv, C, D): each prompt's packed row
        index = source[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])  # (N, H_kv, W, D)
        keep = filled[:, None, :, None]
        keys = keys.gather(2, index).masked_fill(~keep, 0.0)
        values = values.gather(2, index.expand(-1, -1, -1, values.shape[-1])).masked_fill(~keep, 0.0)
        cache.update(keys, values, layer_idx)
    return cache


def _token_ids(prompts: Sequence[Any], tokenizer: PreTrainedTokenizerBase | None) -> list[list[int]]:
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("text prompts need `tokenizer=`; or pass token-id lists")
        return [tokenizer(p)["input_ids"] for p in prompts]
    return [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]


@torch.no_grad()
def prepacked_generate(
    model: PreTrainedModel,
    prompts: Sequence[str] | Sequence[Sequence[int]] | Sequence[torch.Tensor],
    tokenizer: PreTrainedTokenizerBase | None = None,
    **generate_kwargs: Any,
) -> list[torch.LongTensor]:
    """`generate` for prompts of mixed lengths with a packed prefill instead of a padded one.

    Args:
        model (`PreTrainedModel`): a causal LM (eager or sdpa attention).
        prompts (`Sequence[str]` or token-id sequences): the prompts; strings need `tokenizer`.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): tokenises string prompts.
        generate_kwargs: passed to `model.generate` (`max_new_tokens`, `do_sample`, ...).

    Returns:
        `list[torch.LongTensor]`: for each prompt, its ids followed by the generated ids, cut after the first
        end-of-sequence token, as `model.generate` returns them for that prompt alone.
    """
    if not prompts:
        raise ValueError("prompts is empty")
    if any(name in generate_kwargs for name in CACHE_ARG_SPELLINGS):
        raise ValueError("prepacked_generate builds the cache itself; do not pass a cache (cache= / past_key_values=)")
    if generate_kwargs.get("num_return_sequences", 1) != 1:
        raise ValueError("prepacked_generate returns one sequence per prompt; leave num_return_sequences at 1")
    ids = _token_ids(prompts, tokenizer)
    if any(len(p) == 0 for p in ids):
        raise ValueError("every prompt needs at least one token")
    device = model.device
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    width = max(len(p) for p in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, p in enumerate(ids):  # left padding, as generate expects for decoder-only models
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention_mask[i, width - len(p) :] = 1
    generate_kwargs.setdefault("pad_token_id", pad)
    # the last token of every prompt is fed by the first decoding step, so only the rest is prefilled
    cache = prepacked_prefill(model, [p[:-1] for p in ids]) if width > 1 else None
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        **cache_kwarg(cache),
        **generate_kwargs,
    )
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    eos = generate_kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    results = []
    for i, p in enumerate(ids):
        new = sequences[i, width:].tolist()
        stop = next((j + 1 for j, t in enumerate(new) if t in eos_ids), len(new))
        results.append(torch.tensor(p + new[:stop], dtype=torch.long))
    return results
