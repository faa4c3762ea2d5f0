"""Retrieval drafts from a suffix automaton over token ids: the longest suffix of the running context that occurred
before, and the tokens that followed it (SAM-Decoding, SuffixDecoding).

Two indexes answer every query: each batch row's own context (its prompt and everything generated so far, built one
token at a time) and a *session* index over the prompts and outputs of earlier `generate` calls, which persists with
the strategy (`tokens` / `load` / `reset`). The longer match wins; on a tie the row's own context does.

```python
from hf_efficient.speculative.suffix_index import SuffixIndex

index = SuffixIndex()
index.begin([[5, 6, 7, 8, 5, 6]])  # one row: its prompt
index.match(0, 4)  # (2, [7, 8, 5, 6]): "5 6" occurred before, followed by 7 8 5 6
```
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["SEPARATOR", "SuffixAutomaton", "SuffixIndex"]

SEPARATOR = -1  # ends every document of the session index; no context contains it, so no match crosses it


class SuffixAutomaton:
    """The suffix automaton of a token sequence, built online (Blumer et al., 1985): amortised O(1) per token.

    A state is a class of substrings sharing their end positions: `length[s]` is the longest one's length,
    `link[s]` the suffix link, `first[s]` the end position of their first occurrence, `next[s]` the transitions.
    State 0 is the root (the empty string).

    Args:
        tokens (`Iterable[int]`, *optional*): tokens to index first.
    """

    __slots__ = ("first", "last", "length", "link", "next", "tokens")

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self.tokens: list[int] = []
        self.length, self.link, self.first = [0], [-1], [-1]
        self.next: list[dict[int, int]] = [{}]
        self.last = 0  # the state of the whole sequence
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __deepcopy__(self, memo: dict) -> SuffixAutomaton:
        # 10x faster than the generic deepcopy of a list of dicts (strategies are copied per benchmark run)
        copy = SuffixAutomaton.__new__(SuffixAutomaton)
        copy.tokens, copy.length, copy.link, copy.first = self.tokens[:], self.length[:], self.link[:], self.first[:]
        copy.next, copy.last = [edges.copy() for edges in self.next], self.last
        return copy

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        """Index one more token (the textbook online construction, with first-occurrence positions)."""
        length, link, first, nxt = self.length, self.link, self.first, self.next
        cur = len(length)
        length.append(length[self.last] + 1)
        link.append(0)
        first.append(len(self.tokens))
        nxt.append({})
        self.tokens.append(token)
        p = self.last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][token]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:  # split q: its strings up to length[p] + 1 also end here now
                clone = len(length)
                length.append(length[p] + 1)
                link.append(link[q])
                first.append(first[q])
                nxt.append(nxt[q].copy())
                while p != -1 and nxt[p].get(token) == q:
                    nxt[p][token] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        self.last = cur

    def settle(self, state: int, length: int) -> int:
        """The state holding the string of `length` tokens that `state` held before the automaton grew (a split moves
        the shorter strings of a state to its new suffix link)."""
        while state and length <= self.length[self.link[state]]:
            state = self.link[state]
        return state

    def step(self, state: int, length: int, token: int) -> tuple[int, int]:
        """Streaming match: from `(state, length)`, the longest suffix of a text matched so far, to the longest
        suffix of that text plus `token` that occurs in the indexed sequence."""
        state, nxt = self.settle(state, length), self.next
        while state and token not in nxt[state]:
            state = self.link[state]
            length = self.length[state]
        if token in nxt[state]:
            return nxt[state][token], length + 1
        return 0, 0

    def continuation(self, state: int, limit: int) -> list[int]:
        """Up to `limit` tokens after the first occurrence of `state`'s strings, stopping at a `SEPARATOR`."""
        if not state:
            return []
        start = self.first[state] + 1
        run = self.tokens[start : start + limit]
        return run[: run.index(SEPARATOR)] if SEPARATOR in run else run


@dataclass
class _Row:
    """One batch row of the running call: its own automaton and its two streaming matches `(state, length)`."""

    automaton: SuffixAutomaton = field(default_factory=SuffixAutomaton)
    own: tuple[int, int] = (0, 0)  # against the row's tokens before the last one
    session: tuple[int, int] = (0, 0)  # against the session index


class SuffixIndex:
    """Longest-match retrieval over each row's own context and a session of earlier calls.

    `match(row, limit)` returns the length `k` of the longest suffix of the row's context that occurred before,
    either in the row itself ending before its last token or anywhere in the session, and up to `limit` tokens that
    followed its first (so longest-continuing) occurrence. Appending a token and querying cost O(1) amortised.

    Paper: Hu et al., "SAM Decoding: Speculative Decoding via Suffix Automaton", arXiv:2411.10666; Oliaro et al.,
    "SuffixDecoding: Extreme Speculative Decoding for Emerging AI Applications", arXiv:2411.04975.

    Args:
        max_session_tokens (`int`, *optional*, defaults to 65536): the session keeps the latest documents (a call's
            prompt and output, per row) within this many tokens; past it, the oldest go, down to half of it.
    """

    def __init__(self, max_session_tokens: int = 65536) -> None:
        if max_session_tokens < 0:
            raise ValueError(f"max_session_tokens={max_session_tokens} must be >= 0 (0 keeps no session)")
        self.max_session_tokens = max_session_tokens
        self.reset()

    def reset(self) -> None:
        """Forget the session and the running rows."""
        self.session = SuffixAutomaton()
        self.rows: list[_Row] = []

    @property
    def tokens(self) -> list[int]:
        """The session's tokens, documents ended by `SEPARATOR` (what `load` takes). Read between calls: the last
        call's rows join the session first."""
        self._flush()
        return self.session.tokens[:]

    def load(self, tokens: Sequence[int]) -> SuffixIndex:
        """Rebuild the session from `tokens` (as `tokens` returned them); returns `self`."""
        self.session, self.rows = SuffixAutomaton(int(t) for t in tokens), []
        return self

    def begin(self, rows: Sequence[Sequence[int]]) -> None:
        """Start a call: the previous call's rows join the session; index every row's context `rows[b]`."""
        self._flush()
        self.rows = [_Row() for _ in rows]
        for row, tokens in enumerate(rows):
            self.extend(row, tokens)

    def extend(self, row: int, tokens: Iterable[int]) -> None:
        """Append tokens to row `row`'s context."""
        state = self.rows[row]
        automaton, session = state.automaton, self.session
        own, in_session = state.own, state.session
        for token in tokens:
            own = automaton.step(*own, token)  # matched against the context *before* this token
            automaton.append(token)
            in_session = session.step(*in_session, token)
        state.own, state.session = own, in_session

    def match(self, row: int, limit: int) -> tuple[int, list[int]]:
        """`(k, tokens)`: the longest earlier match of row `row`'s context suffix and up to `limit` tokens after it
        (`(0, [])` when nothing matched)."""
        state = self.rows[row]
        own_state, own_length = state.automaton.settle(*state.own), state.own[1]
        session_state, session_length = state.session
        if own_length >= session_length and own_length:
            return own_length, state.automaton.continuation(own_state, limit)
        run = self.session.continuation(session_state, limit)
        if run:
            return session_length, run
        return own_length, state.automaton.continuation(own_state, limit)  # the session match ends a document

    def _flush(self) -> None:
        """Move the running rows into the session (one document each), keeping it within `max_session_tokens`."""
        rows, self.rows = self.rows, []
        if not self.max_session_tokens or not rows:
            return
        for row in rows:
            self.session.extend(row.automaton.tokens)
            self.session.append(SEPARATOR)
        if len(self.session) > self.max_session_tokens:  # keep the newest documents, down to half: amortised rebuild
            tokens, keep = self.session.tokens, len(self.session) - self.max_session_tokens // 2
            start = tokens.index(SEPARATOR, max(keep - 1, 0)) + 1  # the first whole document from `keep` on
            self.session = SuffixAutomaton(tokens[start if start < len(tokens) else keep :])  # else the newest's tail
