"""Benchmark prompts cut from a split of the reference corpus (shared by the decoding benchmarks).

Reported figures use the test split; the validation split is for tuning and for warming learned state."""

from __future__ import annotations

from typing import Literal

from transformers import PreTrainedTokenizerBase

__all__ = ["corpus_prompts"]


def corpus_prompts(
    tokenizer: PreTrainedTokenizerBase,
    kind: Literal["code", "prose"],
    n: int,
    split: Literal["validation", "test"] = "test",
    prompt_tokens: int = 128,
    min_continuation_tokens: int = 128,
) -> list[str]:
    """The first `prompt_tokens` tokens of the first `n` documents of `split` and `kind` that are long enough.

    Documents shorter than `prompt_tokens + min_continuation_tokens` are skipped, so every prompt has a real
    continuation in the corpus (the text a model is expected to produce). Deterministic.
    """
    from hf_efficient.reference import reference_corpus

    prompts = []
    for document in reference_corpus(split, kind):
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens + min_continuation_tokens:
            prompts.append(tokenizer.decode(ids[:prompt_tokens]))
        if len(prompts) == n:
            return prompts
    raise ValueError(
        f"only {len(prompts)} {split} {kind} documents have >= {prompt_tokens} + "
        f"{min_continuation_tokens} tokens; asked for n={n}"
    )
