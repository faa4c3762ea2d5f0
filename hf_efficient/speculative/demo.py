"""`hf-efficient demo` for speculative decoding: same greedy text, fewer target forwards, on the reference target and
on the real SmolLM2-135M-Instruct (a streamed chat answer)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["demo"]


def demo() -> None:
    """A streamed SmolLM2 chat answer through `TokenRecycling`; then, when the self-trained models are built, one code
    prompt with plain greedy, `TokenRecycling` and `DraftModel`, printing speed and acceptance."""
    from hf_efficient.bench.prompts import corpus_prompts
    from hf_efficient.reference import demo_trained_model
    from hf_efficient.speculative import DraftModel, TokenRecycling

    _real_chat()
    target, drafter = demo_trained_model("target"), demo_trained_model("drafter")
    if target is None or drafter is None:
        return
    (model, tokenizer), (drafter, _) = target, drafter
    print("\nself-trained reference target (code) with TokenRecycling and a self-trained DraftModel drafter:")
    inputs = tokenizer(corpus_prompts(tokenizer, "code", 1, "validation")[0], return_tensors="pt")
    kwargs = dict(max_new_tokens=48, do_sample=False)
    recycling = TokenRecycling()
    model.generate(**inputs, max_new_tokens=8, custom_generate=recycling)  # plans its tree for this machine
    print(f"prompt: ...{tokenizer.decode(inputs['input_ids'][0, -24:])!r}")
    reference, plain_s = None, None
    for name, strategy in (("plain greedy", None), ("TokenRecycling", recycling), ("DraftModel", DraftModel(drafter))):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs, **({"custom_generate": strategy} if strategy else {}))
        seconds = time.perf_counter() - start
        reference = out if reference is None else reference
        plain_s = plain_s or seconds
        accepted = f"{strategy.stats.mean_accepted:.2f}" if strategy else "1.00"
        print(
            f"{name:>15}: {seconds:5.2f} s ({plain_s / seconds:4.2f}x), {accepted} tokens per target forward, "
            f"identical to plain greedy: {torch.equal(out, reference)}"
        )
    print(f"continuation: {tokenizer.decode(reference[0, inputs['input_ids'].shape[1] :])!r}")


def _real_chat() -> None:
    """A chat answer from the real SmolLM2-135M-Instruct, streamed through `TokenRecycling`, timed against plain."""
    from transformers import TextStreamer

    from hf_efficient.reference.real import demo_real_model
    from hf_efficient.speculative import TokenRecycling

    loaded = demo_real_model()  # fp32: greedy output is then exactly plain generate's
    if loaded is None:
        return
    model, tokenizer = loaded

    def chat(text: str) -> dict:
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )

    kwargs = dict(max_new_tokens=64, do_sample=False)
    recycling = TokenRecycling()
    inputs = chat("Explain in two sentences what a KV cache is in a transformer.")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
        # the recycling state is learned on another question only, and reset to that before every timed run, so no
        # run profits from having seen this answer
        model.generate(**chat("Give three tips for writing clear Python code."), **kwargs, custom_generate=recycling)
        warm = Path(folder) / "warm.safetensors"
        recycling.save(warm)
        print("\nSmolLM2-135M-Instruct (real, fp32), streamed through TokenRecycling:")
        streamed = model.generate(**inputs, **kwargs, custom_generate=recycling, streamer=streamer)
        timings: dict[str, list[float]] = {"plain": [], "recycling": []}
        for _ in range(2):  # interleaved rounds
            for name, extra in (("plain", {}), ("recycling", {"custom_generate": recycling})):
                recycling.load(warm)
                start = time.perf_counter()
                out = model.generate(**inputs, **kwargs, **extra)
                timings[name].append(time.perf_counter() - start)
    ratio = statistics.median(p / r for p, r in zip(timings["plain"], timings["recycling"]))
    print(
        f"plain greedy {min(timings['plain']):.2f} s, TokenRecycling {min(timings['recycling']):.2f} s: {ratio:.2f}x "
        f"(median of 2 interleaved rounds), {recycling.stats.mean_accepted:.2f} tokens per target forward, "
        f"identical: {torch.equal(out, streamed)}"
    )
