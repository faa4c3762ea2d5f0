"""Compressed KV caches against `DynamicCache` and HF `QuantizedCache` on real models: perplexity, bytes, speed.

On SmolLM2-135M-Instruct (and Gemma-3-270M, whose sliding-window layers matter for bytes held), test-split texts
(code and prose) are split into a prompt and a continuation; the prompt is prefilled through the cache and the
continuation decoded token by token (teacher forcing), so every prediction reads the compressed cache. Per method
and kind: perplexity of the continuation and mean bytes held (`.nbytes()`, or the tensors of HF caches), as ratios
to `DynamicCache`. Each text is one interleaved round of every method (rotating order); the speed ratio is the
median of the per-round ratios. HF `QuantizedCache` runs with every backend importable here, at the same bits,
group size and residual length as KIVI and GEAR.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..compat import Cache, DynamicCache, QuantizedCache, cache_kwarg
from .harness import BenchReport, Interleaved, interleaved, ratio

LIGHT_GEAR = "GEAR 2-bit r=1, 1% outliers"
DESCRIPTION = "GEAR/KIVI/streaming/H2O/Keyformer/SnapKV vs DynamicCache and HF QuantizedCache: ppl, bytes, tokens/s"

# HF QuantizedCache configurations: (backend, kwargs); quanto and hqq at the bit widths of KIVI and GEAR
# group size and residual length shared by every quantized cache (ours and HF's), so rows compare like for like
GROUP_SIZE, RESIDUAL_LENGTH = 32, 64
HF_BACKENDS = (
    ("fp8", {}),
    ("quanto", {"nbits": 4, "q_group_size": GROUP_SIZE, "residual_length": RESIDUAL_LENGTH}),
    ("quanto", {"nbits": 2, "q_group_size": GROUP_SIZE, "residual_length": RESIDUAL_LENGTH}),
)
# frozen budgets: (prompt tokens, teacher-forced continuation tokens, SnapKV observation window, texts per kind)
MODELS = {"smollm2-135m": (1024, 128, 32, 2), "gemma3-270m": (1024, 128, 32, 1)}
# on Gemma-3 (slower forward, 262k vocabulary) the methods that show the sliding-window question
GEMMA_METHODS = (
    "DynamicCache",
    "KIVI 4-bit",
    "KIVI 4-bit, full-precision windows",
    "KIVI 2-bit",
    "KIVI 2-bit, full-precision windows",
    "KIVI 2-bit, 4-bit keys",
    "GEAR 4-bit",
    "Streaming 50%",
    "H2O 50%",
    "SnapKV 50%",
)


def held_bytes(cache: Cache) -> int:
    """Bytes a cache holds: `.nbytes()` for ours, every tensor of every layer for Hugging Face caches."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor) and hasattr(value, "__tensor_flatten__"):  # quanto's packed QTensors
            inner, _ = value.__tensor_flatten__()
            return sum(walk(getattr(value, name)) for name in inner)
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (tuple, list)):
            return sum(walk(v) for v in value)
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if hasattr(value, "__dict__"):  # backend tensor wrappers (quanto QTensor)
            return sum(walk(v) for v in vars(value).values())
        return 0

    return sum(walk(vars(layer)) for layer in cache.layers)


def methods(config, prompt_len: int, total_len: int, window: int) -> dict[str, Callable[[], Cache]]:
    """Cache factories by row label; eviction caches hold half of `total_len` tokens at the end."""
    from hf_efficient.cache import GEARCache, HeavyHitterCache, KIVICache, SnapKVCache, StreamingCache
    from hf_efficient.cache.base import decoder_layer_types

    budget = total_len // 2
    factories: dict[str, Callable[[], Cache]] = {"DynamicCache": lambda: DynamicCache(config=config)}
    for backend, kwargs in HF_BACKENDS:
        try:
            QuantizedCache(backend, config, **kwargs)
        except (ImportError, ValueError):  # backend not installed, or a model with sliding-window layers
            continue
        bits = kwargs.get("nbits", 8)
        factories[f"HF QuantizedCache {backend} {bits}-bit"] = lambda b=backend, k=kwargs: QuantizedCache(
            b, config, **k
        )
    shared = {"group_size": GROUP_SIZE, "residual_length": RESIDUAL_LENGTH}
    for bits in (8, 4, 2):
        factories[f"KIVI {bits}-bit"] = lambda b=bits: KIVICache(config, bits=b, **shared)
    # keys carry the error that matters at 2 bits (KVQuant's outlier channels): 2-bit values, 4-bit keys
    factories["KIVI 2-bit, 4-bit keys"] = lambda: KIVICache(config, bits=2, key_bits=4, **shared)
    if any(kind == "sliding_attention" for kind, _ in decoder_layer_types(config)):  # compressed windows or not
        for bits in (4, 2):
            factories[f"KIVI {bits}-bit, full-precision windows"] = lambda b=bits: KIVICache(
                config, bits=b, sliding_layers="window", **shared
            )
    for bits in (4, 2):
        factories[f"GEAR {bits}-bit"] = lambda b=bits: GEARCache(config, bits=b, rank=4, outlier_ratio=0.02, **shared)
    factories["GEAR-L 2-bit"] = lambda: GEARCache(config, bits=2, rank=4, outlier_ratio=0.0, **shared)
    # a lighter correction, for a comparison with KIVI 2-bit at similar bytes
    factories[LIGHT_GEAR] = lambda: GEARCache(config, bits=2, rank=1, outlier_ratio=0.01, **shared)
    factories["Streaming 50%"] = lambda: StreamingCache(config, sink_tokens=4, window=budget - 4)
    factories["H2O 50%"] = lambda: HeavyHitterCache(config, budget=budget, recent=budget // 2)
    factories["Keyformer 50%"] = lambda: HeavyHitterCache(config, budget=budget, recent=budget // 2, score="keyformer")
    snap_budget = budget - (total_len - prompt_len)  # the continuation is appended uncompressed
    factories["SnapKV 50%"] = lambda: SnapKVCache(config, budget=snap_budget, window=window, kernel=7)
    return factories


def teacher_forced(model, ids: torch.Tensor, prompt_len: int, cache: Cache) -> tuple[float, int, float]:
    """Prefills `ids[:, :prompt_len]` through `cache`, then feeds the rest one token at a time.

    Returns:
        `(float, int, float)`: summed negative log-likelihood of the continuation tokens, their count, and the
        mean bytes the cache held over the decode steps.
    """
    with torch.inference_mode():
        logits = model(ids[:, :prompt_len], use_cache=True, **cache_kwarg(cache)).logits[:, -1]
        nll, held = 0.0, []
        for t in range(prompt_len, ids.shape[1]):
            nll += F.cross_entropy(logits.float(), ids[:, t], reduction="sum").item()
            logits = model(ids[:, t : t + 1], use_cache=True, **cache_kwarg(cache)).logits[:, -1]
            held.append(held_bytes(cache))
    return nll, ids.shape[1] - prompt_len, sum(held) / len(held)


def _texts(tokenizer, kind: str, n: int, length: int, device: str) -> list[torch.Tensor]:
    """The first `length` tokens of the first `n` test-split documents of `kind` that are long enough."""
    from hf_efficient.reference import reference_corpus

    texts = []
    for document in reference_corpus("test", kind):
        ids = tokenizer(document, return_tensors="pt")["input_ids"]
        if ids.shape[1] >= length:
            texts.append(ids[:, :length].to(device))
        if len(texts) == n:
            return texts
    raise ValueError(f"only {len(texts)} test {kind} documents have >= {length} tokens; asked for n={n}")


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from hf_efficient.reference import reference_model

    report = BenchReport(
        "cache",
        "Compressed KV caches on real models: perplexity, bytes held and decode speed vs DynamicCache / HF "
        "QuantizedCache",
        device=device,
        setup=_setup(quick),
    )
    for name, budget in MODELS.items():
        model, tokenizer = reference_model(name, dtype=torch.float32)
        model = model.to(device).eval()
        if quick:
            budget = (48, 8, 8, 1)
        only = GEMMA_METHODS if name.startswith("gemma") else None
        _measure_model(report, name, model, tokenizer, budget, device, ("code",) if quick else ("code", "prose"), only)
        if quick:
            break
    missing = sorted({b for b, _ in HF_BACKENDS if not any(b in r["method"] for r in report.rows)})
    if missing:
        report.note(f"HF QuantizedCache backends not installed here: {missing}")
    _targets(report)
    report.plot = lambda fig: _scatter(report, fig)
    return report


def _setup(quick: bool) -> str:
    budgets = "; ".join(
        f"{name}: {prompt}-token prompt, {steps} teacher-forced decode steps, {texts} test text(s) per kind"
        for name, (prompt, steps, _, texts) in MODELS.items()
    )
    return (
        f"fp32, batch 1, test split of the reference corpus. {budgets} (frozen before measuring). Quantized caches "
        f"(ours and HF's): group size {GROUP_SIZE}, residual {RESIDUAL_LENGTH} tokens in full precision. Eviction "
        "caches hold half the prompt + continuation at the end (50%); SnapKV keeps what is left of that budget "
        "from the prompt and appends the continuation. bytes = mean held over the decode steps. Each text is one "
        "interleaved round of every method; speed_ratio = median over texts of (method tokens/s) / (DynamicCache "
        "tokens/s), prefill + decode, per kind. On Gemma-3-270M only the methods that show the sliding-window "
        "question run." + (" QUICK smoke run." if quick else "")
    )


def _measure_model(report, name, model, tokenizer, budget, device, kinds, only) -> None:
    prompt_len, continuation, window, n_texts = budget
    total = prompt_len + continuation
    factories = methods(model.config, prompt_len, total, window)
    if only is not None:
        factories = {method: f for method, f in factories.items() if method in only}
    for kind in kinds:
        texts = _texts(tokenizer, kind, n_texts, total, device)
        per_round: list[Interleaved] = []
        for ids in texts:
            works = {
                method: (lambda f=factory, ids=ids: teacher_forced(model, ids, prompt_len, f()))
                for method, factory in factories.items()
            }
            per_round.append(interleaved(works, rounds=1, warmup=0, device=device))
        base_nll = sum(r.results["DynamicCache"][0][0] for r in per_round)
        count = sum(r.results["DynamicCache"][0][1] for r in per_round)
        base_bytes = statistics.mean(r.results["DynamicCache"][0][2] for r in per_round)
        for method in factories:
            nll = sum(r.results[method][0][0] for r in per_round)
            nbytes = statistics.mean(r.results[method][0][2] for r in per_round)
            report.add_row(
                {
                    "model": name,
                    "method": method,
                    "kind": kind,
                    "ppl": math.exp(nll / count),
                    "ppl_ratio": math.exp((nll - base_nll) / count),
                    "bytes": int(nbytes),
                    "bytes_ratio": ratio(nbytes, base_bytes),
                    "tokens_per_s": total / statistics.median(r.times_s[method][0] for r in per_round),
                    "speed_ratio": statistics.median(r.speedup(method, "DynamicCache") for r in per_round),
                }
            )


def _row(report: BenchReport, model: str, method: str, kind: str) -> dict[str, Any] | None:
    return next((r for r in report.rows if (r["model"], r["method"], r["kind"]) == (model, method, kind)), None)


def _targets(report: BenchReport) -> None:
    """Notes on the targets set for real models (met or missed), per model and kind."""
    for model, kind in dict.fromkeys((r["model"], r["kind"]) for r in report.rows):
        ours = [
            r for r in report.rows if (r["model"], r["kind"]) == (model, kind) and not r["method"].startswith("HF")
        ]
        quantized = [r for r in ours if "bit" in r["method"]]
        # budgets in bytes (<= 30% / <= 20% of DynamicCache's), whatever the bit width that meets them
        for label, max_bytes, max_rise in (("4-bit-class budget", 0.30, 0.01), ("2-bit-class budget", 0.20, 0.05)):
            fitting = [r for r in quantized if r["bytes_ratio"] <= max_bytes]
            if not fitting:
                report.note(f"{model} {kind}: no quantized cache of ours holds <= {max_bytes:.0%} of the bytes")
                continue
            best = min(fitting, key=lambda r: r["ppl_ratio"])
            verdict = "met" if best["ppl_ratio"] - 1 <= max_rise else "missed"
            report.note(
                f"{model} {kind}: best cache of ours within <= {max_bytes:.0%} of the bytes ({label}): "
                f"{best['method']} at {best['bytes_ratio']:.1%}, ppl {best['ppl_ratio'] - 1:+.2%} (target "
                f"<= {max_rise:+.0%}): {verdict}"
            )
        two_bit = [r for r in quantized if "2-bit" in r["method"]]
        if two_bit:
            best = min(two_bit, key=lambda r: r["ppl_ratio"])
            report.note(
                f"{model} {kind}: best 2-bit cache of ours: {best['method']} at {best['bytes_ratio']:.1%} bytes, ppl "
                f"{best['ppl_ratio'] - 1:+.2%}"
            )
        quanto4, kivi4 = (
            _row(report, model, "HF QuantizedCache quanto 4-bit", kind),
            _row(report, model, "KIVI 4-bit", kind),
        )
        if quanto4 and kivi4:
            report.note(
                f"{model} {kind}: KIVI 4-bit ppl {kivi4['ppl_ratio'] - 1:+.2%} at {kivi4['bytes_ratio']:.1%} bytes vs "
                f"HF quanto 4-bit (same settings) {quanto4['ppl_ratio'] - 1:+.2%} at {quanto4['bytes_ratio']:.1%}"
            )
        for row in (r for r in ours if "50%" in r["method"]):
            verdict = "met" if row["ppl_ratio"] <= 1.03 else "missed"
            report.note(f"{model} {kind}: {row['method']} ppl {row['ppl_ratio'] - 1:+.2%} (target <= +3%): {verdict}")


def _scatter(report: BenchReport, fig: Any) -> None:
    panels = list(dict.fromkeys((r["model"], r["kind"]) for r in report.rows))
    for i, (model, kind) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for row in (r for r in report.rows if (r["model"], r["kind"]) == (model, kind)):
            ax.scatter(row["bytes_ratio"], row["ppl_ratio"])
            ax.annotate(row["method"], (row["bytes_ratio"], row["ppl_ratio"]), fontsize=5)
        ax.set_xlabel("bytes held / DynamicCache")
        ax.set_ylabel("perplexity / DynamicCache")
        ax.set_yscale("log")
        ax.set_title(f"{model}, {kind}", fontsize=8)
