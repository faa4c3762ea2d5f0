"""Speculative drafters against Hugging Face's decoding strategies on the reference target.

Plain `generate` (greedy, or sampling at T=0.8), HF prompt lookup and HF assisted generation (reference
drafter; both batch 1 only in HF) against `TokenRecycling` and `DraftModel` (dynamic tree, adaptive depth),
on code and prose prompts from the validation split, batch 1 and 4. Reports tokens/s, the speedup over the
plain strategy of the same decoding and batch in the same run, and mean accepted tokens (new tokens per
target forward per row). A distilled drafter (`recipes/distill_drafter.py`) is included when it was built.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .harness import BenchReport, ForwardCounter, measure, ratio
from .prompts import validation_prompts

DESCRIPTION = "TokenRecycling / DraftModel vs HF greedy, prompt lookup and assisted generation (reference target)"

PROMPT_LOOKUP_TOKENS = 10  # as in the baseline benchmark
WARMUP_DOCUMENTS = 8  # other validation documents TokenRecycling's state is learned on before the measured runs
SAMPLING = {"do_sample": True, "temperature": 0.8}


def distilled_drafter_path() -> Path:
    """Where `recipes/distill_drafter.py` saves the distilled reference drafter by default (keyed by both the
    student's and the teacher's recipe, so a retrained target or drafter is distilled again)."""
    from hf_efficient.reference import cache_dir, reference_key

    return cache_dir() / f"drafter-distilled-{reference_key('drafter')}-from-{reference_key('target')}"


def _methods(drafters: dict[str, torch.nn.Module], batch: int, recycling) -> dict[str, dict[str, Any]]:
    """`generate` keyword arguments per method; `recycling` is a warmed `TokenRecycling`, copied for every run."""
    from hf_efficient.speculative import DraftModel

    methods: dict[str, dict[str, Any]] = {"HF plain": {}}
    if batch == 1:  # HF's speculative paths refuse batch > 1
        methods["HF prompt lookup"] = {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS}
        for name, drafter in drafters.items():
            methods[f"HF assisted ({name})"] = {"assistant_model": drafter}
    methods["TokenRecycling"] = {"custom_generate": recycling}
    for name, drafter in drafters.items():
        methods[f"DraftModel ({name})"] = {"custom_generate": DraftModel(drafter)}
    return methods


def _work(model, tokenizer, prompts: list[str], batch: int, device: str, max_new_tokens: int, kwargs) -> Callable:
    from hf_efficient.speculative import TokenRecycling

    tokenizer.padding_side = "left"
    chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    encoded = [tokenizer(chunk, return_tensors="pt", padding=True).to(device) for chunk in chunks]
    recycling = kwargs.get("custom_generate")
    recycling = recycling if isinstance(recycling, TokenRecycling) else None

    def run() -> int:
        new_tokens = 0
        # every run starts from the same recycling state: repeats must not recycle the measured outputs themselves
        run_kwargs = kwargs | ({"custom_generate": copy.deepcopy(recycling)} if recycling is not None else {})
        with torch.inference_mode():
            for inputs in encoded:
                out = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **run_kwargs
                )
                new_tokens += (out.shape[-1] - inputs["input_ids"].shape[-1]) * out.shape[0]
        return new_tokens

    return run


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from transformers import AutoModelForCausalLM

    from hf_efficient.reference import reference_model

    model, tokenizer = reference_model("target")
    drafter, _ = reference_model("drafter")
    drafters = {"drafter": drafter.to(device).eval()}
    if (distilled_drafter_path() / "config.json").is_file():
        drafters["distilled"] = AutoModelForCausalLM.from_pretrained(distilled_drafter_path()).to(device).eval()
    model = model.to(device).eval()
    n_prompts, max_new_tokens, repeats = (1, 16, 1) if quick else (4, 64, 3)
    batches = (1,) if quick else (1, 4)
    decodings = {"greedy": {"do_sample": False}} | ({} if quick else {"sample T=0.8": SAMPLING})
    report = BenchReport(
        "speculative",
        "Speculative drafters vs Hugging Face decoding on the reference target",
        device=device,
        setup=f"Reference `target`; drafters: {', '.join(drafters)}; {n_prompts} validation prompts of 128 tokens "
        f"per kind, {max_new_tokens} new tokens each (EOS suppressed), batches {batches}, median of {repeats} "
        f"runs after one warm-up run. TokenRecycling starts every run from the state it learned generating from "
        f"{WARMUP_DOCUMENTS} other validation documents of the kind (as a server that has seen other requests), "
        "never from the measured prompts' own outputs.",
    )
    for kind in ("code", "prose"):
        prompts = validation_prompts(tokenizer, kind, n_prompts + WARMUP_DOCUMENTS)
        prompts, warmup_prompts = prompts[:n_prompts], prompts[n_prompts:]
        for decoding, decoding_kwargs in decodings.items():
            recycling = _warmed_recycling(model, tokenizer, warmup_prompts, device, max_new_tokens, decoding_kwargs)
            for batch in batches:
                plain_s = None
                for method, kwargs in _methods(drafters, batch, recycling).items():
                    work = _work(model, tokenizer, prompts, batch, device, max_new_tokens, kwargs | decoding_kwargs)
                    timing = measure(work, warmup=1, repeats=repeats, device=device)
                    with ForwardCounter(model) as counter:
                        new_tokens = work()
                    plain_s = plain_s or timing.median_s
                    rows_per_forward = min(batch, len(prompts))
                    report.add_row(
                        {
                            "kind": kind,
                            "decoding": decoding,
                            "batch": batch,
                            "method": method,
                            "tokens_per_s": timing.result / timing.median_s,
                            "speedup": ratio(plain_s, timing.median_s),
                            "mean_accepted": new_tokens / (counter.calls * rows_per_forward),
                        }
                    )
    _note_targets(report)
    report.bar_plot("speedup", group="kind")
    report.note("speedup = plain generate time / method time for the same kind, decoding and batch, same process.")
    report.note("mean_accepted = new tokens per target forward per row (plain decoding: 1).")
    return report


def _warmed_recycling(model, tokenizer, prompts: list[str], device: str, max_new_tokens: int, decoding_kwargs):
    """A `TokenRecycling` whose state was learned generating from `prompts` one at a time."""
    from hf_efficient.speculative import TokenRecycling

    recycling = TokenRecycling()
    with torch.inference_mode():
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt").to(device)
            model.generate(**inputs, max_new_tokens=max_new_tokens, custom_generate=recycling, **decoding_kwargs)
    return recycling


def _note_targets(report: BenchReport) -> None:
    """Derived ratios the issue sets targets for (TokenRecycling vs prompt lookup, DraftModel vs HF assisted)."""
    table = {(r["kind"], r["decoding"], r["batch"], r["method"]): r for r in report.rows}
    for (kind, decoding, batch, method), row in table.items():
        if method == "TokenRecycling" and (lookup := table.get((kind, decoding, batch, "HF prompt lookup"))):
            report.note(
                f"{kind}, {decoding}, batch {batch}: TokenRecycling / HF prompt lookup = "
                f"{ratio(row['tokens_per_s'], lookup['tokens_per_s']):.2f}x"
            )
        if method.startswith("DraftModel (") and (
            assisted := table.get((kind, decoding, batch, method.replace("DraftModel", "HF assisted")))
        ):
            report.note(
                f"{kind}, {decoding}, batch {batch}: {method} / HF assisted with the same drafter = "
                f"{ratio(row['tokens_per_s'], assisted['tokens_per_s']):.2f}x"
            )
