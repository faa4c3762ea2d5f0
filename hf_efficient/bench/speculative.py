"""Speculative decoding on the real SmolLM2-135M-Instruct, per Spec-Bench category, against plain `generate`.

The chat prompt set (`bench/chat_prompts.py`: six categories, 2 validation + 8 test conversations each) goes
through the chat template. Methods: plain `generate` (the baseline, same dtype and decoding), HF prompt lookup
and `TokenRecycling`. Every prompt is one interleaved round (each method once, in rotating order); a speedup is
the median of the per-round ratios of new tokens per second. EOS is allowed, as in real use.

Frozen before measuring: the budgets below, and TokenRecycling's tree, picked among `TREE_CANDIDATES` on the
validation conversations only. TokenRecycling's state is learned on the validation conversations and every
measured run starts from a copy of it (a server that has seen other requests, never the measured answer).

Settings: bf16 greedy on all 48 test prompts (the per-category table); fp32 greedy, bf16 and fp32 sampling on
`SECONDARY_PER_CATEGORY` test prompts per category; batch 4 with left padding, bf16 greedy. `identical` is the
share of prompts whose greedy output equals plain `generate`'s in the same dtype (fp32: must be 1; bf16: ties
between near-equal logits may resolve differently when many tokens are verified at once).
No same-tokenizer drafter exists for SmolLM2 yet, so `DraftModel` and HF assisted generation are not run here.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from typing import Any

import torch

from .chat_prompts import CATEGORIES, chat_inputs, chat_prompts
from .harness import BenchReport, ForwardCounter, interleaved

DESCRIPTION = "TokenRecycling vs plain generate and HF prompt lookup on SmolLM2-135M-Instruct, per chat category"

MODEL = "smollm2-135m"
MAX_NEW_TOKENS = 128
PROMPT_LOOKUP_TOKENS = 10  # HF's documented default
TREE_CANDIDATES: tuple[int | str, ...] = (3, 4, 8, "auto")  # TokenRecycling tree sizes tried on validation
SAMPLING = {"do_sample": True, "temperature": 0.8}
SECONDARY_PER_CATEGORY = 2  # test prompts per category for fp32 and sampling
BATCH = 4
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# frozen before measuring: SmolLM2's drafter, cut from its first 3 layers + its last, distilled on its chat answers
DRAFTER_TRAINING = dict(layers=4, steps=150, batch_size=8, prompt_tokens=64, completion_tokens=32, vocab_size=8192)


def distilled_drafter(quick: bool = False) -> str:
    """SmolLM2's same-tokenizer drafter (`recipes/distill_drafter.py --student-layers`), distilled into the reference
    cache on first use."""
    from hf_efficient.bench.chunkllm import _cached_training
    from hf_efficient.recipes import distill_drafter
    from hf_efficient.reference.real import real_model_path
    from hf_efficient.speculative import layer_drafter, vocab_trim

    setting = dict(DRAFTER_TRAINING, steps=2, batch_size=4, completion_tokens=4) if quick else DRAFTER_TRAINING
    teacher = real_model_path(MODEL)
    args = [f"--teacher={teacher}", f"--student-layers={setting['layers']}", "--chat", "--teacher-dtype=bfloat16"]
    args += [f"--max-steps={setting['steps']}", f"--batch-size={setting['batch_size']}", "--learning-rate=1e-3"]
    args += [f"--prompt-tokens={setting['prompt_tokens']}", f"--completion-tokens={setting['completion_tokens']}"]
    args += [f"--vocab-size={setting['vocab_size']}", f"--num-prompts={setting['steps'] * setting['batch_size']}"]
    sources = (layer_drafter.__file__, vocab_trim.__file__)
    return str(_cached_training(f"drafter-{teacher.name}", distill_drafter, args, *sources))


def _encode(tokenizer, conversations: list[list[dict[str, str]]], device: str) -> dict[str, torch.Tensor]:
    """A left-padded batch of chat-templated conversations on `device`."""
    return chat_inputs(tokenizer, conversations).to(device)


def _generation(model, inputs: dict[str, torch.Tensor], kwargs: dict[str, Any], recycling=None) -> Callable:
    """One `generate` call; returns `(output ids, new tokens, target forwards)`. TokenRecycling runs from a copy of
    `recycling`, so every run starts from the same learned state."""

    def run() -> tuple[torch.Tensor, int, int]:
        extra = {"custom_generate": copy.deepcopy(recycling)} if recycling is not None else {}
        with torch.inference_mode(), ForwardCounter(model) as counter:
            out = model.generate(**inputs, **kwargs, **extra)
        new = out[:, inputs["input_ids"].shape[1] :]
        if model.generation_config.eos_token_id is not None:  # count up to each row's EOS
            eos = torch.tensor(model.generation_config.eos_token_id, device=new.device).flatten()
            done = torch.isin(new, eos).long().cumsum(-1)
            new_tokens = int(((done == 0) | ((done == 1) & torch.isin(new, eos))).sum())
        else:
            new_tokens = new.numel()
        return out, new_tokens, counter.calls

    return run


def _methods(batch: int, recycling, extra: dict | None = None) -> dict[str, tuple[dict[str, Any], Any]]:
    """`generate` kwargs and strategy state per method (HF prompt lookup refuses batch > 1); `extra` adds
    `{name: strategy}` methods."""
    methods: dict[str, tuple[dict[str, Any], Any]] = {"plain generate": ({}, None)}
    if batch == 1:
        methods["HF prompt lookup"] = ({"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS}, None)
    methods["TokenRecycling"] = ({}, recycling)
    methods.update({name: ({}, strategy) for name, strategy in (extra or {}).items()})
    return methods


def _rounds(
    model, batches: list[dict[str, torch.Tensor]], decoding: dict[str, Any], recycling, extra: dict | None = None
) -> dict[str, Any]:
    """Every batch is one interleaved round of every method; per method: per-round speedups over plain, tokens/s,
    tokens per target forward per row, and the share of rows whose output equals plain's."""
    per_method: dict[str, dict[str, list]] = {}
    for inputs in batches:
        methods = _methods(inputs["input_ids"].shape[0], recycling, extra)
        works = {name: _generation(model, inputs, decoding | kw, state) for name, (kw, state) in methods.items()}
        timing = interleaved(works, rounds=1, warmup=0)
        plain_out = timing.results["plain generate"][0][0]
        for name in works:
            out, new_tokens, forwards = timing.results[name][0]
            stats = per_method.setdefault(name, {"speedup": [], "tps": [], "accepted": [], "identical": []})
            stats["speedup"] += timing.per_round(name, "plain generate", amount=lambda r: r[1])
            stats["tps"].append(new_tokens / timing.times_s[name][0])
            stats["accepted"].append(new_tokens / (forwards * out.shape[0]))
            same_shape = out.shape == plain_out.shape
            stats["identical"] += [same_shape and torch.equal(a, b) for a, b in zip(out, plain_out)]
    return per_method


def _validation(quick: bool) -> list[list[dict[str, str]]]:
    """The validation conversations: TokenRecycling learns its state and the tree is chosen on them only."""
    conversations = [c for category in CATEGORIES for c in chat_prompts(category, "validation")]
    return conversations[:2] if quick else conversations


def _warmed(model, tokenizer, device: str, decoding: dict[str, Any], tree: int | str, quick: bool):
    """A `TokenRecycling` whose state was learned answering the validation conversations (never the test ones)."""
    from hf_efficient.speculative import TokenRecycling

    recycling = TokenRecycling(tree=tree)
    with torch.inference_mode():
        for conversation in _validation(quick):
            model.generate(**_encode(tokenizer, [conversation], device), custom_generate=recycling, **decoding)
    return recycling


def _pick_tree(model, tokenizer, device: str, greedy: dict[str, Any], quick: bool) -> tuple[int | str, dict]:
    """The tree size with the best median speedup over plain greedy on the validation conversations (the state
    is learned on the same conversations first, so this slightly favours recycling; the test split is unseen)."""
    batches = [_encode(tokenizer, [c], device) for c in _validation(quick)]
    recycling = _warmed(model, tokenizer, device, greedy, TREE_CANDIDATES[0], quick)
    scores = {}
    for tree in TREE_CANDIDATES[:1] if quick else TREE_CANDIDATES:
        candidate = copy.deepcopy(recycling)
        candidate.tree = tree
        rounds = _rounds(model, batches, greedy, candidate)
        scores[tree] = statistics.median(rounds["TokenRecycling"]["speedup"])
    return max(scores, key=scores.get), scores


def _add_rows(report: BenchReport, setting: dict[str, Any], per_method: dict[str, dict[str, list]], greedy: bool):
    for name, stats in per_method.items():
        report.add_row(
            setting
            | {
                "method": name,
                "prompts": len(stats["identical"]),
                "tokens_per_s": statistics.median(stats["tps"]),
                "speedup": statistics.median(stats["speedup"]),
                "mean_accepted": statistics.mean(stats["accepted"]),
                "identical": f"{sum(stats['identical'])}/{len(stats['identical'])}" if greedy else "sampled",
            }
        )


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from hf_efficient.reference import reference_model

    models = {name: reference_model(MODEL, dtype=dtype)[0].to(device).eval() for name, dtype in DTYPES.items()}
    tokenizer = reference_model(MODEL)[1]
    budget = {"max_new_tokens": 16 if quick else MAX_NEW_TOKENS}
    greedy, sampling = {"do_sample": False} | budget, SAMPLING | budget
    tree, tree_scores = _pick_tree(models["bf16"], tokenizer, device, greedy, quick)
    per_category = 1 if quick else None
    secondary = 1 if quick else SECONDARY_PER_CATEGORY
    categories = CATEGORIES[:2] if quick else CATEGORIES
    report = BenchReport(
        "speculative",
        "Speculative decoding on SmolLM2-135M-Instruct: chat prompts per Spec-Bench category",
        device=device,
        setup=f"SmolLM2-135M-Instruct (real, converted from its GGUF file), batch 1 unless stated; the project's "
        f"chat prompt set, test split (8 conversations per category), through the chat template; up to "
        f"{MAX_NEW_TOKENS} new tokens, EOS allowed. Each prompt is one interleaved round of every method (rotating "
        "order); speedup = median over rounds of (method tokens/s) / (plain tokens/s) in the same dtype and "
        f"decoding; tokens_per_s = median over prompts. HF prompt lookup: {PROMPT_LOOKUP_TOKENS} tokens. "
        f"TokenRecycling: tree {tree!r}, chosen on the validation split before measuring, state learned on the "
        "validation conversations. bf16 greedy on every test prompt; fp32 and sampling (T=0.8) on "
        f"{SECONDARY_PER_CATEGORY} test prompts per category; batch {BATCH} (left padding) bf16 greedy.",
    )
    report.note(
        "tree chosen on validation (median speedup over plain, bf16 greedy): "
        + ", ".join(f"{t!r} {s:.2f}x" for t, s in tree_scores.items())
    )
    recycling = _warmed(models["bf16"], tokenizer, device, greedy, tree, quick)
    overall: dict[str, dict[str, list]] = {}
    for category in categories:
        batches = [_encode(tokenizer, [c], device) for c in chat_prompts(category, "test")[:per_category]]
        per_method = _rounds(models["bf16"], batches, greedy, recycling)
        _add_rows(report, {"setting": "bf16 greedy", "category": category}, per_method, greedy=True)
        for name, stats in per_method.items():
            for key, values in stats.items():
                overall.setdefault(name, {}).setdefault(key, []).extend(values)
    _add_rows(report, {"setting": "bf16 greedy", "category": "all"}, overall, greedy=True)
    subset = [c for category in categories for c in chat_prompts(category, "test")[:secondary]]
    for dtype in DTYPES:
        for decoding_name, decoding in (("greedy", greedy), ("sample T=0.8", sampling)):
            if (dtype, decoding_name) == ("bf16", "greedy"):
                continue
            state = _warmed(models[dtype], tokenizer, device, decoding, tree, quick)
            batches = [_encode(tokenizer, [c], device) for c in subset]
            per_method = _rounds(models[dtype], batches, decoding, state)
            setting = {"setting": f"{dtype} {decoding_name}", "category": "all"}
            _add_rows(report, setting, per_method, greedy=decoding_name == "greedy")
    chunks = [subset[i : i + BATCH] for i in range(0, len(subset) - BATCH + 1, BATCH)] or [subset]
    batches = [_encode(tokenizer, chunk, device) for chunk in chunks]
    per_method = _rounds(models["bf16"], batches, greedy, recycling)
    _add_rows(report, {"setting": f"bf16 greedy, batch {BATCH}", "category": "all"}, per_method, greedy=True)
    report.bar_plot("speedup", group="category", where=lambda row: row["setting"] == "bf16 greedy")
    report.note("speedup: 1.00 = as fast as plain generate in the same dtype and decoding; below 1 is a slowdown.")
    report.note(
        "mean_accepted = new tokens per target forward per row (plain decoding: 1 at batch 1; at batch 4 rows that "
        "stop early at EOS count as idle, so plain is below 1 too)."
    )
    return report
