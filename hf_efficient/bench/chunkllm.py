"""ChunkLLM vs full attention, StreamingLLM and SnapKV at the same KV budget on long validation documents.

Protocol (all methods, same texts): a long context is prefilled into the method's cache, then the continuation is
scored (perplexity) or generated. ChunkLLM's adapters are trained once on the reference target with
`recipes/train_chunkllm.py` and cached; the KV budget of StreamingLLM and SnapKV is set to ChunkLLM's measured
retention on the continuation. Retrieval plants `NAME = "value"` lines early in the context and asks for one of
them at the end; decode speed is measured at the longest context, prefill excluded.
"""

from __future__ import annotations

import math
import random
import statistics
import string
import time
from pathlib import Path

import torch

from .harness import BenchReport, measure, ratio, synchronize

DESCRIPTION = "ChunkLLM adapters vs full attention, StreamingLLM and SnapKV: perplexity, retrieval, decode speed"

TARGETS = {"retrieval_ratio": 0.95, "perplexity_increase": 0.05, "kv_retention": 0.50}
SINK_TOKENS = 4


def _trained_chunkllm(quick: bool, device: str):
    """The reference target with trained ChunkLLM adapters, trained into the reference cache on first use."""
    from transformers import AutoModelForCausalLM

    from hf_efficient.recipes.train_chunkllm import main as train
    from hf_efficient.reference import cache_dir, reference_key, reference_model_path

    steps, seq_len = (20, 128) if quick else (80, 384)
    out = Path(cache_dir()) / f"chunkllm-{reference_key('target')}-{steps}x{seq_len}"
    if not (out / "config.json").is_file():
        train(
            [
                f"--backbone={reference_model_path('target')}",
                f"--output-dir={out}",
                f"--max-steps={steps}",
                f"--seq-len={seq_len}",
                f"--max-documents={40 if quick else 400}",
                "--quiet",
            ]
        )
    return AutoModelForCausalLM.from_pretrained(out).to(device).eval(), steps, seq_len


def _documents(tokenizer, n: int, length: int) -> list[torch.Tensor]:
    """Token ids (1, length) of the first `n` validation documents with at least `length` tokens."""
    from hf_efficient.reference import reference_corpus

    docs = []
    for text in reference_corpus("validation", "all"):
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] >= length:
            docs.append(ids[:, :length])
        if len(docs) == n:
            return docs
    raise ValueError(f"only {len(docs)} validation documents have >= {length} tokens; asked for n={n}")


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[0].float(), targets[0], reduction="sum").item()


@torch.no_grad()
def _continuation_nll(model, cache, doc: torch.Tensor, context: int, on_prefilled=None) -> tuple[float, int]:
    """Prefill `doc[:, :context]` into `cache`, then score the rest; returns (summed NLL, tokens).

    `on_prefilled(cache)` runs between the two passes (ChunkLLM reads its retention counters there).
    """
    prefill = model(doc[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)
    if on_prefilled is not None:
        on_prefilled(cache)
    rest = model(doc[:, context:-1], past_key_values=cache, use_cache=True).logits
    logits = torch.cat([prefill.logits, rest], dim=1)  # predictions of doc[:, context:]
    return _nll(logits, doc[:, context:]), doc.shape[1] - context


def _retrieval_prompts(tokenizer, filler: torch.Tensor, n: int, seed: int = 0) -> list[tuple[torch.Tensor, str]]:
    """`n` (prompt ids, expected value): 4 planted assignments in the first quarter, one queried at the end."""
    rng = random.Random(seed)
    prompts = []
    length = filler.shape[1]
    for _ in range(n):
        names = [f"{rng.choice(['KEY', 'TOKEN', 'LIMIT', 'PATH'])}_{rng.randint(10, 99)}" for _ in range(4)]
        values = ["".join(rng.choices(string.ascii_lowercase, k=5)) for _ in names]
        planted = "".join(f'{k} = "{v}"\n' for k, v in zip(names, values))
        asked = rng.randrange(len(names))
        head = tokenizer(planted, add_special_tokens=False, return_tensors="pt").input_ids
        tail = tokenizer(f'\n{names[asked]} = "', add_special_tokens=False, return_tensors="pt").input_ids
        body = length - head.shape[1] - tail.shape[1]
        at = body // 8
        ids = torch.cat([filler[:, :at], head, filler[:, at:body], tail], dim=1)
        prompts.append((ids, values[asked]))
    return prompts


@torch.no_grad()
def _retrieval_accuracy(model, tokenizer, prompts, make_cache) -> float:
    correct = 0
    for ids, value in prompts:
        cache = make_cache()
        kwargs = {} if cache is None else {"past_key_values": cache}
        out = model.generate(ids, max_new_tokens=4, do_sample=False, **kwargs)
        correct += tokenizer.decode(out[0, ids.shape[1] :]).startswith(value)
    return correct / len(prompts)


def _perplexity(model, make_cache, docs: list[torch.Tensor], context: int) -> tuple[float, float]:
    """Continuation perplexity and the fraction of visible (query, key) pairs read while scoring it.

    `make_cache()` returns `None` for full attention; the retention of a `ChunkLLMCache` is read from its
    counters (continuation only), that of an eviction cache is taken as 1 here and set by the caller.
    """
    nll, tokens, counts = 0.0, 0, []
    for doc in docs:
        cache = make_cache()
        if cache is None:
            with torch.no_grad():
                logits = model(doc[:, :-1]).logits[:, context - 1 :]
            nll, tokens = nll + _nll(logits, doc[:, context:]), tokens + doc.shape[1] - context
            continue
        snapshot = (lambda c: counts.append((-c.attended, -c.visible))) if hasattr(cache, "attended") else None
        part, n = _continuation_nll(model, cache, doc, context, snapshot)
        nll, tokens = nll + part, tokens + n
        if snapshot is not None:
            counts.append((cache.attended, cache.visible))
    attended, visible = (sum(values) for values in zip(*counts)) if counts else (1.0, 1.0)
    return math.exp(nll / tokens), attended / visible


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from hf_efficient.cache import SnapKVCache, StreamingCache
    from hf_efficient.models.chunkllm import ChunkLLMCache
    from hf_efficient.reference import reference_config, reference_model

    backbone, tokenizer = reference_model("target")
    backbone = backbone.to(device)
    evicting, _ = reference_model("target")  # a second copy: eviction caches switch its attention implementation
    evicting = evicting.to(device)
    chunkllm, steps, seq_len = _trained_chunkllm(quick, device)
    # quality within the length the target was trained on (RoPE beyond it degrades every method alike)
    trained = reference_config("target").seq_len
    context, continuation = (256, 64) if quick else (trained - trained // 4, trained // 4)
    n_docs, n_retrieval, new_tokens = (1, 2, 8) if quick else (3, 12, 16)
    speed_context = 256 if quick else backbone.config.max_position_embeddings - new_tokens
    docs = [d.to(device) for d in _documents(tokenizer, n_docs, context + continuation)]
    layers, sinks = chunkllm.config.backbone_config.num_hidden_layers, chunkllm.config.sink_tokens

    # two ChunkLLM settings: the trained top-k, and a top-k of ~30% of the chunks a context holds (~45% retention
    # once the sinks and the open chunk are added)
    with torch.no_grad():
        fires = [chunkllm.boundary_probabilities(d[:, :context]) > chunkllm.config.boundary_threshold for d in docs]
    chunks = sum(int(f.sum()) for f in fires) / len(fires)
    top_ks = sorted({chunkllm.config.top_k_chunks, max(1, round(0.3 * chunks))})
    results, make_caches = {"full attention": None}, {"full attention": (backbone, lambda: None)}
    for k in top_ks:
        make_caches[f"ChunkLLM k={k}"] = (chunkllm, lambda k=k: ChunkLLMCache(layers, k, sinks))
    for name in list(make_caches)[1:]:
        results[name] = _perplexity(*make_caches[name], docs, context)
    # the targets are checked on the most retentive setting within the 50% retention bar
    within = [k for k in top_ks if results[f"ChunkLLM k={k}"][1] <= TARGETS["kv_retention"]]
    budget_name = f"ChunkLLM k={max(within) if within else top_ks[0]}"
    budget = max(SINK_TOKENS + 8, math.ceil(results[budget_name][1] * context))
    make_caches["StreamingLLM"] = (
        evicting,
        lambda: StreamingCache(config=evicting.config, sink_tokens=SINK_TOKENS, window=budget - SINK_TOKENS),
    )
    make_caches["SnapKV"] = (
        evicting,
        lambda: SnapKVCache(config=evicting.config, budget=budget, window=min(32, budget - 1)),
    )
    for name in ("full attention", "StreamingLLM", "SnapKV"):
        perplexity, _ = _perplexity(*make_caches[name], docs, context)
        results[name] = (perplexity, 1.0 if name == "full attention" else budget / context)

    filler = _documents(tokenizer, 1, context)[0]
    prompts = [(ids.to(device), value) for ids, value in _retrieval_prompts(tokenizer, filler, n_retrieval)]
    accuracy = {name: _retrieval_accuracy(m, tokenizer, prompts, make) for name, (m, make) in make_caches.items()}
    decode = _decode_speed(make_caches, tokenizer, speed_context, new_tokens, device)

    report = BenchReport(
        "chunkllm",
        "ChunkLLM adapters vs full attention, StreamingLLM and SnapKV at the same KV budget",
        device=device,
        setup=(
            f"Reference target (trained on {reference_config('target').seq_len}-token sequences); ChunkLLM "
            f"adapters trained {steps} steps at {seq_len} tokens (sentence rule), sink_tokens={sinks}; "
            f"~{chunks:.0f} chunks per context. Perplexity: {n_docs} validation documents, {context}-token context "
            f"prefilled, next {continuation} tokens scored. Retrieval: {n_retrieval} prompts of {context} tokens, "
            f'4 planted `NAME = "value"` lines in the first eighth, one asked at the end. Decode: {new_tokens} new '
            f"tokens after {speed_context} tokens (prefill excluded). StreamingLLM and SnapKV keep {budget} of "
            f"{context} context tokens per KV head, the retention of {budget_name}."
        ),
    )
    base_ppl, base_acc = results["full attention"][0], accuracy["full attention"]
    for name, (perplexity, retention) in results.items():
        report.add_row(
            {
                "method": name,
                "kv_retention": retention,
                "perplexity": perplexity,
                "perplexity_ratio": ratio(perplexity, base_ppl),
                "retrieval_accuracy": accuracy[name],
                "retrieval_ratio": ratio(accuracy[name], base_acc) if base_acc else float("nan"),
                "decode_tokens_per_s": decode.get(name, float("nan")),
                "decode_speedup": ratio(decode[name], decode["full attention"]) if name in decode else float("nan"),
            }
        )
    row = next(row for row in report.rows if row["method"] == budget_name)
    checks = [
        ("KV retention <= 50%", row["kv_retention"] <= TARGETS["kv_retention"]),
        ("perplexity within +5%", row["perplexity_ratio"] <= 1 + TARGETS["perplexity_increase"]),
        ("retrieval >= 95% of full attention", row["retrieval_ratio"] >= TARGETS["retrieval_ratio"]),
        (f"decode faster than full attention at {speed_context} tokens", row["decode_speedup"] > 1.0),
    ]
    for label, met in checks:
        report.note(f"{budget_name}: target {label} — {'met' if met else 'NOT met'}")
    report.bar_plot("perplexity_ratio")
    return report


def _decode_speed(make_caches: dict, tokenizer, context: int, new_tokens: int, device: str) -> dict[str, float]:
    """Greedy decode tokens/s after a `context`-token prompt, prefill excluded (median of 3 after a warm-up)."""
    from transformers import DynamicCache

    prompt = _documents(tokenizer, 1, context)[0].to(device)
    speeds = {}
    for name, (model, make_cache) in make_caches.items():
        if name.startswith(("StreamingLLM", "SnapKV")):
            continue

        @torch.no_grad()
        def decode_seconds(model=model, make_cache=make_cache) -> float:
            cache = make_cache() or DynamicCache(config=model.config)
            logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            synchronize(device)
            start = time.perf_counter()
            for _ in range(new_tokens):
                token = logits[:, -1:].argmax(dim=-1)  # (B, 1)
                logits = model(token, past_key_values=cache, use_cache=True).logits
            synchronize(device)
            return time.perf_counter() - start

        timing = measure(lambda f=decode_seconds: [f() for _ in range(3)], warmup=1, repeats=1, device=device)
        speeds[name] = new_tokens / statistics.median(timing.result)
    return speeds
