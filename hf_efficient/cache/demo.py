"""`hf-efficient demo` section for the compressed caches and prepacking: a long chat prompt on the real
SmolLM2-135M-Instruct (about 30 s on a CPU), prepacked prompts, then the self-trained reference target if built."""

from __future__ import annotations

import time

import torch

__all__ = ["demo"]


def demo() -> None:
    """Every cache on a long SmolLM2 chat prompt (bytes held, time, answer), prepacked prompts, then every cache on
    the reference target when it is built."""
    from hf_efficient.reference import demo_trained_model
    from hf_efficient.reference.real import demo_real_model

    if (real := demo_real_model()) is not None:
        _real_model_caches(*real)
        _prepack(*real)
    if (target := demo_trained_model("target")) is not None:
        _reference_caches(*target)


def _reference_caches(model, tokenizer) -> None:
    """Generate with every cache on the self-trained reference target, printing bytes held and text."""
    from hf_efficient.cache import GEARCache, HeavyHitterCache, KIVICache, SnapKVCache, StreamingCache
    from hf_efficient.compat import DynamicCache
    from hf_efficient.reference import reference_corpus

    document = next(d for d in reference_corpus("validation", "code") if len(d) > 2000)
    ids = tokenizer(document, return_tensors="pt")["input_ids"][:, :96]
    config = model.config
    caches = {
        "DynamicCache": lambda: DynamicCache(config=config),
        "GEARCache 4-bit": lambda: GEARCache(config, bits=4, rank=4),
        "GEARCache 2-bit": lambda: GEARCache(config, bits=2, rank=4),
        "KIVICache 2-bit": lambda: KIVICache(config, bits=2),
        "StreamingCache 4+44": lambda: StreamingCache(config, sink_tokens=4, window=44),
        "HeavyHitterCache h2o 48": lambda: HeavyHitterCache(config, budget=48),
        "HeavyHitterCache keyformer 48": lambda: HeavyHitterCache(config, budget=48, score="keyformer"),
        "SnapKVCache 40": lambda: SnapKVCache(config, budget=40, window=16),
    }
    print(f"Compressed KV caches on the reference target: {ids.shape[1]}-token code prompt, 12 greedy tokens")
    _compare(model, tokenizer, {"input_ids": ids}, caches, dict(max_new_tokens=12, min_new_tokens=12), 60)


def _prepack(model, tokenizer) -> None:
    """Prefill prompts of different lengths packed into rows; the greedy tokens equal one-by-one `generate`'s."""
    from hf_efficient.prefill import prepacked_generate
    from hf_efficient.reference import reference_corpus

    prose = reference_corpus("test", "prose")[:6]
    prompts = [tokenizer(text)["input_ids"][: 16 + 24 * i] for i, text in enumerate(prose)]
    start = time.perf_counter()
    packed = prepacked_generate(model, prompts, max_new_tokens=4, do_sample=False)
    packed_s = time.perf_counter() - start
    start = time.perf_counter()
    alone = [
        model.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )[0]
        for p in prompts
    ]
    alone_s = time.perf_counter() - start
    same = sum(torch.equal(a, b) for a, b in zip(packed, alone))
    lengths = [len(p) for p in prompts]
    print(
        f"Prepacking {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens: {packed_s:.2f}s packed vs "
        f"{alone_s:.2f}s one by one; greedy outputs identical for {same}/{len(prompts)}"
    )


def _held_bytes(cache) -> int:
    """What a cache holds: our caches report it; HF's `DynamicCache` is summed over its layers."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def _compare(model, tokenizer, inputs: dict, caches: dict, generate_kwargs: dict, chars: int) -> None:
    """Greedy generation with every cache of `caches` (name -> factory): bytes held, time and the text."""
    from hf_efficient.compat import cache_kwarg

    baseline, prompt = None, inputs["input_ids"].shape[1]
    for name, factory in caches.items():
        cache = factory()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, **generate_kwargs, **cache_kwarg(cache))
        seconds = time.perf_counter() - start
        held = _held_bytes(cache)
        baseline = baseline or held
        text = tokenizer.decode(out[0, prompt:], skip_special_tokens=True)[:chars]
        print(f"  {name:<30} {held / 1024:8.1f} KiB ({held / baseline:6.1%})  {seconds:5.2f}s  {text!r}")


def _real_model_caches(model, tokenizer) -> None:
    """A long chat prompt (a test-split document to summarize) on the real SmolLM2-135M-Instruct."""
    from hf_efficient.cache import GEARCache, KIVICache, SnapKVCache, StreamingCache
    from hf_efficient.compat import DynamicCache
    from hf_efficient.reference import reference_corpus

    document = next(d for d in reference_corpus("test", "prose") if len(d) > 3000)[:3000]
    chat = [{"role": "user", "content": f"Summarize this text in two sentences:\n\n{document}"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    config = model.config
    caches = {
        "DynamicCache": lambda: DynamicCache(config=config),
        "GEARCache 4-bit": lambda: GEARCache(config, bits=4),
        "KIVICache 2-bit": lambda: KIVICache(config, bits=2),
        "KIVICache 2-bit, 4-bit keys": lambda: KIVICache(config, bits=2, key_bits=4),
        "StreamingCache 4+252": lambda: StreamingCache(config, sink_tokens=4, window=252),
        "SnapKVCache 256": lambda: SnapKVCache(config, budget=256),
    }
    length = inputs["input_ids"].shape[1]
    print(f"SmolLM2-135M-Instruct (real): a {length}-token chat prompt (summarize a test-split document), 40 tokens")
    _compare(model, tokenizer, inputs, caches, dict(max_new_tokens=40), 70)
