"""Batch-level dynamic BPE: merge the most frequent adjacent subword pairs of a whole batch.

Paper: Retrofitting (Large) Language Models with Dynamic Tokenization (Feher, Vulić, Minixhofer, ACL 2025,
arXiv:2411.18553), §3.1.

The research code recounts every pair of the batch after every merge (O(merges x tokens) Python loops). Here
the batch is one doubly linked list of units with an index `pair -> positions` and a lazy max-heap of
counts, as BPE trainers do: a merge touches only the occurrences of the merged pair and their two
neighbours, so a whole merge schedule costs O(tokens x log) instead of O(merges x tokens).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from .vocabulary import is_byte_level, plain_backend, special_ids, surface_form, token_bytes

__all__ = ["DynamicBPE", "DynamicBatch", "MergeState"]

BOUNDARIES = ("pretoken", "word")

# Whitespace flags of a piece of text: a merged token must read "whitespace*, then non-whitespace*"
# (`Ġthere` or `ĠĠ`, never `the Ġre`). The three flags compose under concatenation, so validity of a merge
# is decided from the flags of its two sides and the gap between them, without looking at the text again.
_ALL_WS, _NO_WS, _FORM = 1, 2, 4
_EMPTY = _ALL_WS | _NO_WS | _FORM


def _flags(text: str) -> int:
    if not text:
        return _EMPTY
    stripped = text.lstrip()
    flags = 0
    if not stripped:
        flags |= _ALL_WS
    if stripped == text and not any(c.isspace() for c in text):
        flags |= _NO_WS
    if not any(c.isspace() for c in stripped):
        flags |= _FORM
    return flags


def _concat(x: int, y: int) -> int:
    """Flags of the concatenation of two texts with flags `x` and `y`."""
    out = 0
    if x & _ALL_WS and y & _ALL_WS:
        out |= _ALL_WS
    if x & _NO_WS and y & _NO_WS:
        out |= _NO_WS
    if (x & _ALL_WS and y & _FORM) or (x & _FORM and y & _NO_WS):
        out |= _FORM
    return out


class MergeState:
    """The merge state of one batch: units in a linked list, incremental pair counts, the merges made.

    Positions index the base tokens of all texts laid end to end; a merged unit lives at the position of
    its first base token. Unit ids below `base_vocab_size` are base ids, higher ids are merged units whose
    base ids are `self.decompositions[uid - base_vocab_size]`.

    Args:
        ids (`list[list[int]]`): base ids of each text.
        spans (`list[list[tuple[int, int]]]`): `(start, end)` character offsets of each base token.
        words (`list[list[int]]`): pre-token index of each base token (`Encoding.word_ids`).
        texts (`list[str]`): the texts, for the whitespace rule.
        base_vocab_size (`int`): first id available to merged units.
        boundary (`str`): `"pretoken"` (merges stay inside one pre-token) or `"word"` (inside one
            whitespace-delimited word, leading whitespace allowed).
        frozen (`set[int]`): ids that never merge (special tokens).
    """

    def __init__(
        self,
        ids: list[list[int]],
        spans: list[list[tuple[int, int]]],
        words: list[list[int]],
        texts: list[str],
        base_vocab_size: int,
        boundary: str = "pretoken",
        frozen: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary={boundary!r} is not one of {BOUNDARIES}")
        self.boundary, self.base_vocab_size, self.frozen = boundary, base_vocab_size, frozen
        self.unit: list[int] = []  # unit id at each position (stale once dead)
        self.nxt: list[int] = []  # next live position in the same text, -1 at the end
        self.prv: list[int] = []
        self.alive: list[bool] = []
        self.word: list[int] = []  # global pre-token id
        self.flags: list[int] = []  # whitespace flags of the unit's text
        self.gap: list[int] = []  # whitespace flags of the text between the previous token and this one
        self.starts: list[int] = []  # character offset where the base token starts
        self.heads: list[int] = []  # first position of each text
        self.decompositions: list[tuple[int, ...]] = []
        self._merged: dict[tuple[int, int], int] = {}
        word_offset = 0
        for text_ids, text_spans, text_words, text in zip(ids, spans, words, texts):
            start = len(self.unit)
            self.heads.append(start if text_ids else -1)
            prev_end = 0
            for k, (uid, (s, e), w) in enumerate(zip(text_ids, text_spans, text_words)):
                self.unit.append(int(uid))
                self.prv.append(start + k - 1 if k else -1)
                self.nxt.append(start + k + 1 if k + 1 < len(text_ids) else -1)
                self.alive.append(True)
                self.starts.append(s)
                self.word.append(word_offset + (w if w is not None else -1 - k))
                self.flags.append(_flags(text[s:e]))
                self.gap.append(_flags(text[prev_end:s]) if s >= prev_end else _EMPTY)
                prev_end = max(prev_end, e)
            word_offset += 1 + max((w for w in text_words if w is not None), default=0) + len(text_ids)
        self.num_base_tokens = self.num_tokens = len(self.unit)
        self.pairs: dict[tuple[int, int], set[int]] = {}
        for p in range(len(self.unit)):
            q = self.nxt[p]
            if q != -1 and self._valid(p, q):
                self.pairs.setdefault((self.unit[p], self.unit[q]), set()).add(p)
        self._heap = [(-len(s), key) for key, s in self.pairs.items()]
        heapq.heapify(self._heap)

    def _valid(self, p: int, q: int) -> bool:
        if self.unit[p] in self.frozen or self.unit[q] in self.frozen:
            return False
        if self.boundary == "pretoken":
            return self.word[p] == self.word[q]
        return bool(_concat(_concat(self.flags[p], self.gap[q]), self.flags[q]) & _FORM)

    def _add(self, p: int, q: int) -> None:
        if self._valid(p, q):
            key = (self.unit[p], self.unit[q])
            positions = self.pairs.setdefault(key, set())
            positions.add(p)
            heapq.heappush(self._heap, (-len(positions), key))

    def _remove(self, p: int, q: int) -> None:
        positions = self.pairs.get((self.unit[p], self.unit[q]))
        if positions is not None:
            positions.discard(p)

    def pair_counts(self) -> dict[tuple[int, int], int]:
        """Current count of every valid adjacent pair `(left unit, right unit)` (zero counts omitted)."""
        return {key: len(s) for key, s in self.pairs.items() if s}

    def best_pair(self) -> tuple[tuple[int, int], int] | None:
        """The most frequent valid pair and its count (ties: smallest ids), or `None` if nothing can merge."""
        while self._heap:
            neg, key = self._heap[0]
            count = len(self.pairs.get(key, ()))
            if count == -neg and count > 0:
                return key, count
            heapq.heappop(self._heap)  # stale entry: re-queue with its current count
            if count > 0:
                heapq.heappush(self._heap, (-count, key))
        return None

    def merge(self, pair: tuple[int, int]) -> int:
        """Merge every occurrence of `pair`, left to right; returns the new unit id."""
        a, b = pair
        c = self._merged.get(pair)
        if c is None:
            c = self.base_vocab_size + len(self.decompositions)
            self.decompositions.append(self.decomposition(a) + self.decomposition(b))
            self._merged[pair] = c
        for p in sorted(self.pairs.pop(pair, ())):
            q = self.nxt[p] if self.alive[p] else -1
            if q == -1 or self.unit[p] != a or self.unit[q] != b:
                continue  # consumed by an overlapping occurrence (a == b)
            left, right = self.prv[p], self.nxt[q]
            if left != -1:
                self._remove(left, p)
            if right != -1:
                self._remove(q, right)
            self.unit[p] = c
            self.flags[p] = _concat(_concat(self.flags[p], self.gap[q]), self.flags[q])
            self.alive[q] = False
            self.nxt[p] = right
            if right != -1:
                self.prv[right] = p
                self._add(p, right)
            if left != -1:
                self._add(left, p)
            self.num_tokens -= 1
        return c

    def decomposition(self, uid: int) -> tuple[int, ...]:
        """Base ids of unit `uid`."""
        return (uid,) if uid < self.base_vocab_size else self.decompositions[uid - self.base_vocab_size]

    def sequences(self) -> list[list[tuple[int, int]]]:
        """Per text, `(unit id, first position)` of its live units in order."""
        out = []
        for head in self.heads:
            seq, p = [], head
            while p != -1:
                seq.append((self.unit[p], p))
                p = self.nxt[p]
            out.append(seq)
        return out


@dataclass
class DynamicBatch:
    """A batch tokenized with batch-specific merges.

    Attributes:
        texts (`list[str]`): the input texts.
        sequences (`list[list[int]]`): per text, its token ids; ids `< base_vocab_size` are base ids, id
            `base_vocab_size + k` is the new token `surface_forms[k]`.
        spans (`list[list[tuple[int, int]]]`): per text, the character span of each token; the spans tile
            the text.
        surface_forms (`list[str]`): the unique new tokens, in the base tokenizer's alphabet (`"Ġthere"`).
        decompositions (`list[tuple[int, ...]]`): base ids of each new token.
        base_vocab_size (`int`): `len(tokenizer)` of the base tokenizer.
        num_base_tokens (`int`): tokens of the batch before merging.
    """

    texts: list[str]
    sequences: list[list[int]]
    spans: list[list[tuple[int, int]]]
    surface_forms: list[str]
    decompositions: list[tuple[int, ...]]
    base_vocab_size: int
    num_base_tokens: int
    _bytes: list[bytes | None] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    @property
    def reduction(self) -> float:
        """Fraction of tokens saved by the merges (0.2 = sequences 20% shorter)."""
        return 1.0 - self.num_tokens / max(self.num_base_tokens, 1)

    def decomposition(self, uid: int) -> tuple[int, ...]:
        return (uid,) if uid < self.base_vocab_size else self.decompositions[uid - self.base_vocab_size]

    def decode(self) -> list[str]:
        """The texts, rebuilt from the tokens.

        Byte-level tokenizers without a normalizer decode each token from the bytes of its base ids, so this
        checks the merges themselves; other tokenizers (lower-casing WordPiece, ...) cannot restore the text
        from ids and decode from each token's character span.
        """
        out = []
        for text, seq, spans in zip(self.texts, self.sequences, self.spans):
            if self._bytes is None:
                out.append("".join(text[s:e] for s, e in spans))
                continue
            chunks = []
            for uid, (s, e) in zip(seq, spans):
                pieces = [self._bytes[i] for i in self.decomposition(uid)]
                chunks.append(b"".join(pieces) if all(p is not None for p in pieces) else text[s:e].encode())
            out.append(b"".join(chunks).decode("utf-8"))
        return out

    def to_tensors(
        self, pad_token_id: int, prefix: list[int] = (), suffix: list[int] = (), padding_side: str = "right"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids `(B, L)` and attention mask `(B, L)`, each sequence wrapped in `prefix` / `suffix` ids."""
        rows = [[*prefix, *seq, *suffix] for seq in self.sequences]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, L)
        for i, row in enumerate(rows):
            cols = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            ids[i, cols] = torch.tensor(row, dtype=torch.long)
            mask[i, cols] = 1
        return ids, mask


class DynamicBPE:
    """Tokenize a batch with a base tokenizer, then merge its most frequent adjacent pairs batch-wide.

    Merges never cross the `boundary` rule nor touch special tokens; they are not kept between batches.

    Paper: Retrofitting (Large) Language Models with Dynamic Tokenization (arXiv:2411.18553).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a fast base tokenizer (offsets and pre-token ids are used).
        boundary (`str`, *optional*, defaults to `"pretoken"`): `"pretoken"` keeps merges inside one pre-token
            of the base pre-tokenizer; `"word"` inside one whitespace-delimited word (so `"there,"` can form).
        max_merges (`int`, *optional*): at most this many merges per batch.
        target_reduction (`float`, *optional*): stop once the batch is this fraction shorter (e.g. `0.2`).
            With neither limit, merging goes on until no valid pair is left (word-level tokens).

    Example:

    ```python
    dyn = DynamicBPE(tokenizer, boundary="word", target_reduction=0.2)
    batch = dyn(["the cat sat on the mat", "the cat ate"])
    batch.reduction, batch.surface_forms, batch.decode()
    ```
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        boundary: str = "pretoken",
        max_merges: int | None = None,
        target_reduction: float | None = None,
    ) -> None:
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary={boundary!r} is not one of {BOUNDARIES}")
        if max_merges is not None and max_merges < 0:
            raise ValueError(f"max_merges={max_merges} must be >= 0 (or None for no limit)")
        if target_reduction is not None and not 0.0 <= target_reduction < 1.0:
            raise ValueError(f"target_reduction={target_reduction} must be in [0, 1), e.g. 0.2 for 20% shorter")
        self.tokenizer, self.boundary = tokenizer, boundary
        self.max_merges, self.target_reduction = max_merges, target_reduction
        self.frozen = frozenset(special_ids(tokenizer))
        self._backend = plain_backend(tokenizer)
        exact_bytes = is_byte_level(tokenizer) and self._backend.normalizer is None
        self._bytes = token_bytes(tokenizer) if exact_bytes else None

    def state(self, texts: list[str]) -> MergeState:
        """The un-merged `MergeState` of `texts` (for step-by-step use and inspection)."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return MergeState(
            [e.ids for e in encodings],
            [e.offsets for e in encodings],
            [e.word_ids for e in encodings],
            list(texts),
            base_vocab_size=len(self.tokenizer),
            boundary=self.boundary,
            frozen=self.frozen,
        )

    def __call__(self, texts: list[str]) -> DynamicBatch:
        state = self.state(texts)
        floor = -1 if self.target_reduction is None else math.ceil((1 - self.target_reduction) * state.num_tokens)
        merges = 0
        while (self.max_merges is None or merges < self.max_merges) and state.num_tokens > floor:
            best = state.best_pair()
            if best is None:
                break
            state.merge(best[0])
            merges += 1
        return self._batch(texts, state)

    def _batch(self, texts: list[str], state: MergeState) -> DynamicBatch:
        base = len(self.tokenizer)
        new_ids: dict[int, int] = {}  # state unit id -> compact id among the units still present
        sequences, spans = [], []
        for text, seq in zip(texts, state.sequences()):
            ids = []
            for uid, _ in seq:
                if uid >= base:
                    uid = new_ids.setdefault(uid, base + len(new_ids))
                ids.append(uid)
            starts = [0] + [state.starts[p] for _, p in seq[1:]]
            sequences.append(ids)
            spans.append(list(zip(starts, [*starts[1:], len(text)])))
        decompositions = [state.decomposition(uid) for uid in new_ids]
        return DynamicBatch(
            texts=list(texts),
            sequences=sequences,
            spans=spans,
            surface_forms=[surface_form(self.tokenizer, d) for d in decompositions],
            decompositions=decompositions,
            base_vocab_size=base,
            num_base_tokens=state.num_base_tokens,
            _bytes=self._bytes,
        )
