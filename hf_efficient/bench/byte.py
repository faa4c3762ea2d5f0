"""Hierarchical byte models against a BPE Llama baseline on the reference corpus.

H-Net 1-stage, H-Net 2-stage, HAT and the BPE Llama baseline (reference tokenizer) are trained by
`recipes/train_byte_lm.py` on the same packed bytes per step for the same number of steps, then compared on
validation bits per byte (code and prose), bits per byte under character noise (case flips, swaps, typos), the
learned compression, and greedy generation bytes/s at batch 1 and 8. Forward FLOPs per byte are estimated from
the parameters each byte pays for (outer stages every byte, inner stages once per chunk/word/token).
"""

from __future__ import annotations

import math
import random
import tempfile
import time

import torch

from .harness import BenchReport, measure, ratio

DESCRIPTION = "H-Net 1/2-stage and HAT vs a BPE Llama: bits/byte (code, prose, noisy), compression, generation bytes/s"

MODELS = ("bpe", "hnet", "hnet2", "hat")
NOISE_RATE = 0.05


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


def _generation(model, tokenizer, prompts: list[str], batch: int, new_bytes: int, unit_bytes: float, device: str):
    enc = tokenizer(prompts[:batch], padding=True, padding_side="left", return_tensors="pt").to(device)
    new = max(1, round(new_bytes / unit_bytes))  # BPE: tokens covering the same bytes

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return out.shape[1] - enc.input_ids.shape[1]

    timing = measure(run, warmup=1, repeats=5, device=device)
    return batch * timing.result * unit_bytes / timing.median_s


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from hf_efficient.eval import bits_per_byte
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
        f"{eval_chars} characters; noise rate {NOISE_RATE}; generation: greedy, {new_bytes} new bytes.",
    )
    evals = {
        kind: [t[:eval_chars] for t in reference_corpus("validation", kind)[:n_eval]] for kind in ("code", "prose")
    }
    noisy = [add_noise(t, seed=i) for i, t in enumerate(evals["prose"] + evals["code"])]
    clean = evals["prose"] + evals["code"]
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
        unit = units[0] if name == "bpe" else 1.0
        b1 = _generation(model, tokenizer, prompts, 1, new_bytes, unit, device)
        b8 = _generation(model, tokenizer, prompts, 8, new_bytes, unit, device)
        rows[name] = {
            "model": name,
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "fwd_MFLOPs_per_byte": flops_per_byte(model, name, units) / 1e6,
            "train_s": train_s,
            "bpb_code": bpb["code"],
            "bpb_prose": bpb["prose"],
            "bpb_noise_rise": bpb_noisy - bpb_clean,
            "bytes_per_unit": " / ".join(f"{u:.2f}" for u in units),
            "gen_bytes_per_s_b1": b1,
            "gen_bytes_per_s_b8": b8,
            "batch8_speedup": ratio(b8, b1),
        }
    base = rows["bpe"]
    for row in rows.values():
        row["bpb_prose_vs_bpe"] = ratio(row["bpb_prose"], base["bpb_prose"])
        row["noise_rise_vs_bpe"] = (
            ratio(row["bpb_noise_rise"], base["bpb_noise_rise"]) if base["bpb_noise_rise"] else math.nan
        )
        report.add_row(row)
    report.bar_plot("bpb_prose", label="model")
    report.note(
        "bytes_per_unit: bytes per token (bpe), per word (hat), per chunk of each stage (hnet); "
        "bpb_noise_rise: bits/byte on noised minus clean validation text; *_vs_bpe: ratio to the BPE row; "
        "fwd_MFLOPs_per_byte counts 2 x parameters per byte (attention score FLOPs ignored)."
    )
    return report
