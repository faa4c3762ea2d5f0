"""Prepacked prefill against Hugging Face's padded batch prefill: time and peak memory.

32 prompts with log-normal lengths, cut from the reference corpus's validation split, are prefilled either as
one left-padded batch (what `generate` does) or packed by first-fit decreasing into rows of the longest
prompt's length (`hf_efficient.prefill.prepacked_prefill`, unpacking into a left-padded cache included).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable
from typing import Any

import torch

from .harness import BenchReport, Measurement, measure, ratio

DESCRIPTION = "prepacked prefill (FFD bin packing, block-diagonal masks) vs HF padded batch prefill: time, memory"


def lognormal_prompts(tokenizer, n: int, median: int, sigma: float, max_len: int, seed: int = 0) -> list[list[int]]:
    """`n` token-id prompts with log-normal lengths (clipped to `[4, max_len]`) cut from validation texts."""
    from hf_efficient.reference import reference_corpus

    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(n, generator=generator) * sigma + torch.log(torch.tensor(float(median)))).exp()
    lengths = lengths.round().clamp(4, max_len).long().tolist()
    stream: list[int] = []
    for document in reference_corpus("validation"):
        stream += tokenizer(document)["input_ids"]
        if len(stream) >= sum(lengths):
            break
    prompts, start = [], 0
    for length in lengths:
        prompts.append(stream[start : start + length])
        start += length
    return prompts


def padded_prefill(model, prompts: list[list[int]]):
    """HF's way: one left-padded batch of every prompt, 2-D attention mask, a fresh cache."""
    from ..compat import DynamicCache, cache_kwarg, output_cache

    width = max(len(p) for p in prompts)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    with torch.inference_mode():
        out = model(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            use_cache=True,
            logits_to_keep=1,
            **cache_kwarg(DynamicCache(config=model.config)),
        )
    return output_cache(out)


def measure_cold(fn: Callable[[], Any], repeats: int, device: str) -> Measurement:
    """`measure` after one warm-up call and a release of the allocator's cached memory.

    On CPU the harness reads resident-set growth, which memory kept by glibc from the warm-up would hide:
    `malloc_trim` hands it back first, so each method's peak is its own.
    """
    fn()
    gc.collect()
    if device == "cpu":
        with contextlib.suppress(OSError):  # not glibc: the figure may under-count
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    return measure(fn, warmup=0, repeats=repeats, device=device)


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from hf_efficient.prefill import first_fit_decreasing, prepacked_prefill
    from hf_efficient.reference import reference_model

    model, tokenizer = reference_model("target")
    model = model.to(device).eval()
    n, median, repeats = (8, 32, 1) if quick else (32, 96, 3)
    prompts = lognormal_prompts(tokenizer, n, median, sigma=0.8, max_len=512)
    lengths = [len(p) for p in prompts]
    bins = first_fit_decreasing(lengths, max(lengths))
    report = BenchReport(
        "prepack",
        "Prepacking: packed prefill vs HF padded batch prefill",
        device=device,
        setup=f"Reference `target` (fp32, sdpa), {n} validation prompts with log-normal lengths (median {median}, "
        f"sigma 0.8, min {min(lengths)}, max {max(lengths)}, total {sum(lengths)} tokens); padded batch "
        f"{n} x {max(lengths)} = {n * max(lengths)} slots vs {len(bins)} packed rows = "
        f"{len(bins) * max(lengths)} slots. Median of {repeats} runs; peak memory = "
        f"{'CUDA allocator peak' if device.startswith('cuda') else 'resident-set growth'} during the runs.",
    )
    baseline = measure_cold(lambda: padded_prefill(model, prompts), repeats, device)

    def packed():
        with torch.inference_mode():
            return prepacked_prefill(model, prompts)

    candidate = measure_cold(packed, repeats, device)
    for name, m, slots in (
        ("HF padded batch prefill", baseline, n * max(lengths)),
        ("prepacked prefill (+ unpack)", candidate, len(bins) * max(lengths)),
    ):
        report.add_row(
            {
                "method": name,
                "token_slots": slots,
                "prefill_s": m.median_s,
                "speedup": ratio(baseline.median_s, m.median_s),
                "peak_mb": (m.peak_memory_bytes or 0) / 2**20,
                "memory_ratio": ratio(m.peak_memory_bytes or 0, baseline.peak_memory_bytes or 0),
            }
        )
    speedup, memory = report.rows[1]["speedup"], report.rows[1]["memory_ratio"]
    report.note(f"prefill speedup {speedup:.2f}x (target >= 2x): {'met' if speedup >= 2 else 'missed'}")
    report.note(f"peak memory {memory:.2f}x of padded (target <= 0.6x): {'met' if memory <= 0.6 else 'missed'}")
    report.bar_plot("speedup")
    return report
