"""ByteLevelSampler on SentencePiece BPE with byte fallback (Gemma, Llama-2, Mistral conventions).

Tiny tokenizers of each kind are built with `tokenizers`: a BPE with `byte_fallback=True` and `<0x00>`..`<0xFF>`, `▁`
for spaces, merges that interact (including one ranked before the token it needs, as converted SentencePiece merge
lists have), the whole U+00C0..U+00FF block as characters (so a text cut after `0xC3` has no byte-token cover), `日`
but not its neighbours (so a cut `0xE6 0x97` does), and non-special added tokens in the Gemma-style one. The ground
truth enumerates every token sequence and keeps those the tokenizer itself produces: `encode(decode(t)) == t`, or,
for a sequence that ends inside a character, some completion of that character whose encoding starts with `t`.
"""

import functools
import itertools
import math

import pytest
import torch
from factories import tiny_causal_lm, tiny_tokenizer
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_efficient.tokenization import ByteLevelSampler
from hf_efficient.tokenization.vocabulary import text_prefix, token_bytes

CHARS = ["▁", "a", "b", "c", "t", "<", ">", "日", "本", *map(chr, range(0xC0, 0x100))]
MERGES = [  # rank order; ("▁", "ca") comes before ("c", "a") makes "ca"
    ("a", "b"),
    ("▁", "a"),
    ("b", "c"),
    ("▁", "ca"),
    ("ab", "c"),
    ("c", "a"),
    ("▁a", "bc"),
    ("▁", "▁"),
    ("c", "é"),
    ("é", "a"),
    ("日", "本"),
    ("▁", "日"),
    ("▁", "c"),
    ("a", "▁"),
    ("b", "a"),
    ("▁", "b"),
    ("ü", "b"),
    ("▁▁", "▁"),
    ("<", "t"),
    ("t", ">"),
]
KINDS = ("gemma", "llama2", "metaspace", "metaspace-split")


@functools.cache
def sentencepiece_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A tiny SentencePiece-style BPE with byte fallback: `gemma` (normalizer `▁`, no prefix, non-special added
    tokens), `llama2` (legacy normalizer `Prepend("▁")` + `Replace`), `metaspace` (Metaspace, prepend "first") and
    `metaspace-split` (Metaspace, prepend "always", split before every `▁`)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for piece in [f"<0x{b:02X}>" for b in range(256)] + CHARS + [a + b for a, b in MERGES]:
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab, MERGES, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if kind == "gemma":
        backend.normalizer = normalizers.Replace(" ", "▁")
    elif kind == "llama2":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        split = kind == "metaspace-split"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            "▁", prepend_scheme="always" if split else "first", split=split
        )
    backend.decoder = decoders.Sequence(steps if kind == "gemma" else [*steps, decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    if kind == "gemma":
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in ("\n", "\n\n", "<t>")])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@functools.cache
def sampler_for(kind: str, arch: str = "llama") -> ByteLevelSampler:
    tokenizer = sentencepiece_tokenizer(kind)
    return ByteLevelSampler(tiny_causal_lm(arch, vocab_size=len(tokenizer), dtype=torch.float64), tokenizer)


# ------------------------------------------------------------------------------------------------ ground truth
@functools.cache
def _completions(partial: bytes) -> list[str]:
    """Characters whose UTF-8 starts with `partial`: every continuation to the lead byte's length that decodes."""
    length = 2 if partial[0] < 0xE0 else 3 if partial[0] < 0xF0 else 4
    out = []
    for rest in itertools.product(range(0x80, 0xC0), repeat=max(length - len(partial), 0)):
        try:
            out.append((partial + bytes(rest)).decode())
        except UnicodeDecodeError:
            continue
    return out


def _is_canonical(sampler: ByteLevelSampler, ids: list[int]) -> bool:
    """`ids` is (a prefix of) what the tokenizer itself produces for some text.

    The token space is `prefix + text`; the tokenizer produces it from the text, or, for Metaspace, which adds no `▁`
    before a text that starts with a space, from the token-space string itself. A sequence that ends inside a character
    is canonical when some completion of the character is encoded starting with it; those whose complete-character
    part (past the prefix) is not canonical are rejected first (prefixes of canonical sequences are canonical).
    """
    tokenizer, data = sampler.tokenizer, b"".join(sampler.token_bytes[i] for i in ids)
    if not data.startswith(sampler.prefix):
        return False

    def encode(text: str) -> list[int]:  # the tokenizer's own pipeline (normalizer, prefix, added tokens, BPE)
        return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def spells(head: list[int], text: str) -> bool:  # the encoding of `text`, or, for the prefix alone, its start
        if text == sampler.prefix.decode():
            return not head or any(encode(char)[: len(head)] == head for char in ["ж", *CHARS])
        return any(encode(source) == head for source in {text, text[len(sampler.prefix) :]})

    for cut in range(4):
        try:
            text = data[: len(data) - cut].decode()
        except UnicodeDecodeError:
            continue
        if not cut:
            return spells(ids, text)
        if not spells(ids[: len(ids) - cut], text):
            return False
        sources = {text, text[len(sampler.prefix) :]}
        return any(
            encode(source + c)[: len(ids)] == ids for c in _completions(data[len(data) - cut :]) for source in sources
        )
    return False


def _brute_force(sampler: ByteLevelSampler, data: bytes) -> tuple[torch.Tensor, float]:
    """(next-byte masses normalised, log P(data)) summed over every canonical token sequence."""
    x, table, model = sampler.prefix + data, sampler.token_bytes, sampler.model
    tokens = [i for i, b in enumerate(table) if b]

    @functools.cache
    def next_logp(seq: tuple[int, ...]) -> torch.Tensor:  # log P(seq) + log P(v | seq) for every v, no KV cache
        with torch.no_grad():
            logits = model(torch.tensor([[sampler.start, *seq]])).logits[0].double().log_softmax(-1)  # (L, V)
        return sum(float(logits[i, seq[i]]) for i in range(len(seq))) + logits[-1]

    masses, prefix_terms, stack = torch.zeros(256, dtype=torch.float64), [], [((), b"")]
    while stack:
        seq, decoded = stack.pop()
        for v in tokens:
            full = decoded + table[v]
            if len(full) <= len(x) and x.startswith(full):
                stack.append(((*seq, v), full))
            if not full.startswith(x) or not _is_canonical(sampler, [*seq, v]):
                continue
            logp = float(next_logp(seq)[v])
            if len(decoded) < len(x):  # a cover of x: the last token starts inside x, the bytes start with x
                prefix_terms.append(logp)
            if len(full) > len(x):  # a cover of x . b
                masses[full[len(x)]] += math.exp(logp)
    log_prefix = (
        float(torch.logsumexp(torch.tensor(prefix_terms, dtype=torch.float64), 0)) if prefix_terms and x else 0.0
    )
    return masses / masses.sum(), log_prefix


PROMPTS = {
    "empty": b"",
    "word": b"ab",
    "mid-merge": b"a",
    "space": b"ab c",
    "lead-space": b" a",
    "spaces": b"a  ",
    "accent": "caé".encode(),
    "cut-in-vocab-char": "é".encode()[:1],  # every 0xC3 character is in the vocabulary: no byte cover
    "cut-fallback-char": "ж".encode()[:1],  # outside the vocabulary: byte tokens
    "cut-after-two-bytes": "日".encode()[:2],  # 日 is a token, its neighbours fall back
    "fallback-char": "aж".encode(),
}
GEMMA_PROMPTS = {"newline": b"a\n", "newlines": b"a\n\nb", "added-prefix": b"a<t", "added": b"<t>"}


@pytest.mark.parametrize(
    ("kind", "prompt"), [(k, p) for k in KINDS for p in PROMPTS] + [("gemma", p) for p in GEMMA_PROMPTS]
)
def test_matches_brute_force_enumeration(kind, prompt):
    sampler = sampler_for(kind)
    data = {**PROMPTS, **GEMMA_PROMPTS}[prompt]
    expected, log_prefix = _brute_force(sampler, data)
    probs = sampler.next_byte_distribution(data)
    assert abs(float(probs.double().sum()) - 1.0) < 1e-6
    torch.testing.assert_close(probs.double(), expected, atol=1e-6, rtol=1e-5)
    assert sampler.prefix_logprob(data) == pytest.approx(log_prefix, abs=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_covers_are_canonical_and_byte_logprobs_telescope(kind):
    sampler = sampler_for(kind, "qwen2")
    text = "ab cé日本 aж".encode()
    for cut in (len(text), len(text) - 1, 3):
        for prefix, last, _ in sampler.covers(text[:cut]):
            for v in last.tolist():
                assert _is_canonical(sampler, [*prefix, v]), (prefix, v)
    logps = sampler.byte_logprobs(text)
    assert logps.shape == (len(text),) and (logps <= 1e-12).all()
    total = sampler.prefix_logprob(text) - sampler.prefix_logprob(b"")
    assert float(logps.sum()) == pytest.approx(total, abs=1e-9)
    assert sampler.bits_per_byte(text) == pytest.approx(-total / len(text) / math.log(2), rel=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_token_bytes_prefix_and_partial_characters(kind):
    tokenizer, sampler = sentencepiece_tokenizer(kind), sampler_for(kind)
    table, vocab = token_bytes(tokenizer), tokenizer.get_vocab()
    assert table[vocab["▁abc"]] == b" abc" and table[vocab["<0xE6>"]] == b"\xe6" and table[vocab["<s>"]] is None
    assert text_prefix(tokenizer) == (b"" if kind == "gemma" else b" ")
    assert sampler.encode_bytes("é".encode()[:1]) is None  # 0xC3 never falls back to bytes here
    assert sampler.encode_bytes("aж".encode()[:2])[-1] == vocab["<0xD0>"]
    full = tokenizer("ab cж", add_special_tokens=False)["input_ids"]
    assert sampler.encode_bytes("ab cж".encode()) == full and sampler.decode_ids(full) == "ab cж".encode()
    with pytest.raises(ValueError, match="U\\+2581"):
        sampler.next_byte_distribution("a▁b")


def test_generation_and_ensemble_with_byte_level_bpe():
    sampler = sampler_for("gemma")
    assert sampler.generate("ab", max_new_bytes=5) == sampler.generate("ab", max_new_bytes=5)
    assert not any(c.isspace() for c in sampler.complete("ab c", max_new_bytes=4))
    cut = sampler.generate("cé".encode()[:2], max_new_bytes=3)  # a prompt cut inside "é": the text starts with it
    assert cut.encode()[:1] == b"\xc3" and "\ufffd" not in cut[:1]
    byte_level = tiny_tokenizer(272)
    other = ByteLevelSampler(tiny_causal_lm("qwen2", vocab_size=len(byte_level)), byte_level)
    both = ByteLevelSampler.ensemble([(sampler.model, sampler.tokenizer), (other.model, byte_level)], weights=[1, 3])
    mixed = both.byte_logprobs("ab c")
    expected = torch.logsumexp(
        torch.stack([sampler.byte_logprobs("ab c") + math.log(0.25), other.byte_logprobs("ab c") + math.log(0.75)]), 0
    )
    torch.testing.assert_close(mixed, expected)
    probs = both.next_byte_distribution("ab c")
    torch.testing.assert_close(
        probs, 0.25 * sampler.next_byte_distribution("ab c") + 0.75 * other.next_byte_distribution("ab c")
    )


def test_rejects_a_normalizer_that_rewrites_text():
    tokenizer = sentencepiece_tokenizer("gemma")
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    lowered = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ValueError, match="rewrites the text"):
        ByteLevelSampler(sampler_for("gemma").model, lowered)
