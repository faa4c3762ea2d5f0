"""Cover encodings of a byte prefix for SentencePiece BPE with byte fallback (Gemma, Llama-2, Mistral).

Paper: Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles
(Phan et al., arXiv:2410.09303), §3; canonical BPE bigrams: Language Models over Canonical Byte-Pair Encodings
(Vieira et al., ICML 2025), §4.

Texts are read in *token space*: `text_prefix + text`, spaces as spaces (the backend turns them into `▁`), so that
`b"".join(token_bytes[t] for t in encode(x)) == x`. Such a text is made of

- characters the BPE model starts from (each one is in the vocabulary), merged by rank over the whole run (Gemma has
  no pre-tokenization; Metaspace with `split=True` cuts the run before every `▁`);
- characters outside the vocabulary, which become their UTF-8 bytes `<0xNN>`, and non-special added tokens (Gemma's
  newline runs and HTML tags), matched before BPE. No merge rule names a byte token (checked), so both are barriers:
  BPE on either side runs independently.

For BPE without pre-tokenization the canonical encodings are closed under prefixes and a token sequence is canonical
exactly when each adjacent pair is the encoding of its own bytes (Vieira et al.). So a cover whose last token `v`
starts at byte `j` is `encode(x[:j]) + [v]`, canonical when `(last token of encode(x[:j]), v)` is a canonical pair and
no added token spans the junction. Encoding the pair for all 262k tokens costs seconds, so a sound filter keeps only
the pairs that can conflict (a merge rule that joins a symbol of `a`'s right spine, while it is still at the edge,
with a token that starts `v`); only those are encoded, the others are canonical when `v` alone encodes to itself.

A text cut inside a character ends in byte tokens: `encode(head) + <0xNN>...` is a cover when some completion of that
character lies outside the vocabulary (it then falls back to bytes, and the head's encoding is unchanged, barrier).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch
from tokenizers import Tokenizer

from .vocabulary import SPACE_MARK, BytePrefixIndex

__all__ = ["SentencePieceCovers"]

_NO_LIMIT = np.iinfo(np.int64).max


class SentencePieceCovers:
    """The canonical cover encodings of token-space byte strings for a SentencePiece BPE with byte fallback.

    Args:
        table (`list[bytes | None]`): the bytes of every id (`token_bytes`), `None` for special tokens.
        backend (`tokenizers.Tokenizer`): the tokenizer, no prefix space: `plain_backend(t, prefix_space=False)`.
        cache_size (`int`, *optional*, defaults to 128): left tokens whose pair verdicts are kept (two `(V,)` masks).
    """

    def __init__(self, table: list[bytes | None], backend: Tokenizer, cache_size: int = 128) -> None:
        model = json.loads(backend.model.__getstate__())  # vocab and merges
        unsupported = {k: model.get(k) for k in ("ignore_merges", "dropout", "continuing_subword_prefix")}
        if any(unsupported.values()) or model.get("end_of_word_suffix"):
            raise ValueError(f"SentencePiece BPE with {unsupported} is not supported: exact covers need plain merges")
        self.table, self.backend, self.size = table, backend, len(table)
        self.vocab: dict[str, int] = model["vocab"]
        self.byte_id = [self.vocab.get(f"<0x{b:02X}>") for b in range(256)]
        if None in self.byte_id:
            raise ValueError("the vocabulary lacks some of the byte-fallback tokens <0x00>..<0xFF>")
        self.is_byte = torch.zeros(self.size, dtype=torch.bool)
        self.is_byte[self.byte_id] = True
        added = [i for i, t in backend.get_added_tokens_decoder().items() if not t.special and table[i]]
        self.is_added = torch.zeros(self.size, dtype=torch.bool)
        self.is_added[added] = True
        self.added_texts = sorted({table[i] for i in added})
        self.max_added = max(map(len, self.added_texts), default=0)
        self.chars = {p.replace(SPACE_MARK, " ") for p in self.vocab if len(p) == 1}  # the others fall back to bytes
        self.index = BytePrefixIndex(table, exclude=self.byte_id)  # candidates for the last token of a cover
        self.reachable = self._reachable()
        self._load_merges(model["merges"])
        self._pairs: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._encoded: OrderedDict[bytes, list[int]] = OrderedDict()
        self._spans: dict[int, tuple[int, int]] = {}
        self._fallback: dict[bytes, str | None] = {}
        self.cache_size = cache_size

    # ----------------------------------------------------------------------------------------------- setup
    def _reachable(self) -> torch.Tensor:
        """`(V,)` bool: the token is the encoding of its own bytes (the others are never canonical)."""
        ids = self.index.ids.tolist()
        encodings = self.backend.encode_batch([self.table[i].decode() for i in ids], add_special_tokens=False)
        out = torch.zeros(self.size, dtype=torch.bool)
        out[[i for i, e in zip(ids, encodings) if e.ids == [i]]] = True
        return out

    def _load_merges(self, merges: list) -> None:
        """Merge rules as sorted arrays: by pair (rank and result) and by left symbol (rank and right symbol)."""
        pairs = [m if isinstance(m, list) else m.split(" ", 1) for m in merges]
        left = np.array([self.vocab[a] for a, _ in pairs], dtype=np.int64)
        right = np.array([self.vocab[b] for _, b in pairs], dtype=np.int64)
        new = np.array([self.vocab[a + b] for a, b in pairs], dtype=np.int64)
        if np.isin(left, self.byte_id).any() or np.isin(right, self.byte_id).any():
            raise ValueError("a merge rule joins a byte-fallback token: bytes are no longer barriers to BPE")
        keys = left * self.size + right
        last = len(keys) - 1 - np.unique(keys[::-1], return_index=True)[1]  # a repeated pair keeps its last rank (HF)
        self.m_keys, self.m_rank, self.m_new = keys[last], last, new[last]  # sorted by key
        by_left = np.lexsort((self.m_rank, self.m_keys // self.size))
        self.l_left, self.l_rank = (self.m_keys // self.size)[by_left], self.m_rank[by_left]
        self.l_right = (self.m_keys % self.size)[by_left]

    # -------------------------------------------------------------------------------------------- encoding
    def encode(self, x: bytes) -> list[int] | None:
        """Canonical ids of token-space `x`, which may end inside a character (then in byte tokens); `None` when no
        canonical sequence spells `x` exactly (a cut character none of whose completions falls back to bytes)."""
        head = self._head(x)
        tail = x[head:]
        if tail and not self._falls_back(x[:head], tail):
            return None
        return self._encode_text(x[:head]) + [self.byte_id[b] for b in tail]

    def _encode_text(self, x: bytes) -> list[int]:
        """Canonical ids of complete-character `x` (memoised: covers re-encode the same prefixes byte after byte)."""
        ids = self._encoded.get(x)
        if ids is None:
            ids = self.backend.encode(x.decode(), add_special_tokens=False).ids
            self._encoded[x] = ids
            if len(self._encoded) > 4 * self.cache_size:
                self._encoded.popitem(last=False)
        else:
            self._encoded.move_to_end(x)
        return ids

    def _head(self, x: bytes) -> int:
        """Length of the complete-character part of `x`; the rest (0-3 bytes) starts a character."""
        if SPACE_MARK.encode() in x:
            raise ValueError("the text contains '▁' (U+2581), which this tokenizer cannot tell apart from a space")
        for cut in range(min(4, len(x) + 1)):
            try:
                x[: len(x) - cut].decode()
            except UnicodeDecodeError:
                continue
            if not cut or next(_completions(x[len(x) - cut :]), None) is not None:
                return len(x) - cut
            break
        raise ValueError(f"{x[-16:]!r} is not a prefix of any UTF-8 text")

    # ---------------------------------------------------------------------------------------------- covers
    def covers(self, x: bytes, extend: bool) -> list[tuple[list[int], torch.Tensor, int]]:
        """Canonical covers of `x` grouped by prefix: `(prefix ids, last-token ids (C,), start j of the last token)`.

        With `extend`, the last token starts at `j <= len(x)` and runs past `x` (the covers of every `x . b`, for the
        next-byte distribution); without, it starts inside `x` and reaches its end (the covers of `x`, for `P(x)`).
        """
        n, head = len(x), self._head(x)
        groups = []
        for j in range(max(0, n - self.index.max_len), (head if extend else min(head, n - 1)) + 1):
            if j < n and 0x80 <= x[j] < 0xC0:  # inside a character: only byte tokens start there
                continue
            candidates = self.index.starting_with(x[j:], min_len=n - j + int(extend))  # (C,)
            if len(candidates):
                prefix = self._encode_text(x[:j])
                valid = self._valid(prefix, x[:j], candidates)
                if len(valid):
                    groups.append((prefix, valid, j))
        return groups + self._byte_covers(x, head, extend)

    def _valid(self, prefix: list[int], context: bytes, candidates: torch.Tensor) -> torch.Tensor:
        """The candidates `v` for which `prefix + [v]` is canonical (`prefix` is the encoding of `context`)."""
        ok = self.reachable[candidates]  # (C,)
        left = prefix[-1] if prefix else None
        if left is not None and not (self.is_byte[left] or self.is_added[left]):  # else a barrier precedes v
            ok &= ~self._conflicting(left, candidates)
        risky = self._spanned_by_added(context, candidates)  # (C,) an added token could start before v and end in it
        if risky.any():
            ok[risky] = self._canonical_in_window(prefix, candidates[risky])
        return candidates[ok]

    def _byte_covers(self, x: bytes, head: int, extend: bool) -> list[tuple[list[int], torch.Tensor, int]]:
        """Covers whose last token is a byte-fallback token."""
        n, tail = len(x), x[head:]
        if not extend:  # the last character of x (complete or cut) is spelt in bytes
            ids = self.encode(x) if tail else self._encode_text(x)
            if ids and self.is_byte[ids[-1]]:
                return [(ids[:-1], torch.tensor([ids[-1]]), n - 1)]
            return []
        prefix = self._encode_text(x[:head]) + [self.byte_id[b] for b in tail]
        firsts = range(0x80, 0xC0) if tail else [*range(0x80), *range(0xC2, 0xF5)]
        nexts = [b for b in firsts if self._falls_back(x[:head], tail + bytes([b]))]
        return [(prefix, torch.tensor([self.byte_id[b] for b in nexts]), n)] if nexts else []

    # ------------------------------------------------------------------------------------ pair canonicality
    def _conflicting(self, left: int, candidates: torch.Tensor) -> torch.Tensor:
        """`(C,)` bool: `(left, v)` is not canonical. Flagged pairs are encoded once and the verdict kept."""
        if left not in self._pairs:
            self._pairs[left] = (self._flag(left) & self.reachable, torch.zeros(self.size, dtype=torch.bool))
            if len(self._pairs) > self.cache_size:
                self._pairs.popitem(last=False)
        self._pairs.move_to_end(left)
        unverified, bad = self._pairs[left]
        need = candidates[unverified[candidates]].tolist()
        if need:
            a = self.table[left]
            texts = [(a + self.table[v]).decode() for v in need]
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
            failed = [v for v, e in zip(need, encodings) if e.ids != [left, v]]
            if failed:
                bad[failed] = True
            unverified[need] = False
        return bad[candidates]

    def _flag(self, left: int) -> torch.Tensor:
        """`(V,)` bool, a superset of the `v` with `(left, v)` not canonical.

        Before the first merge across the junction, each side evolves as it does alone, so that merge joins a symbol
        `s` of `left`'s right spine with a symbol `y` of `v`'s left spine, and its rank is at most the rank of a merge
        `left`'s derivation makes while `s` is at the edge (HF picks the lowest rank). `y` is a token that starts `v`.
        """
        limits = self._right_spine(left)
        if limits is None:  # our replay of the merges disagrees with the tokenizer: verify every pair
            return torch.ones(self.size, dtype=torch.bool)
        ys = []
        for s, limit in limits.items():
            lo, hi = np.searchsorted(self.l_left, [s, s + 1])
            ys.append(self.l_right[lo:hi][self.l_rank[lo:hi] <= limit])
        edges = np.zeros(len(self.index.keys) + 1, dtype=np.int64)
        for y in np.unique(np.concatenate(ys)).tolist():
            lo, hi = self._span(y)
            edges[lo] += 1
            edges[hi] -= 1
        flagged = torch.zeros(self.size, dtype=torch.bool)
        flagged[self.index.ids[torch.from_numpy(np.cumsum(edges[:-1]) > 0)]] = True
        return flagged

    def _span(self, y: int) -> tuple[int, int]:
        if y not in self._spans:
            self._spans[y] = self.index.span(self.table[y]) if self.table[y] else (0, 0)
        return self._spans[y]

    def _right_spine(self, token: int) -> dict[int, int] | None:
        """Replay BPE on `token`'s characters: each right-edge symbol -> the highest rank merged while it is there.

        Returns `None` when the replay does not end in `token` (then nothing is assumed about the merges).
        """
        symbols = [self.vocab.get(c) for c in self.table[token].decode().replace(" ", SPACE_MARK)]
        if None in symbols:
            return None
        limits: dict[int, int] = {}
        while len(symbols) > 1:
            best = None
            for k in range(len(symbols) - 1):
                found = self._merge(symbols[k], symbols[k + 1])
                if found is not None and (best is None or found[0] < best[0]):  # lowest rank, leftmost on ties
                    best = (found[0], k, found[1])
            if best is None:
                break
            rank, k, new = best
            limits[symbols[-1]] = max(limits.get(symbols[-1], -1), rank)
            symbols[k : k + 2] = [new]
        if symbols != [token]:
            return None
        limits[token] = _NO_LIMIT
        return limits

    def _merge(self, a: int, b: int) -> tuple[int, int] | None:
        key = a * self.size + b
        at = int(np.searchsorted(self.m_keys, key))
        if at < len(self.m_keys) and self.m_keys[at] == key:
            return int(self.m_rank[at]), int(self.m_new[at])
        return None

    # ------------------------------------------------------------------------------------------ added tokens
    def _spanned_by_added(self, context: bytes, candidates: torch.Tensor) -> torch.Tensor:
        """`(C,)` bool: an added token could begin in `context` and end inside the candidate."""
        risky = torch.zeros(len(candidates), dtype=torch.bool)
        for text in self.added_texts:
            for k in range(1, len(text)):
                if context.endswith(text[:k]):
                    lo, hi = self.index.span(text[k:])
                    risky |= torch.isin(candidates, self.index.ids[lo:hi])
        return risky

    def _window(self, prefix: list[int]) -> int:
        """Start of a suffix of `prefix` at a character boundary and at least `max_added` bytes long."""
        start, length = len(prefix), 0
        while start > 0 and (length < self.max_added or self._continues_character(prefix, start)):
            start -= 1
            length += len(self.table[prefix[start]])
        return start

    def _continues_character(self, prefix: list[int], at: int) -> bool:
        """Whether `prefix[at]` is a byte token inside a character (a window cannot start there)."""
        return at < len(prefix) and bool(self.is_byte[prefix[at]]) and 0x80 <= self.table[prefix[at]][0] < 0xC0

    def _canonical_in_window(self, prefix: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """`(T,)` bool: `prefix + [v]` is canonical, checked by encoding a window long enough for any added token."""
        start = self._window(prefix)
        window, ids = b"".join(self.table[i] for i in prefix[start:]), prefix[start:]
        tokens = tokens.tolist()
        texts = [(window + self.table[v]).decode() for v in tokens]
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        return torch.tensor([e.ids == [*ids, v] for v, e in zip(tokens, encodings)], dtype=torch.bool)

    # ----------------------------------------------------------------------------------------- byte fallback
    def _falls_back(self, context: bytes, partial: bytes) -> bool:
        """Whether a character starting with `partial` is spelt in byte tokens right after `context`."""
        if partial not in self._fallback:
            self._fallback[partial] = next((c for c in _completions(partial) if c not in self.chars), None)
        char = self._fallback[partial]
        if char is None:
            return False
        if not self.max_added:  # bytes are barriers and no added token can absorb the character
            return True
        prefix = self._encode_text(context)
        start = self._window(prefix)
        window = b"".join(self.table[i] for i in prefix[start:])
        for char in (c for c in _completions(partial) if c not in self.chars):
            ids = self.backend.encode((window + char.encode()).decode(), add_special_tokens=False).ids
            if ids == prefix[start:] + [self.byte_id[b] for b in char.encode()]:
                return True
        return False


def _completions(partial: bytes) -> Iterator[str]:
    """The characters whose UTF-8 encoding starts with `partial` (1-4 bytes), in code point order."""
    lead = partial[0]
    if lead < 0x80:
        if len(partial) == 1:
            yield chr(lead)
        return
    length = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
    if not length or len(partial) > length or any(not 0x80 <= b < 0xC0 for b in partial[1:]):
        return
    pad = length - len(partial)
    lo, hi = _code_point(partial + b"\x80" * pad), _code_point(partial + b"\xbf" * pad)
    floor, ceiling = ((0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, 0x10FFFF))[length - 2]  # no overlong forms
    for point in range(max(lo, floor), min(hi, ceiling) + 1):
        if not 0xD800 <= point <= 0xDFFF:  # no surrogates
            yield chr(point)


def _code_point(sequence: bytes) -> int:
    value = sequence[0] & (0x7F >> len(sequence))
    for b in sequence[1:]:
        value = (value << 6) | (b & 0x3F)
    return value
