"""The anchors later work must beat: Hugging Face's own decoding on the real models, by dtype and batch.

Plain greedy `generate` on SmolLM2-135M-Instruct and Gemma-3-270M, fp32 and bf16, batch 1 and 4 (left padding),
plus HF prompt lookup (`prompt_lookup_num_tokens`, batch 1 only in HF), on code and prose prompts cut from the
test split of the reference corpus. Every configuration runs once per interleaved round (rotating order); a
speedup is the median of the per-round ratios against fp32 batch-1 greedy on the same model and kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .harness import BenchReport, ForwardCounter, interleaved
from .prompts import corpus_prompts

DESCRIPTION = "HF plain generate (fp32/bf16, batch 1/4) and prompt lookup on SmolLM2-135M and Gemma-3-270M"

PROMPT_LOOKUP_TOKENS = 10  # HF's documented default
# frozen budgets per model: (prompts per kind, prompt tokens, new tokens, rounds, kinds)
BUDGETS = {"smollm2-135m": (4, 128, 64, 3, ("code", "prose")), "gemma3-270m": (4, 128, 64, 3, ("code",))}
BATCH = 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _configurations(models: dict[str, torch.nn.Module], with_lookup: bool) -> dict[str, tuple[Any, int, dict]]:
    """Row label -> (model, batch size, extra `generate` kwargs); the first is the baseline."""
    configurations = {}
    for batch in (1, BATCH):
        for dtype, model in models.items():
            configurations[f"greedy {dtype}, batch {batch}"] = (model, batch, {})
    if with_lookup:
        for dtype, model in models.items():
            configurations[f"prompt lookup {dtype}, batch 1"] = (
                model,
                1,
                {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS},
            )
    return configurations


def _work(model, tokenizer, prompts: list[str], batch: int, new_tokens: int, kwargs: dict) -> Callable:
    """Generate from every prompt, `batch` at a time; returns `(new tokens, target forwards)`."""
    tokenizer.padding_side = "left"
    chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    device = model.device
    encoded = [tokenizer(chunk, return_tensors="pt", padding=True).to(device) for chunk in chunks]

    def run() -> tuple[int, int]:
        generated = 0
        with torch.inference_mode(), ForwardCounter(model) as counter:
            for inputs in encoded:
                out = model.generate(
                    **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs
                )
                generated += (out.shape[-1] - inputs["input_ids"].shape[-1]) * out.shape[0]
        return generated, counter.calls

    return run


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from hf_efficient.reference import reference_model

    report = BenchReport(
        "baseline",
        "Baseline: Hugging Face decoding on the real models, by dtype and batch",
        device=device,
        setup="; ".join(
            f"{name}: {n} test prompts of {length} tokens per kind ({', '.join(kinds)}), {new} new tokens each "
            f"(EOS suppressed), {rounds} interleaved rounds"
            for name, (n, length, new, rounds, kinds) in BUDGETS.items()
        )
        + f". Batch {BATCH} uses left padding. speedup = median over rounds of (fp32 batch-1 greedy time) / "
        "(configuration time) on the same prompts; mean_accepted = new tokens per forward per row."
        + (" QUICK smoke run." if quick else ""),
    )
    for name, (n_prompts, prompt_tokens, new_tokens, rounds, kinds) in BUDGETS.items():
        if quick:
            n_prompts, new_tokens, rounds, kinds = BATCH, 4, 1, kinds[:1]
        models = {dtype: reference_model(name, dtype=d)[0].to(device).eval() for dtype, d in DTYPES.items()}
        tokenizer = reference_model(name)[1]
        for kind in kinds:
            prompts = corpus_prompts(tokenizer, kind, n_prompts, "test", prompt_tokens=prompt_tokens)
            configurations = _configurations(models, with_lookup=name.startswith("smollm2"))
            works = {
                label: _work(model, tokenizer, prompts, batch, new_tokens, kwargs)
                for label, (model, batch, kwargs) in configurations.items()
            }
            timing = interleaved(works, rounds=rounds, warmup=1, device=device)
            baseline = next(iter(works))
            for label, (_, batch, _) in configurations.items():
                generated, forwards = timing.results[label][-1]
                report.add_row(
                    {
                        "model": name,
                        "kind": kind,
                        "configuration": label,
                        "tokens_per_s": generated / timing.median_s(label),
                        "speedup": timing.speedup(label, baseline),
                        "mean_accepted": generated / (forwards * batch),
                    }
                )
        if quick:
            break
    report.bar_plot("speedup", group="model", label="configuration", where=lambda row: row["kind"] == "code")
    report.note("speedup above 1: faster than fp32 batch-1 greedy on the same model, prompts and new tokens.")
    return report
