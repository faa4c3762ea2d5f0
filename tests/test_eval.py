"""Perplexity, bits per byte and the gzip baseline (`hf_efficient.eval`) on tiny models with known answers."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
from factories import tiny_causal_lm, tiny_tokenizer
from torch import nn
from transformers import PreTrainedTokenizerFast

from hf_efficient.eval import (
    _windows,
    bits_per_byte,
    continuation_bits_per_byte,
    gzip_bits_per_byte,
    negative_log_likelihood,
    perplexity,
)

TEXTS = [
    "def add(a, b):\n    return a + b\n" * 6,
    "Return the sum of two numbers. Ünïcode is counted in UTF-8 bytes: ✓.",
    "x",
]


class UniformLM(nn.Module):
    """Every next token equally likely: NLL is exactly log(V) per scored token."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.vocab_size = vocab_size
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))  # (B, L, V)


class BigramLM(nn.Module):
    """Logits depend on the current token only, so any window >= 2 gives exactly the same scores."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(max_position_embeddings=16)
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table(input_ids))  # (B, L, V)


def test_windows_score_every_target_once():
    for n, window, stride in [(7, 4, 2), (100, 16, 5), (10, 32, 8), (9, 3, 2), (50, 8, 1), (5, 2, 1)]:
        spans = _windows(n, window, stride)
        scored = [t for begin, end, first in spans for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - begin <= window and first > begin for begin, end, first in spans)
        assert all(first - begin >= min(window - stride, first) for begin, end, first in spans[1:])


def test_uniform_model_scores_log2_vocab_per_token():
    tokenizer = tiny_tokenizer()
    model = UniformLM(len(tokenizer))
    n_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    result = negative_log_likelihood(model, tokenizer, TEXTS, window=16, stride=4, batch_size=3)
    assert result.tokens == n_tokens and result.bytes == n_bytes  # every token scored, the first given <s>
    expected = math.log2(len(tokenizer)) * n_tokens / n_bytes
    assert bits_per_byte(model, tokenizer, TEXTS) == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, tokenizer, TEXTS) == pytest.approx(len(tokenizer), rel=1e-5)


def test_byte_level_tokenizer_scores_one_token_per_byte():
    tokenizer = tiny_tokenizer(vocab_size=259)  # 256 byte symbols + 3 specials: no merges
    model = UniformLM(len(tokenizer))
    result = negative_log_likelihood(model, tokenizer, TEXTS)
    assert result.tokens == result.bytes == sum(len(t.encode()) for t in TEXTS)
    assert result.bits_per_byte == pytest.approx(math.log2(259), rel=1e-6)


def test_without_start_token_the_first_token_is_not_counted():
    bare = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer().backend_tokenizer)
    assert bare.bos_token_id is None and bare.eos_token_id is None
    model = UniformLM(len(bare))
    result = negative_log_likelihood(model, bare, TEXTS)
    ids = [bare(t)["input_ids"] for t in TEXTS]
    assert result.tokens == sum(len(i) - 1 for i in ids)
    first_bytes = sum(len(bare.decode(i[:1]).encode()) for i in ids)
    assert result.bytes == sum(len(t.encode()) for t in TEXTS) - first_bytes


def test_windowed_equals_unwindowed_for_a_bigram_model():
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = BigramLM(len(tokenizer))
    full = negative_log_likelihood(model, tokenizer, TEXTS, window=4096)
    for window, stride in [(2, 1), (5, 2), (8, 7), (16, None)]:
        windowed = negative_log_likelihood(model, tokenizer, TEXTS, window=window, stride=stride, batch_size=2)
        assert windowed.tokens == full.tokens and windowed.bytes == full.bytes
        assert windowed.nats == pytest.approx(full.nats, rel=1e-5)
    # brute force: sum over every text of -log p(next | current), the first token given <s>
    expected = 0.0
    for text in TEXTS:
        ids = torch.tensor([tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]])
        log_probs = torch.log_softmax(model.table(ids[:-1]), dim=-1)  # (L-1, V)
        expected -= log_probs.gather(-1, ids[1:, None]).sum().item()
    assert full.nats == pytest.approx(expected, rel=1e-5)


def test_continuation_scores_only_the_continuation_given_its_context():
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = BigramLM(len(tokenizer))
    pairs = [(text[: len(text) // 2], text[len(text) // 2 :]) for text in TEXTS] + [("", TEXTS[0])]
    expected_bits, n_bytes = 0.0, 0
    for context, continuation in pairs:  # brute force: the first continuation token follows the context's last
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        ids = [tokenizer.bos_token_id, *context_ids, *tokenizer(continuation, add_special_tokens=False)["input_ids"]]
        ids = torch.tensor(ids)
        log_probs = torch.log_softmax(model.table(ids[:-1]), dim=-1).gather(-1, ids[1:, None])[:, 0]  # (L-1,)
        expected_bits -= log_probs[len(context_ids) :].sum().item() / math.log(2)
        n_bytes += len(continuation.encode())
    bpb = continuation_bits_per_byte(model, tokenizer, pairs, batch_size=2)
    assert bpb == pytest.approx(expected_bits / n_bytes, rel=1e-5)
    # a transformer: batching (right padding) does not change the scores; the context does
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    one_by_one = continuation_bits_per_byte(model, tokenizer, pairs, batch_size=1)
    assert continuation_bits_per_byte(model, tokenizer, pairs, batch_size=8) == pytest.approx(one_by_one, rel=1e-4)
    other_context = [("zzzz qqqq", continuation) for _, continuation in pairs]
    assert continuation_bits_per_byte(model, tokenizer, other_context) != pytest.approx(one_by_one, rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformer_padding_and_windows(arch):
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(arch, vocab_size=len(tokenizer))
    one_by_one = negative_log_likelihood(model, tokenizer, TEXTS, window=512, batch_size=1)
    batched = negative_log_likelihood(model, tokenizer, TEXTS, window=512, batch_size=8)  # right padding
    assert batched.nats == pytest.approx(one_by_one.nats, rel=1e-4)
    windowed = negative_log_likelihood(model, tokenizer, TEXTS, window=24, stride=8)
    assert windowed.tokens == one_by_one.tokens
    assert windowed.nats == pytest.approx(one_by_one.nats, rel=0.1)  # less context, similar total


def test_perplexity_and_bits_per_byte_agree():
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    result = negative_log_likelihood(model, tokenizer, TEXTS)
    ppl, bpb = perplexity(model, tokenizer, TEXTS), bits_per_byte(model, tokenizer, TEXTS)
    assert bpb == pytest.approx(math.log2(ppl) * result.tokens / result.bytes, rel=1e-5)


def test_bad_window():
    tokenizer = tiny_tokenizer()
    for stride in (8, 9):
        with pytest.raises(ValueError, match=f"stride={stride}"):
            bits_per_byte(UniformLM(len(tokenizer)), tokenizer, TEXTS, window=8, stride=stride)


def test_gzip_bits_per_byte():
    assert gzip_bits_per_byte(["abc" * 10_000]) < 0.1
    assert 4.0 < gzip_bits_per_byte([os.urandom(20_000).hex()]) < 5.0  # 16 random symbols: 4 bits + overhead
    assert gzip_bits_per_byte(TEXTS, level=1) >= gzip_bits_per_byte(TEXTS, level=9)
    twice = [TEXTS[1], TEXTS[1]]  # the second copy is nearly free only when compressed as one stream
    assert gzip_bits_per_byte(twice, per_document=False) < 0.7 * gzip_bits_per_byte(twice)
    assert gzip_bits_per_byte(twice) == pytest.approx(gzip_bits_per_byte(TEXTS[1:2]))
    with pytest.raises(ValueError, match="empty"):
        gzip_bits_per_byte([])
