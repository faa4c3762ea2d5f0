"""Prepacked prefill against Hugging Face's padded batch prefill on SmolLM2-135M: time and peak memory.

32 prompts with log-normal lengths, cut from the reference corpus's test split, are prefilled by
SmolLM2-135M-Instruct (bf16) either as one left-padded batch (what `generate` does) or packed by first-fit
decreasing into rows of the longest prompt's length (`hf_efficient.prefill.prepacked_prefill`, unpacking into a
left-padded cache included). Both run in interleaved rounds (`harness.interleaved`); the speedup is the median of
the per-round ratios. Peak memory comes from one separate call of each, after a warm-up.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable
from typing import Any

import torch

from .harness import BenchReport, Measurement, interleaved, measure, ratio

DESCRIPTION = "prepacked prefill (FFD bin packing, block-diagonal masks) vs HF padded batch prefill on SmolLM2-135M"

MODEL, DTYPE = "smollm2-135m", torch.bfloat16
SPLIT = "test"
N_PROMPTS, MEDIAN_TOKENS, SIGMA, MAX_TOKENS = 32, 96, 0.8, 512  # log-normal prompt lengths, clipped to [4, 512]
ROUNDS = 3  # interleaved timing rounds
QUICK_N_PROMPTS, QUICK_MEDIAN_TOKENS = 8, 32  # `quick=True`: a seconds-long smoke run


def lognormal_prompts(
    tokenizer, n: int, median: int, sigma: float, max_len: int, seed: int = 0, split: str = SPLIT
) -> list[list[int]]:
    """`n` token-id prompts with log-normal lengths (clipped to `[4, max_len]`), consecutive slices of the
    tokenized documents of `split` (code, then prose), in corpus order."""
    from hf_efficient.reference import reference_corpus

    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(n, generator=generator) * sigma + torch.log(torch.tensor(float(median)))).exp()
    lengths = lengths.round().clamp(4, max_len).long().tolist()
    stream: list[int] = []
    for document in reference_corpus(split):
        stream += tokenizer(document)["input_ids"]
        if len(stream) >= sum(lengths):
            break
    if len(stream) < sum(lengths):
        raise ValueError(f"the {split} split has {len(stream)} tokens; the prompts need {sum(lengths)}")
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

    model, tokenizer = reference_model(MODEL, dtype=DTYPE)
    model = model.to(device).eval()
    n, median = (QUICK_N_PROMPTS, QUICK_MEDIAN_TOKENS) if quick else (N_PROMPTS, MEDIAN_TOKENS)
    prompts = lognormal_prompts(tokenizer, n, median, sigma=SIGMA, max_len=MAX_TOKENS)
    lengths = [len(p) for p in prompts]
    bins = first_fit_decreasing(lengths, max(lengths))
    report = BenchReport(
        "prepack",
        "Prepacking: packed prefill vs HF padded batch prefill (SmolLM2-135M)",
        device=device,
        setup=f"SmolLM2-135M-Instruct ({str(DTYPE).removeprefix('torch.')}, {model.config._attn_implementation}), "
        f"{n} prompts cut from the {SPLIT} split{' (quick run)' if quick else ''} with log-normal lengths (median "
        f"{median}, sigma {SIGMA}, clipped to [4, {MAX_TOKENS}]: min {min(lengths)}, max {max(lengths)}, total "
        f"{sum(lengths)} tokens); padded batch {n} x {max(lengths)} = {n * max(lengths)} slots vs {len(bins)} "
        f"packed rows = {len(bins) * max(lengths)} slots. Time: median of {ROUNDS} interleaved rounds (order "
        "rotated each round); speedup = median of the per-round ratios. Peak memory: "
        f"{'CUDA allocator peak' if device.startswith('cuda') else 'resident-set growth'} during one separate "
        "call of each method, after a warm-up call.",
    )

    def padded():
        return padded_prefill(model, prompts)

    def packed():
        with torch.inference_mode():
            return prepacked_prefill(model, prompts)

    # memory first: each method's warm-up and measured call also warm it up for the timing rounds
    memory = {"padded": measure_cold(padded, 1, device), "packed": measure_cold(packed, 1, device)}
    timing = interleaved({"padded": padded, "packed": packed}, rounds=ROUNDS, warmup=0, device=device)
    baseline_bytes = memory["padded"].peak_memory_bytes or 0
    for key, name, slots in (
        ("padded", "HF padded batch prefill", n * max(lengths)),
        ("packed", "prepacked prefill (+ unpack)", len(bins) * max(lengths)),
    ):
        peak = memory[key].peak_memory_bytes or 0
        report.add_row(
            {
                "method": name,
                "token_slots": slots,
                "prefill_s": timing.median_s(key),
                "speedup": timing.speedup(key, "padded"),
                "peak_mb": peak / 2**20,
                "memory_ratio": ratio(peak, baseline_bytes),
            }
        )
    speedup, memory_ratio = report.rows[1]["speedup"], report.rows[1]["memory_ratio"]
    report.note(f"prefill speedup {speedup:.2f}x (target >= 2x): {'met' if speedup >= 2 else 'missed'}")
    report.note(
        f"peak memory {memory_ratio:.2f}x of padded (target <= 0.6x): {'met' if memory_ratio <= 0.6 else 'missed'}"
    )
    report.bar_plot("speedup")
    return report
