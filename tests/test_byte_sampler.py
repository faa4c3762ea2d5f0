"""ByteLevelSampler: exact next-byte distributions equal a brute-force sum over all cover encodings."""

import math

import pytest
import torch
from factories import tiny_causal_lm, tiny_hybrid_lm, tiny_tokenizer

from hf_efficient.tokenization import ByteLevelSampler


@pytest.fixture(scope="module")
def tiny_vocab():
    """A tiny-vocabulary byte-level BPE (256 bytes + a few merges) so that every cover can be enumerated."""
    return tiny_tokenizer(272)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def sampler(request, tiny_vocab):
    return ByteLevelSampler(tiny_causal_lm(request.param, vocab_size=len(tiny_vocab)), tiny_vocab)


@torch.no_grad()
def _sequence_logp(model, ids):
    logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)  # (L, V), no cache
    return sum(float(logits[i, ids[i + 1]]) for i in range(len(ids) - 1))


def _brute_force(sampler, data: bytes) -> torch.Tensor:
    """Enumerate every token sequence whose bytes before the last token are a prefix of `data` and whose bytes
    extend past `data`; keep the canonical ones (the tokenizer's own encoding); sum probabilities per next byte."""
    table = sampler.token_bytes
    tokens = [i for i, b in enumerate(table) if b]
    masses = torch.zeros(256, dtype=torch.float64)
    stack = [([], b"")]
    while stack:
        seq, decoded = stack.pop()
        for v in tokens:
            full = decoded + table[v]
            if len(full) <= len(data):
                if data.startswith(full):
                    stack.append(([*seq, v], full))
            elif full.startswith(data) and sampler.encode_bytes(full) == [*seq, v]:
                masses[full[len(data)]] += math.exp(_sequence_logp(sampler.model, [sampler.start, *seq, v]))
    return masses / masses.sum()


def _brute_force_prefix(sampler, data: bytes) -> float:
    """log P(data): every canonical sequence whose last token starts inside `data` and whose bytes start with it."""
    table = sampler.token_bytes
    tokens = [i for i, b in enumerate(table) if b]
    terms, stack = [], [([], b"")]
    while stack:
        seq, decoded = stack.pop()
        for v in tokens:
            full = decoded + table[v]
            if len(full) < len(data) and data.startswith(full):
                stack.append(([*seq, v], full))
            elif full.startswith(data) and sampler.encode_bytes(full) == [*seq, v]:
                terms.append(_sequence_logp(sampler.model, [sampler.start, *seq, v]))
    return float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0))


@pytest.mark.parametrize("prompt", ["t", "the", "the cat sa", "a  ", "é", "日".encode()[:2]])
def test_prefix_probability_matches_brute_force(sampler, prompt):
    data = prompt.encode() if isinstance(prompt, str) else prompt
    assert sampler.prefix_logprob(data) == pytest.approx(_brute_force_prefix(sampler, data), abs=1e-5)
    logps = sampler.byte_logprobs(data)
    assert float(logps.sum()) == pytest.approx(sampler.prefix_logprob(data), abs=1e-5)


@pytest.mark.parametrize(
    "prompt",
    ["", "the", "the cat sa", "a  ", "é", "日".encode()[:2], "ab\ncd"],
    ids=["empty", "word", "mid-word", "spaces", "accent", "mid-char", "newline"],
)
def test_matches_brute_force_enumeration(sampler, prompt):
    data = prompt.encode() if isinstance(prompt, str) else prompt
    probs = sampler.next_byte_distribution(data)
    assert probs.shape == (256,) and abs(float(probs.sum()) - 1.0) < 1e-5
    torch.testing.assert_close(probs.double(), _brute_force(sampler, data), atol=1e-5, rtol=1e-4)


def test_covers_are_canonical_and_cache_is_reused(sampler):
    data = b"sat on a co"  # "co" may end here or continue as "ct"
    covers = sampler.covers(data)
    assert len(covers) >= 2  # several splits contribute (mid-token prompt)
    for prefix, last, _ in covers:
        for v in last.tolist():
            assert sampler.encode_bytes(sampler.decode_ids([*prefix, v])) == [*prefix, v]
    before = sampler.scorer.tokens_run
    sampler.next_byte_distribution(data)
    covered = sum(len(prefix) + 1 for prefix, _, _ in covers)
    assert sampler.scorer.tokens_run - before < covered  # shared prefixes were not recomputed
    before = sampler.scorer.tokens_run
    sampler.next_byte_distribution(data + b"a")  # the next byte reuses the previous byte's cache
    assert sampler.scorer.tokens_run - before <= 2 * sampler.max_token_bytes


def test_generation_and_completion(sampler):
    greedy = sampler.generate("the cat", max_new_bytes=6)
    assert greedy == sampler.generate("the cat", max_new_bytes=6)  # deterministic
    sampled = sampler.generate("the ", max_new_bytes=6, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert isinstance(sampled, str) and len(sampled.encode("utf-8", errors="replace")) <= 6 * 3
    completion = sampler.complete("the ca", max_new_bytes=5)
    assert not any(c.isspace() for c in completion)


def test_ensemble_of_two_tokenizers(tiny_vocab):
    other = tiny_tokenizer(300)
    a = ByteLevelSampler(tiny_causal_lm("llama", vocab_size=len(tiny_vocab)), tiny_vocab)
    b = ByteLevelSampler(tiny_causal_lm("qwen2", vocab_size=len(other)), other)
    both = ByteLevelSampler.ensemble([(a.model, tiny_vocab), (b.model, other)], weights=[3, 1])
    probs = both.next_byte_distribution("the ca")
    expected = 0.75 * a.next_byte_distribution("the ca") + 0.25 * b.next_byte_distribution("the ca")
    torch.testing.assert_close(probs, expected)
    assert isinstance(both.complete("the ca", max_new_bytes=4), str)


def test_rejects_non_byte_level_and_bad_settings(sampler):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[UNK]")
    with pytest.raises(ValueError, match="byte-level"):
        ByteLevelSampler(sampler.model, word_level)
    with pytest.raises(ValueError, match="temperature"):
        sampler.generate("a", temperature=0.0, do_sample=True)


def test_scorer_crops_exactly_past_a_sliding_window():
    """Covers revisit prefixes in any order; the scorer's cache must roll back exactly, also past a sliding window."""
    from hf_efficient.tokenization.byte_probabilities import _PrefixScorer

    model = tiny_hybrid_lm(sliding_window=4, dtype=torch.float64)
    scorer = _PrefixScorer(model, memo_size=0)
    base = torch.randint(3, 96, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    for ids in [base, [*base[:9], 5, 6], base, [*base[:3], 7], [*base, 8, 9], base[:12]]:
        prefix_logp, last = scorer([1, *ids])
        with torch.no_grad():
            full = model(torch.tensor([[1, *ids]])).logits[0].log_softmax(-1)  # (L, V), no cache
        assert prefix_logp == pytest.approx(sum(float(full[i, ids[i]]) for i in range(len(ids))), abs=1e-9)
        torch.testing.assert_close(last, full[-1])
