"""ChunkLLM vs full attention, StreamingLLM and SnapKV at the same KV budget on long validation documents.

Protocol (all methods, same texts): a long context is prefilled into the method's cache, then the continuation is
scored. ChunkLLM's adapters are trained once on the reference target with `recipes/train_chunkllm.py` and cached;
the KV budget of StreamingLLM and SnapKV is set to ChunkLLM's measured retention on the continuation. Retrieval is
multiple choice: `NAME = "value"` lines are planted early in the context, the prompt ends by querying one name
(`NAME = "` inline, or `NAME?` then `"` on a new line: question, then answer), and each planted value is scored as
its continuation by log-likelihood (right value ranked first = correct; chance is 1 / choices). The reference
target never learned in-context copying, so retrieval is measured on a second backbone that did
(`recipes/train_retrieval_lm.py`, trained once and cached), with its own adapters and its own eviction budget
matched to its ChunkLLM retention. Because a model can only retrieve what its cache still holds, `needle_kept`
also reports, per method, the fraction of (item, layer, KV head) in which the token after the prompt can read
every token of the right value: a property of the cache policy. Decode speed is measured at several context
lengths (validation documents concatenated), prefill excluded; the longest ones exceed the length the target was
trained on, which changes what the model predicts but not how fast it runs, so they are speed measurements only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compat import cache_kwarg
from .harness import BenchReport, ratio, synchronize

DESCRIPTION = "ChunkLLM adapters vs full attention, StreamingLLM and SnapKV: perplexity, retrieval, decode speed"

TARGETS = {"retrieval_ratio": 0.95, "perplexity_increase": 0.05, "kv_retention": 0.50}
SINK_TOKENS = 4
LOCAL_CHUNKS = 4
CHOICES = 4
STATIC = "full attention, StaticCache"  # decode only: full attention without HF DynamicCache's per-token copy
RETRIEVAL_TOP_KS = (2, 8, 12, 16)  # settings tried on the retrieval backbone (its chunks differ from the target's)
LAYOUTS = ("question", "inline")  # retrieval probe layouts; the target is checked on the first
SPEED_CONTEXTS = (2048, 8192, 16384)  # decode speed, prefill excluded; ~20 s of decode timing on 2 CPU cores


def _cached_training(name: str, recipe, args: list[str], *sources: Path) -> Path:
    """`recipe.main(["--output-dir=...", *args])` into the reference cache, once: the folder is keyed by `args`, the
    recipe's source and `sources`, so editing any of them trains anew."""
    from hf_efficient.reference import cache_dir

    code = b"".join(Path(path).read_bytes() for path in (recipe.__file__, *sources))
    out = cache_dir() / f"{name}-{hashlib.sha256(code + str(args).encode()).hexdigest()[:12]}"
    if not (out / "config.json").is_file():
        recipe.main([f"--output-dir={out}", *args])
    return out


def _retrieval_backbone(quick: bool) -> Path:
    """A small Llama with in-context retrieval (`recipes/train_retrieval_lm.py`), trained into the reference
    cache on first use (~17 min on 2 CPU cores; seconds, untrained, with `quick`)."""
    from hf_efficient.recipes import train_retrieval_lm
    from hf_efficient.reference import reference_key

    args = ["--quiet"]
    if quick:
        args += ["--induction-max-steps=5", "--induction-batch-size=4", "--max-steps=4", "--batch-size=4"]
        args += ["--seq-len=128", "--max-documents=40"]
    return _cached_training(f"retrieval-lm-{reference_key('target')}", train_retrieval_lm, args)


def _trained_chunkllm(quick: bool, device: str, backbone: Path | None = None) -> tuple:
    """ChunkLLM adapters on `backbone` (default: the reference target), trained into the reference cache on first
    use; returns (model, steps, seq_len, key-value documents in the training text).

    Adapters on a retrieval backbone also see key-value documents (its own training distribution; names disjoint
    from the probe's), and train longer.
    """
    from transformers import AutoModelForCausalLM

    from hf_efficient.models.chunkllm import backbone_chunkllm, modeling_chunkllm
    from hf_efficient.recipes import train_chunkllm, train_retrieval_lm
    from hf_efficient.reference import reference_model_path

    steps, seq_len, key_value = (20, 128, 0) if quick else (200, 384, 0) if backbone is None else (1000, 384, 300)
    backbone = backbone or reference_model_path("target")
    args = [f"--backbone={backbone}", f"--max-steps={steps}", f"--seq-len={seq_len}"]
    args += [f"--local-chunks={LOCAL_CHUNKS}", f"--max-documents={40 if quick else 400}", "--quiet"]
    args += [f"--key-value-documents={key_value}"]
    sources = (modeling_chunkllm.__file__, backbone_chunkllm.__file__, train_retrieval_lm.__file__)
    out = _cached_training(f"chunkllm-{Path(backbone).name}", train_chunkllm, args, *sources)
    return AutoModelForCausalLM.from_pretrained(out).to(device).eval(), steps, seq_len, key_value


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


def _long_prompt(tokenizer, length: int) -> torch.Tensor:
    """Token ids (1, length): validation documents, each ended by `</s>`, concatenated until `length` tokens."""
    from hf_efficient.reference import reference_corpus

    parts, total = [], 0
    for text in reference_corpus("validation", "all"):
        ids = tokenizer(text, return_tensors="pt").input_ids
        parts += [ids, torch.tensor([[tokenizer.eos_token_id]])]
        total += ids.shape[1] + 1
        if total >= length:
            return torch.cat(parts, dim=1)[:, :length]
    raise ValueError(f"the validation documents hold only {total} tokens; asked for {length}")


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[0].float(), targets[0], reduction="sum").item()


@torch.no_grad()
def _continuation_nll(model, cache, doc: torch.Tensor, context: int, on_prefilled=None) -> tuple[float, int]:
    """Prefill `doc[:, :context]` into `cache` (full attention in one pass when `cache` is None), then score the
    rest; returns (summed NLL, tokens).

    `on_prefilled(cache)` runs between the two passes (ChunkLLM reads its retention counters there).
    """
    if cache is None:
        logits = model(doc[:, :-1]).logits[:, context - 1 :]
        return _nll(logits, doc[:, context:]), doc.shape[1] - context
    prefill = model(doc[:, :context], use_cache=True, logits_to_keep=1, **cache_kwarg(cache))
    if on_prefilled is not None:
        on_prefilled(cache)
    logits = prefill.logits
    if doc.shape[1] - context > 1:
        rest = model(doc[:, context:-1], use_cache=True, **cache_kwarg(cache)).logits
        logits = torch.cat([logits, rest], dim=1)  # predictions of doc[:, context:]
    return _nll(logits, doc[:, context:]), doc.shape[1] - context


def _retrieval_items(
    tokenizer, filler: torch.Tensor, n: int, choices: int = 4, seed: int = 0, layout: str = "inline"
) -> list[tuple]:
    """`n` multiple-choice items `(prompt ids, [choice ids], answer, needle)`.

    `choices` distinct `NAME = "value"` lines are planted in the first eighth of the filler; the prompt ends with
    one of the names queried in `layout` (`QUERY_LAYOUTS` of `recipes/train_retrieval_lm.py`: `NAME = "` inline,
    or `NAME?` then a new line and `"`), and the choices are the planted values (each followed by its closing
    quote), so a model that ranks by log-likelihood scores 1 / choices by chance. `needle` holds the prompt
    positions of the right value's tokens in its planted line.
    """
    from hf_efficient.recipes.train_retrieval_lm import PROBE_PREFIXES, QUERY_LAYOUTS, key_value_pairs

    rng = random.Random(seed)
    length, items = filler.shape[1], []

    def encode(text: str) -> torch.Tensor:
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids

    for _ in range(n):
        names, values = key_value_pairs(rng, choices, PROBE_PREFIXES)
        planted = [f'{k} = "{v}"\n' for k, v in zip(names, values)]
        head = tokenizer("".join(planted), add_special_tokens=False, return_offsets_mapping=True)
        answer = rng.randrange(choices)
        query, closing = QUERY_LAYOUTS[layout].format(name=names[answer], value="\0").split("\0")
        tail = encode(query)
        lines = [encode(query + value + closing) for value in values]
        if any(not torch.equal(line[:, : tail.shape[1]], tail) for line in lines):
            raise ValueError("the tokenizer merges the opening quote with the value; choose other value strings")
        body = length - len(head.input_ids) - tail.shape[1]
        at = body // 8
        value_start = len("".join(planted[:answer])) + len(f'{names[answer]} = "')
        value_end = value_start + len(values[answer])
        needle = [at + i for i, (a, b) in enumerate(head.offset_mapping) if a < value_end and b > value_start]
        prompt = torch.cat([filler[:, :at], torch.tensor([head.input_ids]), filler[:, at:body], tail], dim=1)
        items.append((prompt, [line[:, tail.shape[1] :] for line in lines], answer, torch.tensor(needle)))
    return items


def _retrieval(model, make_cache, items) -> tuple[float, float]:
    """`(accuracy, needle_kept)` over `items` (a fresh cache per scored choice).

    accuracy: fraction of items whose right value has the highest log-likelihood after the prompt. needle_kept:
    fraction of (item, layer, KV head) in which the token after the prompt can still read every token of the right
    planted value, read from the cache right after the prompt's prefill: whether the method keeps the needle at all
    (1 for full attention), independent of whether the model can use it.
    """
    correct, kept = 0, []
    for prompt, choices, answer, needle in items:

        def read_needle(cache, length=prompt.shape[1], needle=needle) -> None:
            kept.append(_needle_fraction(cache, length, needle))

        scores = []
        for i, choice in enumerate(choices):  # the needle is read once, after the first choice's prompt prefill
            doc = torch.cat([prompt, choice], dim=1)
            nll, _ = _continuation_nll(model, make_cache(), doc, prompt.shape[1], read_needle if i == 0 else None)
            scores.append(-nll)
        correct += max(range(len(scores)), key=scores.__getitem__) == answer
    return correct / len(items), statistics.fmean(kept) if kept else 1.0


def _readable(cache, layer_idx: int, length: int) -> torch.Tensor:
    """`(H_kv, length)` bool: the prompt positions the first token after a prefilled prompt (batch of one) reads
    in layer `layer_idx` of `cache` (a `ChunkLLMCache` or an eviction cache with per-slot `positions`)."""
    from hf_efficient.models.chunkllm import ChunkLLMCache

    if isinstance(cache, ChunkLLMCache):
        index, valid = cache.decode_positions(layer_idx)  # (1, H_kv, M): the selection before the open chunk
        readable = torch.zeros(index.shape[1], length + 1, dtype=torch.bool, device=index.device)
        readable.scatter_(-1, torch.where(valid, index, length)[0], True)
        readable[:, int(cache.current_start[0]) :] = True  # the open chunk
        return readable[:, :length]
    positions = cache.layers[layer_idx].positions[0].long()  # (H_kv, L_kept), -1 = empty slot
    readable = torch.zeros(positions.shape[0], length + 1, dtype=torch.bool, device=positions.device)
    return readable.scatter_(-1, torch.where(positions >= 0, positions, length), True)[:, :length]


def _needle_fraction(cache, length: int, needle: torch.Tensor) -> float:
    """Fraction of (layer, KV head) of a cache holding a `length`-token prompt that can read all `needle` positions."""
    found = torch.stack([_readable(cache, i, length)[:, needle].all(dim=-1) for i in range(len(cache.layers))])
    return found.float().mean().item()


def _perplexity(model, make_cache, docs: list[torch.Tensor], context: int) -> tuple[float, float]:
    """Continuation perplexity and the fraction of visible (query, key) pairs read while scoring it.

    `make_cache()` returns `None` for full attention; the retention of a `ChunkLLMCache` is read from its
    counters (continuation only), that of an eviction cache is taken as 1 here and set by the caller.
    """
    nll, tokens, counts = 0.0, 0, []
    for doc in docs:
        cache = make_cache()
        if cache is None:
            part, n = _continuation_nll(model, None, doc, context)
            nll, tokens = nll + part, tokens + n
            continue
        snapshot = (lambda c: counts.append((-c.attended, -c.visible))) if hasattr(cache, "attended") else None
        part, n = _continuation_nll(model, cache, doc, context, snapshot)
        nll, tokens = nll + part, tokens + n
        if snapshot is not None:
            counts.append((cache.attended, cache.visible))
    attended, visible = (sum(values) for values in zip(*counts)) if counts else (1.0, 1.0)
    return math.exp(nll / tokens), attended / visible


def _chance_bound(chance: float, n: int) -> float:
    """Accuracy two binomial standard deviations above `chance` over `n` items: "clearly above chance"."""
    return chance + 2 * math.sqrt(chance * (1 - chance) / n)


@torch.no_grad()
def _copy_gain(model, doc: torch.Tensor) -> float:
    """Per-token NLL of `doc` minus that of its immediate repetition: ~0 for a model without in-context copying."""
    ids = torch.cat([doc, doc], dim=1)
    nll = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits[0].float(), ids[0, 1:], reduction="none")
    length = doc.shape[1]
    return (nll[: length - 1].mean() - nll[length - 1 :].mean()).item()


def _chunk_caches(chunkllm, top_ks: list[int]) -> dict[str, tuple]:
    """`{"ChunkLLM k=K": (model, make_cache)}` for each of `top_ks`."""
    from hf_efficient.models.chunkllm import ChunkLLMCache

    config = chunkllm.config
    layers = config.backbone_config.num_hidden_layers
    return {
        f"ChunkLLM k={k}": (
            chunkllm,
            lambda k=k: ChunkLLMCache(layers, k, config.sink_tokens, config.local_chunks),
        )
        for k in top_ks
    }


def _eviction_caches(evicting, budget: int) -> dict[str, tuple]:
    """StreamingLLM and SnapKV keeping `budget` tokens per KV head of `evicting` (a model of their own: the
    eviction caches switch its attention implementation)."""
    from hf_efficient.cache import SnapKVCache, StreamingCache

    window = budget - SINK_TOKENS
    return {
        "StreamingLLM": (
            evicting,
            lambda: StreamingCache(config=evicting.config, sink_tokens=SINK_TOKENS, window=window),
        ),
        "SnapKV": (evicting, lambda: SnapKVCache(config=evicting.config, budget=budget, window=min(32, budget - 1))),
    }


def _most_retentive_within(retention: dict[str, float], top_ks) -> str:
    """The ChunkLLM setting (method name) of `top_ks` that keeps the most KV within the retention target (the
    smallest top-k if none does)."""
    within = [k for k in top_ks if retention[f"ChunkLLM k={k}"] <= TARGETS["kv_retention"]]
    return f"ChunkLLM k={max(within) if within else min(top_ks)}"


def _budget(retention: float, context: int) -> int:
    """Tokens per KV head the eviction caches keep to match `retention` of a `context`-token context."""
    return max(SINK_TOKENS + 8, math.ceil(retention * context))


@dataclass
class _RetrievalComparison:
    scores: dict[tuple[str, str], tuple[float, float]]  # (method, layout) -> (accuracy, needle_kept)
    retention: dict[str, float]  # method -> KV retention on the retrieval backbone
    setting: str  # the ChunkLLM setting checked: the most retentive within the retention target
    budget: int  # tokens per KV head of StreamingLLM and SnapKV, the retention of `setting`
    target_accuracy: dict[str, float]  # layout -> the reference target's accuracy with full attention
    copy_gain: float  # the retrieval backbone's `_copy_gain`
    record: dict  # the retrieval backbone's training record, with its adapters' steps and key-value documents


def _retrieval_comparison(
    target, tokenizer, docs: list[torch.Tensor], context: int, n_items: int, quick: bool, device: str
) -> _RetrievalComparison:
    """Every method's retrieval on the retrieval backbone (the target has none), with its own adapters; its ChunkLLM
    setting and eviction budget are chosen like the target's, from its own retention on `docs`."""
    from transformers import AutoModelForCausalLM

    path = _retrieval_backbone(quick)
    retriever = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    evicting = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    chunkllm, steps, _, key_value = _trained_chunkllm(quick, device, path)
    caches = {"full attention": (retriever, lambda: None), **_chunk_caches(chunkllm, RETRIEVAL_TOP_KS)}
    retention = {"full attention": 1.0}
    for name in list(caches)[1:]:
        retention[name] = _perplexity(*caches[name], docs, context)[1]
    setting = _most_retentive_within(retention, RETRIEVAL_TOP_KS)
    budget = _budget(retention[setting], context)
    caches.update(_eviction_caches(evicting, budget))
    retention.update({name: budget / context for name in ("StreamingLLM", "SnapKV")})
    filler = _documents(tokenizer, 1, context)[0]
    scores, target_accuracy = {}, {}
    for layout in LAYOUTS:
        items = [
            (prompt.to(device), [choice.to(device) for choice in choices], answer, needle.to(device))
            for prompt, choices, answer, needle in _retrieval_items(tokenizer, filler, n_items, CHOICES, 0, layout)
        ]
        for name, (model, make_cache) in caches.items():
            scores[name, layout] = _retrieval(model, make_cache, items)
        target_accuracy[layout] = _retrieval(target, lambda: None, items)[0]
    record = json.loads((path / "retrieval_training.json").read_text())
    record.update(adapter_steps=steps, key_value_documents=key_value)
    return _RetrievalComparison(
        scores, retention, setting, budget, target_accuracy, _copy_gain(retriever, docs[0][:, :128]), record
    )


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from hf_efficient.reference import reference_config, reference_model

    backbone, tokenizer = reference_model("target")
    backbone = backbone.to(device)
    evicting, _ = reference_model("target")  # a second copy: eviction caches switch its attention implementation
    evicting = evicting.to(device)
    chunkllm, steps, seq_len, _ = _trained_chunkllm(quick, device)
    # quality within the length the target was trained on (RoPE beyond it degrades every method alike)
    trained = reference_config("target").seq_len
    context, continuation = (256, 64) if quick else (trained - trained // 4, trained // 4)
    n_docs, n_retrieval, new_tokens = (1, 2, 8) if quick else (3, 80, 32)
    speed_contexts = (128, 256) if quick else SPEED_CONTEXTS
    docs = [d.to(device) for d in _documents(tokenizer, n_docs, context + continuation)]
    config = chunkllm.config
    sinks, local = config.sink_tokens, config.local_chunks

    # two ChunkLLM settings with the local window: the trained top-k, and a small top-k (lower retention)
    with torch.no_grad():
        fires = [chunkllm.boundary_probabilities(d[:, :context]) > config.boundary_threshold for d in docs]
    chunks = sum(int(f.sum()) for f in fires) / len(fires)
    top_ks = sorted({config.top_k_chunks, 2})
    results, make_caches = {"full attention": None}, {"full attention": (backbone, lambda: None)}
    make_caches.update(_chunk_caches(chunkllm, top_ks))
    for name in list(make_caches)[1:]:
        results[name] = _perplexity(*make_caches[name], docs, context)
    # the targets are checked on the most retentive setting within the 50% retention bar
    budget_name = _most_retentive_within({name: value[1] for name, value in results.items() if value}, top_ks)
    budget = _budget(results[budget_name][1], context)
    make_caches.update(_eviction_caches(evicting, budget))
    for name in ("full attention", "StreamingLLM", "SnapKV"):
        perplexity, _ = _perplexity(*make_caches[name], docs, context)
        results[name] = (perplexity, 1.0 if name == "full attention" else budget / context)
    decode, prefill = _decode_speed(make_caches, tokenizer, speed_contexts, new_tokens, device)
    longest = speed_contexts[-1]

    retrieval = _retrieval_comparison(backbone, tokenizer, docs, context, n_retrieval, quick, device)
    copy_gain = _copy_gain(backbone, docs[0][:, :128])
    record = retrieval.record  # the retrieval backbone's training

    report = BenchReport(
        "chunkllm",
        "ChunkLLM adapters vs full attention, StreamingLLM and SnapKV at the same KV budget",
        device=device,
        setup=(
            f"Perplexity and decode speed: the reference target (trained on {trained}-token sequences); ChunkLLM "
            f"adapters trained {steps} steps at {seq_len} tokens (sentence rule, chunk-level distillation), "
            f"sink_tokens={sinks}, local_chunks={local} (always kept, counted in the retention); ~{chunks:.0f} chunks "
            f"per context. Perplexity: {n_docs} validation documents, {context}-token context prefilled, next "
            f"{continuation} tokens scored. Decode: {new_tokens} new greedy tokens after "
            f"{', '.join(map(str, speed_contexts))} tokens of concatenated validation documents (`tok_s_N` tokens/s "
            f"and `speedup_N` vs full attention after N tokens; prefill excluded, each method prefilled once per "
            f"length and decoded from copies of that cache, median of 5 interleaved runs, shared 2-core machine). "
            f"Decode contexts beyond the {trained}-token training length are speed measurements only: positions work "
            f"mechanically (RoPE), the model was not trained there. StreamingLLM and SnapKV keep {budget} of "
            f"{context} context tokens per KV head, the retention of {budget_name}. "
            f"Retrieval (`retrieval_*` and `needle_kept_*` columns): the retrieval backbone of "
            f"`recipes/train_retrieval_lm.py` ({record['layers']} layers x {record['hidden_size']}, "
            f"{record['parameters'] / 1e6:.2f}M parameters, reference tokenizer; {record['induction_steps']} steps of "
            f"random-span copying, then {record['retrieval_steps']} steps of {record['retrieval_rows']}, training "
            f"names disjoint from the probe's), with its own adapters ({record['adapter_steps']} steps, "
            f"{record['key_value_documents']} key-value "
            f"documents added to the corpus text); its retention per setting is `retrieval_kv_retention`, and "
            f"StreamingLLM and SnapKV keep {retrieval.budget} tokens per KV head there, the retention of "
            f"{retrieval.setting}. {n_retrieval} multiple-choice prompts of {context} tokens (validation text) per "
            f'layout, {CHOICES} planted `NAME = "value"` lines (random 5-letter values) in the first eighth, one name '
            f"queried at the end, the {CHOICES} planted values ranked by log-likelihood (chance {1 / CHOICES:.2f}). "
            f'Layouts: `question` asks `NAME?` in a line of its own and the answer `"value"` starts the next line '
            f'(the needle-in-a-haystack layout: question, then answer); `inline` ends the prompt with `NAME = "`.'
        ),
    )
    base_ppl = results["full attention"][0]
    base_acc = {layout: retrieval.scores["full attention", layout][0] for layout in LAYOUTS}
    chunk_names = [f"ChunkLLM k={k}" for k in sorted({*top_ks, *RETRIEVAL_TOP_KS})]
    for name in ["full attention", *chunk_names, "StreamingLLM", "SnapKV"]:
        row = {"method": name}
        if name in results:
            perplexity, retention = results[name]
            row.update(kv_retention=retention, perplexity=perplexity, perplexity_ratio=ratio(perplexity, base_ppl))
        if name in retrieval.retention:
            row["retrieval_kv_retention"] = retrieval.retention[name]
            for layout in LAYOUTS:
                accuracy, needle_kept = retrieval.scores[name, layout]
                row[f"retrieval_{layout}"] = accuracy
                row[f"retrieval_ratio_{layout}"] = ratio(accuracy, base_acc[layout]) if base_acc[layout] else math.nan
                row[f"needle_kept_{layout}"] = needle_kept
        if name in results:
            for length in speed_contexts:
                speed = decode[length].get(name, float("nan"))
                row[f"tok_s_{length}"] = speed
                row[f"speedup_{length}"] = ratio(speed, decode[length]["full attention"])
        report.add_row(row)
        if name == "full attention":  # decode-only row: how much of the gap is the DynamicCache copy
            static = {"method": STATIC, "kv_retention": 1.0}
            for length in speed_contexts:
                static[f"tok_s_{length}"] = decode[length][STATIC]
                static[f"speedup_{length}"] = ratio(decode[length][STATIC], decode[length]["full attention"])
            report.add_row(static)
    row = next(row for row in report.rows if row["method"] == budget_name)
    retrieval_row = next(row for row in report.rows if row["method"] == retrieval.setting)
    checked = LAYOUTS[0]
    # the retrieval ratio only means something when full attention itself retrieves
    retrieves = base_acc[checked] > _chance_bound(1 / CHOICES, n_retrieval)
    retrieval_met = (
        retrieval_row[f"retrieval_ratio_{checked}"] >= TARGETS["retrieval_ratio"]
        and retrieval_row["retrieval_kv_retention"] <= TARGETS["kv_retention"]
        if retrieves
        else None
    )
    checks = [
        (budget_name, "KV retention <= 50%", row["kv_retention"] <= TARGETS["kv_retention"]),
        (budget_name, "perplexity within +5%", row["perplexity_ratio"] <= 1 + TARGETS["perplexity_increase"]),
        (
            f"{retrieval.setting} on the retrieval backbone",
            f"retrieval ({checked} layout) >= 95% of full attention at <= 50% KV retention",
            retrieval_met,
        ),
        (budget_name, f"decode faster than full attention at {longest} tokens", row[f"speedup_{longest}"] > 1.0),
    ]
    for method, label, met in checks:
        verdict = "not measurable: full attention does not retrieve" if met is None else "met" if met else "NOT met"
        report.note(f"{method}: target {label} — {verdict}")
    scores = ", ".join(f"{layout} {base_acc[layout]:.2f}" for layout in LAYOUTS)
    target_scores = ", ".join(f"{layout} {retrieval.target_accuracy[layout]:.2f}" for layout in LAYOUTS)
    report.note(
        f"Retrieval chance is {1 / CHOICES:.2f} ({CHOICES} choices); full attention on the retrieval backbone scores "
        f"{scores} (clearly above chance means > {_chance_bound(1 / CHOICES, n_retrieval):.2f} over {n_retrieval} "
        f"items). Why a second backbone: with full attention the reference target scores {target_scores}, and "
        f"repeating a 128-token validation passage lowers its per-token NLL by only {copy_gain:.2f} nats "
        f"(the retrieval backbone's: {retrieval.copy_gain:.2f})."
    )
    inline = {name: retrieval.scores[name, "inline"][0] for name in (retrieval.setting, "StreamingLLM", "SnapKV")}
    report.note(
        f"ChunkLLM selects chunks at each chunk start, with the adapter query of the chunk's first token. In the "
        f"`question` layout the queried name is closed by a chunk boundary before the answer, so the answer's chunk "
        f"selects knowing it; in the `inline` layout the name sits inside the answer's own chunk, after its "
        f"selection was made, and {retrieval.setting} retrieves {inline[retrieval.setting]:.2f} there (full attention "
        f"{base_acc['inline']:.2f}). StreamingLLM ({inline['StreamingLLM']:.2f}) and SnapKV ({inline['SnapKV']:.2f}) "
        f"prefill the prompt with full attention and evict afterwards, so the prompt's last token, which predicts the "
        f"value's first token, still reads everything. `needle_kept_*`: the fraction of (item, layer, KV head) in "
        f"which the token after the prompt can read every token of the right value (full attention 1)."
    )
    static = ratio(row[f"tok_s_{longest}"], decode[longest][STATIC])
    report.note(
        f"Full attention is HF's `DynamicCache`, which copies the whole cache at every token (`torch.cat`); "
        f"`ChunkLLMCache` appends in place and reads only the selection. Against full attention on a preallocated "
        f"`StaticCache` (no copy; decode only, quality columns empty), {budget_name} decodes {static:.2f}x as fast "
        f"at {longest} tokens: the effect of chunk selection alone."
    )
    times = ", ".join(f"{name} {seconds:.2g} s" for name, seconds in prefill.items() if name != STATIC)
    beyond = f"Decode at {longest} tokens ({longest / trained:.0f}x the training length) is timing only. "
    report.note(
        f"{beyond if longest > trained else ''}ChunkLLM's "
        f"prefill (blocks of {config.prefill_block_size} tokens, masked dense attention) is not faster: at {longest} "
        f"tokens {times}."
    )
    report.plot = _plot(report, speed_contexts)
    return report


def _grouped_bars(ax, rows: list[dict], columns: dict[str, str]) -> None:
    """One group of bars per row (method), one bar per `{column: legend label}`."""
    width = 0.8 / len(columns)
    for i, (column, label) in enumerate(columns.items()):
        offsets = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(offsets, [row[column] for row in rows], width, label=label)
    ax.set_xticks(range(len(rows)), [row["method"] for row in rows], rotation=30, ha="right", fontsize="small")
    if len(columns) > 1:
        ax.legend(fontsize="small")


def _plot(
    report: BenchReport,
    lengths,
    quality_columns: dict[str, str] | None = None,
    backbones: tuple[str, str] = ("target", "retrieval backbone"),
    layouts: tuple[str, ...] = LAYOUTS,
) -> Callable:
    """Perplexity ratio per method (bars, one per `quality_columns`), retrieval accuracy per method and layout
    (bars), and the decode speedup over full attention per context length (lines)."""
    quality_columns = quality_columns or {"perplexity_ratio": "perplexity"}

    def draw(fig) -> None:
        fig.set_size_inches(13, 4.5)
        quality, retrieval, speed = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
        _grouped_bars(quality, [row for row in report.rows if next(iter(quality_columns)) in row], quality_columns)
        quality.set_ylabel(f"perplexity / full attention ({backbones[0]})")
        rows = [row for row in report.rows if f"retrieval_{LAYOUTS[0]}" in row]
        _grouped_bars(retrieval, rows, {f"retrieval_{layout}": f"{layout} layout" for layout in layouts})
        retrieval.set_ylabel(f"retrieval accuracy ({backbones[1]})")
        retrieval.set_ylim(0, 1.05)
        for row in report.rows:
            speedups = [row.get(f"speedup_{length}", math.nan) for length in lengths]
            if not any(math.isnan(value) for value in speedups):
                speed.plot(lengths, speedups, marker="o", label=row["method"])
        speed.set_xscale("log", base=2)
        speed.set_xticks(lengths, [str(length) for length in lengths])
        speed.set_xlabel("context tokens (decode, prefill excluded)")
        speed.set_ylabel("decode tokens/s / full attention")
        speed.legend(fontsize="small")
        fig.suptitle(report.title, fontsize="medium")

    return draw


def _decode_speed(
    make_caches: dict, tokenizer, contexts, new_tokens: int, device: str
) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    """Greedy decode tokens/s after each of `contexts` tokens, prefill excluded, and the prefill seconds at the
    longest context.

    Every method prefills each context once; each run decodes `new_tokens` from a copy of that cache, so all runs
    start at the same length. Median of 5 runs after a warm-up, the methods interleaved so that load on a shared
    machine hits them alike.
    """
    from transformers import DynamicCache, StaticCache

    @torch.no_grad()
    def _decode_seconds(model, cache, token: torch.Tensor, new_tokens: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = model(token, use_cache=True, **cache_kwarg(cache)).logits
            token = logits[:, -1:].argmax(dim=-1)  # (B, 1)
        synchronize(device)
        return time.perf_counter() - start

    speeds, prefill_seconds = {}, {}
    backbone = make_caches["full attention"][0]
    for context in contexts:
        timed = {name: entry for name, entry in make_caches.items() if not name.startswith(("StreamingLLM", "SnapKV"))}
        timed[STATIC] = (backbone, lambda size=context + new_tokens: StaticCache(backbone.config, max_cache_len=size))
        prompt = _long_prompt(tokenizer, context).to(device)
        prefilled = {}
        with torch.no_grad():
            for name, (model, make_cache) in timed.items():
                cache = make_cache() or DynamicCache(config=model.config)
                start = time.perf_counter()
                logits = model(prompt, use_cache=True, logits_to_keep=1, **cache_kwarg(cache)).logits
                synchronize(device)
                prefill_seconds[name] = time.perf_counter() - start
                prefilled[name] = (cache, logits[:, -1:].argmax(dim=-1))

        seconds = {name: [] for name in timed}
        for repeat in range(6):
            for name, (model, _) in timed.items():
                elapsed = _decode_seconds(model, copy.deepcopy(prefilled[name][0]), prefilled[name][1], new_tokens)
                if repeat:  # the first round warms up
                    seconds[name].append(elapsed)
        speeds[context] = {name: new_tokens / statistics.median(values) for name, values in seconds.items()}
        del prefilled
    return speeds, prefill_seconds
