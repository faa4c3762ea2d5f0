"""Hierarchical byte models against a BPE Llama baseline on the reference corpus.

H-Net 1-stage, H-Net 2-stage, HAT and the BPE Llama baseline (reference tokenizer) are trained by
`recipes/train_byte_lm.py` on the same packed bytes per step for the same number of steps, then compared on
validation bits per byte (code and prose), bits per byte under character noise (case flips, swaps, typos), the
learned compression, and greedy generation bytes/s at batch 1 and 8.

Noise is measured two ways. `bpb_noise_rise` scores the noised text itself, so it includes the noise's own
information (a perfect model of clean text still pays for every typo). `bpb_ctx_noise_rise` scores clean
continuations after a noised context against the same continuations after the clean context: only the damage
the noise does to the model's reading of its context. Forward FLOPs per byte are estimated from
the parameters each byte pays for (outer stages every byte, inner stages once per chunk/word/token).
"""

from __future__ import annotations

import math
import random
import statistics
import tempfile
import time

import torch

from .harness import BenchReport, ratio, synchronize

DESCRIPTION = "H-Net 1/2-stage and HAT vs a BPE Llama: bits/byte (code, prose, noisy), compression, generation bytes/s"

MODELS = ("bpe", "hnet", "hnet2", "hat")
NOISE_RATE = 0.05
CONTEXT_CHARS = 128  # context and continuation length of the context-noise pairs (fits the 256-byte training rows)


def add_noise(text: str, rate: float = NOISE_RATE, seed: int = 0) -> str:
    """Character noise: at each position with probability `rate`, flip case, swap with the next character, or
    replace a letter with a random lowercase letter (a typo)."""
    rng = random.Random(seed)
    chars, i = list(text), 0
    while i < len(chars):
        if rng.random() < rate:
            op = rng.choice(("case", "swap", "typo"))
            if op == "case" and chars[i].isalpha():
                chars[i] = chars[i].swapcase()
            elif op == "swap" and i + 1 < len(chars):
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
                i += 1
            elif op == "typo" and chars[i].isalpha():
                chars[i] = rng.choice("abcdefghijklmnopqrstuvwxyz")
        i += 1
    return "".join(chars)


def context_pairs(texts: list[str], span: int = CONTEXT_CHARS) -> list[tuple[str, str]]:
    """Consecutive (context, continuation) pairs of `span` characters each, taken every `2 * span` characters."""
    return [
        (text[start - span : start], text[start : start + span])
        for text in texts
        for start in range(span, len(text) - span + 1, 2 * span)
    ]


def _bytes_per_unit(model, name: str, tokenizer, texts: list[str], device: str) -> list[float]:
    """Mean bytes per chunk at each stage (H-Net), per word (HAT) or per token (BPE) on `texts`."""
    if name == "bpe":
        n_tokens = sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts)
        return [sum(len(t.encode()) for t in texts) / max(1, n_tokens)]
    totals = None
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([list(text.encode())], device=device)
            comp = model(input_ids=ids, use_cache=False).compression
            totals = [c for c in comp] if totals is None else [a + c for a, c in zip(totals, comp)]
    per_stage = [c / len(texts) for c in totals]
    return [math.prod(per_stage[: s + 1]) for s in range(len(per_stage))]  # bytes per unit of stage s


def flops_per_byte(model, name: str, bytes_per_unit: list[float]) -> float:
    """Forward FLOPs per byte ~ 2 x the parameters each byte pays for (embedding lookups excluded)."""
    total = 0.0
    for pname, p in model.named_parameters():
        if "embed" in pname:
            continue
        share = 1.0
        if name.startswith("hnet"):
            stage = pname.split(".").count("inner")
            share = 1.0 / bytes_per_unit[stage - 1] if stage else 1.0
        elif (name == "hat" and pname.startswith(("backbone.", "word_in", "word_out"))) or name == "bpe":
            share = 1.0 / bytes_per_unit[0]
        total += 2 * p.numel() * share
    return total


def _generation(
    model, tokenizer, prompts: list[str], new_bytes: int, unit_bytes: float, device: str, repeats: int = 7
) -> tuple[float, float, float]:
    """Greedy generation bytes/s at batch 1 and 8 and the batch-8 / batch-1 ratio.

    The two batch sizes alternate for `repeats` rounds after a warm-up round, so that load on a shared machine hits
    both alike; returns the median rates and the median of the per-round ratios.
    """
    new = max(1, round(new_bytes / unit_bytes))  # BPE: tokens covering the same bytes
    inputs = {
        batch: tokenizer(prompts[:batch], padding=True, padding_side="left", return_tensors="pt").to(device)
        for batch in (1, 8)
    }

    def bytes_per_second(batch: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs[batch], max_new_tokens=new, min_new_tokens=new, do_sample=False)
        synchronize(device)
        return batch * (out.shape[1] - inputs[batch].input_ids.shape[1]) * unit_bytes / (time.perf_counter() - start)

    rates: dict[int, list[float]] = {1: [], 8: []}
    for round_index in range(repeats + 1):
        for batch in rates:
            rate = bytes_per_second(batch)
            if round_index:  # the first round warms up
                rates[batch].append(rate)
    speedup = statistics.median(b8 / b1 for b1, b8 in zip(rates[1], rates[8]))
    return statistics.median(rates[1]), statistics.median(rates[8]), speedup


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from hf_efficient.eval import bits_per_byte, continuation_bits_per_byte
    from hf_efficient.recipes.train_byte_lm import train_byte_lm
    from hf_efficient.reference import reference_corpus

    steps, seq_len, batch_size, n_eval, eval_chars, new_bytes = (
        (2, 64, 2, 2, 256, 8) if quick else (1000, 256, 8, 12, 2048, 64)
    )
    report = BenchReport(
        "byte",
        "Hierarchical byte models vs a BPE Llama on the reference corpus",
        device=device,
        setup=f"Each model trained {steps} steps x {batch_size} x {seq_len} bytes (same bytes per step) on the "
        f"reference train split by recipes/train_byte_lm.py; {n_eval} validation documents per kind, first "
        f"{eval_chars} characters ({CONTEXT_CHARS}-character context/continuation pairs for context noise); noise "
        f"rate {NOISE_RATE}; generation: greedy, {new_bytes} new bytes, batch 1 and 8 alternating, median of 7 "
        "rounds (batch8_speedup: median of the per-round ratios).",
    )
    evals = {
        kind: [t[:eval_chars] for t in reference_corpus("validation", kind)[:n_eval]] for kind in ("code", "prose")
    }
    noisy = [add_noise(t, seed=i) for i, t in enumerate(evals["prose"] + evals["code"])]
    clean = evals["prose"] + evals["code"]
    pairs = context_pairs(clean)
    noisy_pairs = [(add_noise(context, seed=i), continuation) for i, (context, continuation) in enumerate(pairs)]
    prompts = [t[:64] for t in clean][:8] * 8
    rows = {}
    for name in MODELS:
        with tempfile.TemporaryDirectory() as out_dir:
            start = time.perf_counter()
            model, tokenizer, _ = train_byte_lm(
                name, out_dir, max_steps=steps, seq_len=seq_len, batch_size=batch_size, save_steps=10**9, resume=False
            )
            train_s = time.perf_counter() - start
        model = model.to(device).eval()
        units = _bytes_per_unit(model, name, tokenizer, clean, device)
        bpb = {k: bits_per_byte(model, tokenizer, v, batch_size=4) for k, v in evals.items()}
        bpb_clean = bits_per_byte(model, tokenizer, clean, batch_size=4)
        bpb_noisy = bits_per_byte(model, tokenizer, noisy, batch_size=4)
        bpb_after_clean = continuation_bits_per_byte(model, tokenizer, pairs, batch_size=8)
        bpb_after_noisy = continuation_bits_per_byte(model, tokenizer, noisy_pairs, batch_size=8)
        unit = units[0] if name == "bpe" else 1.0
        b1, b8, speedup = _generation(model, tokenizer, prompts, new_bytes, unit, device)
        rows[name] = {
            "model": name,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "fwd_MFLOPs_per_byte": flops_per_byte(model, name, units) / 1e6,
            "train_s": train_s,
            "bpb_code": bpb["code"],
            "bpb_prose": bpb["prose"],
            "bpb_noise_rise": bpb_noisy - bpb_clean,
            "bpb_ctx_noise_rise": bpb_after_noisy - bpb_after_clean,
            "bytes_per_unit": " / ".join(f"{u:.2f}" for u in units),
            "gen_bytes_per_s_b1": b1,
            "gen_bytes_per_s_b8": b8,
            "batch8_speedup": speedup,
        }
    base = rows["bpe"]
    for row in rows.values():
        row["bpb_prose_vs_bpe"] = ratio(row["bpb_prose"], base["bpb_prose"])
        for key in ("noise_rise", "ctx_noise_rise"):
            base_rise = base[f"bpb_{key}"]
            row[f"{key}_vs_bpe"] = ratio(row[f"bpb_{key}"], base_rise) if base_rise else math.nan
        report.add_row(row)
    report.bar_plot("bpb_prose", label="model")
    report.note(
        "bytes_per_unit: bytes per token (bpe), per word (hat), per chunk of each stage (hnet); "
        "bpb_noise_rise: bits/byte on noised minus clean validation text; bpb_ctx_noise_rise: bits/byte of clean "
        f"{CONTEXT_CHARS}-character continuations after a noised minus a clean {CONTEXT_CHARS}-character context; "
        "*_vs_bpe: ratio to the BPE row; "
        "fwd_MFLOPs_per_byte counts 2 x parameters per byte (attention score FLOPs ignored)."
    )
    return report
