"""The anchors later work must beat: Hugging Face's own decoding strategies on the reference target.

Plain greedy `generate`, prompt lookup (`prompt_lookup_num_tokens`) and assisted generation with the
reference drafter, batch 1 (HF's speculative paths are batch-1 only), on code and prose prompts from the
validation split. Reports tokens/s, the speedup over greedy in the same run, and mean accepted tokens
(new tokens per target forward; greedy is 1 by definition).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .harness import BenchReport, ForwardCounter, measure, ratio
from .prompts import validation_prompts

DESCRIPTION = "HF greedy vs HF prompt lookup vs HF assisted generation (reference drafter), code and prose"

PROMPT_LOOKUP_TOKENS = 10  # HF's documented default range is 10 (code) to 3-4 (chat); 10 suits code


def _strategies(drafter: torch.nn.Module) -> dict[str, dict[str, Any]]:
    return {
        "HF greedy": {},
        "HF prompt lookup": {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS},
        "HF assisted (drafter)": {"assistant_model": drafter},
    }


def _generate_all(model, tokenizer, prompts: list[str], device: str, max_new_tokens: int, **kwargs) -> Callable:
    encoded = [tokenizer(p, return_tensors="pt").to(device) for p in prompts]

    def run() -> int:
        new_tokens = 0
        with torch.inference_mode():
            for inputs in encoded:
                out = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, **kwargs
                )
                new_tokens += out.shape[-1] - inputs["input_ids"].shape[-1]
        return new_tokens

    return run


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from hf_efficient.reference import reference_model

    model, tokenizer = reference_model("target")
    drafter, _ = reference_model("drafter")
    model, drafter = model.to(device).eval(), drafter.to(device).eval()
    n_prompts, max_new_tokens, repeats = (1, 16, 1) if quick else (4, 64, 3)
    report = BenchReport(
        "baseline",
        "Baseline: Hugging Face decoding strategies on the reference target",
        device=device,
        setup=f"Reference `target` (drafter: reference `drafter`), batch 1, greedy, {n_prompts} validation prompts "
        f"of 128 tokens per kind, {max_new_tokens} new tokens each (EOS suppressed), median of {repeats} runs.",
    )
    for kind in ("code", "prose"):
        prompts = validation_prompts(tokenizer, kind, n_prompts)
        greedy_s = None
        for method, kwargs in _strategies(drafter).items():
            work = _generate_all(model, tokenizer, prompts, device, max_new_tokens, **kwargs)
            timing = measure(work, warmup=1, repeats=repeats, device=device)
            with ForwardCounter(model) as counter:
                new_tokens = work()
            greedy_s = greedy_s or timing.median_s
            report.add_row(
                {
                    "kind": kind,
                    "method": method,
                    "tokens_per_s": timing.result / timing.median_s,
                    "speedup": ratio(greedy_s, timing.median_s),
                    "mean_accepted": new_tokens / counter.calls,
                    "peak_mem_MB": (timing.peak_memory_bytes or 0) / 2**20,
                }
            )
    report.bar_plot("speedup", group="kind")
    report.note("speedup = greedy time / method time, same process; mean_accepted = new tokens per target forward.")
    return report
