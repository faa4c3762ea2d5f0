"""Hand-run A/B of our caches' per-call attention routing (BENCHMARKS.md, "Per-call attention routing").

The same caches decode with the model on "sdpa" (each layer's call routed to "hfe_kv" and back) and with the model
opted in for good (`set_attn_implementation("hfe_kv")`, no switching), interleaved; prints the median per-step ratio.

    HF_HUB_OFFLINE=1 .venv/bin/python docs/benchmarks/routing_overhead.py
"""

import statistics
import time

import torch

from hf_efficient.cache import GEARCache, KIVICache, StreamingCache
from hf_efficient.compat import DynamicCache, cache_kwarg
from hf_efficient.reference import reference_corpus, reference_model

PROMPT_TOKENS, STEPS, ROUNDS = 512, 64, 5


def per_step_seconds(model, ids: torch.Tensor, cache) -> float:
    with torch.inference_mode():
        token = model(ids, use_cache=True, **cache_kwarg(cache)).logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(STEPS):
            token = model(token, use_cache=True, **cache_kwarg(cache)).logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / STEPS


def main() -> None:
    torch.set_num_threads(2)
    model, tokenizer = reference_model("target")
    text = "\n".join(reference_corpus("test", "code")[:4])
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
    caches = {
        "StreamingCache 4 + 252": lambda: StreamingCache(model.config, sink_tokens=4, window=252),
        "GEARCache 4-bit": lambda: GEARCache(model.config, bits=4),
        "KIVICache 2-bit": lambda: KIVICache(model.config, bits=2),
        "DynamicCache (never routed)": lambda: DynamicCache(config=model.config),
    }
    ratios: dict[str, list[float]] = {name: [] for name in caches}
    for _ in range(ROUNDS):
        for name, make in caches.items():
            model.set_attn_implementation("sdpa")
            routed = per_step_seconds(model, ids, make())
            model.set_attn_implementation("hfe_kv")
            opted_in = per_step_seconds(model, ids, make())
            ratios[name].append(routed / opted_in)
    for name, values in ratios.items():
        print(f"{name}: {statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})")


if __name__ == "__main__":
    main()
