"""`hf-efficient demo` for speculative decoding: same greedy text, fewer target forwards, on the reference target."""

from __future__ import annotations

import time

import torch

__all__ = ["demo"]


def demo() -> None:
    """Decode one code prompt with plain greedy, `TokenRecycling` and `DraftModel`; print speed and acceptance."""
    from hf_efficient.bench.prompts import validation_prompts
    from hf_efficient.reference import reference_model
    from hf_efficient.speculative import DraftModel, TokenRecycling

    model, tokenizer = reference_model("target")
    drafter, _ = reference_model("drafter")
    inputs = tokenizer(validation_prompts(tokenizer, "code", 1)[0], return_tensors="pt")
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
