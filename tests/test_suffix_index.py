"""The suffix-automaton index behind retrieval drafting: exact longest-match semantics, session, state, speed."""

from __future__ import annotations

import copy
import random
import time

import pytest

from hf_efficient.speculative.suffix_index import SEPARATOR, SuffixAutomaton, SuffixIndex


def _first_end(text: list[int], pattern: list[int], last: int) -> int | None:
    """End position of the first occurrence of `pattern` in `text` ending at or before `last`."""
    k = len(pattern)
    return next((e for e in range(k - 1, last + 1) if text[e - k + 1 : e + 1] == pattern), None)


def _brute_match(documents: list[list[int]], row: list[int], limit: int) -> tuple[int, list[int]]:
    """`SuffixIndex.match` by exhaustive search: the longest suffix of `row` occurring earlier in `row` (ending
    before its last token) or anywhere in the session, and what followed its first occurrence."""
    session = [token for document in documents for token in [*document, SEPARATOR]]
    n = len(row)
    own = (0, [])
    for k in range(n - 1, 0, -1):
        end = _first_end(row, row[n - k :], n - 2)
        if end is not None:
            own = (k, row[end + 1 : end + 1 + limit])
            break
    in_session = (0, [])
    for k in range(n, 0, -1):
        end = _first_end(session, row[n - k :], len(session) - 1)
        if end is not None:
            run = session[end + 1 : end + 1 + limit]
            in_session = (k, run[: run.index(SEPARATOR)] if SEPARATOR in run else run)
            break
    if own[0] and own[0] >= in_session[0]:
        return own
    return in_session if in_session[1] else own


@pytest.mark.parametrize("seed", range(40))
def test_match_equals_brute_force_longest_match(seed):
    """Every prefix of random rows over small alphabets, against random session documents, many seeds."""
    rng = random.Random(seed)
    alphabet = rng.choice([2, 3, 4, 6])
    for _ in range(10):
        documents = [[rng.randrange(alphabet) for _ in range(rng.randrange(16))] for _ in range(rng.randrange(3))]
        rows = [[rng.randrange(alphabet) for _ in range(rng.randrange(1, 40))] for _ in range(2)]
        index = SuffixIndex()
        index.begin(documents)  # these rows become the session at the next `begin`
        index.begin([row[:1] for row in rows])
        for length in range(1, max(map(len, rows)) + 1):
            for b, row in enumerate(rows):
                if length > len(row):
                    continue
                if length > 1:
                    index.extend(b, row[length - 1 : length])
                limit = rng.randrange(1, 8)
                assert index.match(b, limit) == _brute_match(documents, row[:length], limit), (seed, b, length)


def test_automaton_recognises_exactly_the_substrings():
    rng = random.Random(0)
    for _ in range(20):
        text = [rng.randrange(3) for _ in range(rng.randrange(1, 60))]
        automaton = SuffixAutomaton(text)
        assert len(automaton.length) <= max(2 * len(text) - 1, 2)  # the automaton's size bound
        for _ in range(50):
            probe = [rng.randrange(3) for _ in range(rng.randrange(1, 8))]
            state = 0
            for token in probe:
                state = automaton.next[state].get(token, -1)
                if state < 0:
                    break
            occurs = any(text[i : i + len(probe)] == probe for i in range(len(text)))
            assert (state >= 0) == occurs, (text, probe)


def test_session_keeps_the_newest_documents_within_its_budget():
    index = SuffixIndex(max_session_tokens=40)
    for call in range(6):
        index.begin([[100 + call] * 4 + [call] * 8])  # 13 tokens per document with its separator
    tokens = index.tokens  # the last call's row joins the session too
    assert len(tokens) <= 40 and tokens[-1] == SEPARATOR
    assert 105 in tokens and 100 not in tokens  # the oldest went first
    index.begin([[105, 105]])
    assert index.match(0, 3) == (2, [105, 105, 5])  # retrieved from the session


def test_state_round_trip_reset_and_copy():
    rng = random.Random(1)
    documents = [[rng.randrange(5) for _ in range(30)] for _ in range(3)]
    index = SuffixIndex()
    index.begin(documents)
    saved = index.tokens
    loaded = SuffixIndex().load(saved)
    probe = [rng.randrange(5) for _ in range(20)]
    clone = copy.deepcopy(index)
    for other in (loaded, clone):
        index.begin([probe])
        other.begin([probe])
        assert index.match(0, 6) == other.match(0, 6)
        index.rows = other.rows = []  # drop the probe row from both sessions
    clone.begin([[9, 9, 9]])  # a copy grows on its own
    assert clone.tokens != index.tokens
    index.reset()
    assert index.tokens == [] and index.rows == []


def test_append_and_query_cost_per_token():
    """Well under a millisecond per generated token with a few thousand tokens of context and a 30k session."""
    rng = random.Random(0)
    zipf = lambda: int(rng.paretovariate(1.1)) % 2000  # noqa: E731 (text-like repetitions)
    index = SuffixIndex()
    index.begin([[zipf() for _ in range(1000)] for _ in range(30)])
    index.begin([[zipf() for _ in range(3000)]])
    start = time.perf_counter()
    for _ in range(2000):
        index.extend(0, [zipf()])
        index.match(0, 16)
    per_token = (time.perf_counter() - start) / 2000
    assert per_token < 2e-4, f"{per_token * 1e6:.1f} us per token"
