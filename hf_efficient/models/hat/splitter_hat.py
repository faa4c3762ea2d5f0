"""Rule-based Unicode word splitting on byte ids, decided causally so generation never revises a split.

A character's class comes from its first UTF-8 byte: letters/digits/`_` and 2-byte scripts (Latin, Greek,
Cyrillic, Hebrew, Arabic, ...) are LETTER; ASCII whitespace is SPACE; other ASCII and U+2000-U+2FFF are PUNCT;
CJK/kana (U+3000-U+9FFF), fullwidth forms, 4-byte characters (emoji) and special tokens are SOLO. A word starts at
the first byte, at a SPACE after a non-SPACE (words carry their leading whitespace, `" hello"`), at a LETTER after
PUNCT/SOLO, and at every PUNCT/SOLO character. Words longer than `max_word_bytes` are cut at character starts.

Paper: HAT (Neitemeier et al., 2025, arXiv:2501.10322) §3.1 splits with Unicode word rules; this is our
causal, byte-level approximation of that rule set.
"""

from __future__ import annotations

import torch

__all__ = ["WordSplitState", "byte_classes", "word_starts"]

CONT, LETTER, SPACE, PUNCT, SOLO = 0, 1, 2, 3, 4


def _class_table(vocab_size: int) -> torch.Tensor:
    table = torch.full((max(vocab_size, 256),), SOLO, dtype=torch.long)  # special tokens: a word each
    for b in range(128):
        ch = chr(b)
        table[b] = LETTER if ch.isalnum() or ch == "_" else SPACE if ch in " \t\n\r\x0b\x0c" else PUNCT
    table[0x80:0xC0] = CONT
    table[0xC0:0xE0] = LETTER  # U+0080-U+07FF: Latin-1 letters, Greek, Cyrillic, Hebrew, Arabic, ...
    table[0xE0:0xF0] = LETTER  # U+0800-U+FFFF: Indic, Thai, Hangul, ... (refined below)
    table[0xE2] = PUNCT  # U+2000-U+2FFF: punctuation, symbols, arrows, box drawing
    table[0xE3:0xEA] = SOLO  # U+3000-U+9FFF: CJK punctuation, kana, ideographs
    table[0xEF] = SOLO  # U+F000-U+FFFF: compatibility ideographs, fullwidth forms
    table[0xF0:0x100] = SOLO  # 4-byte characters (emoji, rare ideographs) and invalid bytes
    return table


_TABLE = _class_table(512)


def byte_classes(input_ids: torch.Tensor) -> torch.Tensor:
    """Class (CONT, LETTER, SPACE, PUNCT, SOLO) of every id; ids >= 256 (special tokens) are SOLO."""
    return _TABLE.to(input_ids.device)[input_ids.clamp(max=_TABLE.shape[0] - 1)]


class WordSplitState:
    """Splitter state carried between generation steps (per row)."""

    def __init__(self, batch_size: int, device: torch.device) -> None:
        self.prev_class = torch.full((batch_size,), -1, dtype=torch.long, device=device)  # -1: no character yet
        self.natural_start = torch.zeros(batch_size, dtype=torch.long, device=device)  # byte position
        self.prev_segment = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.position = torch.zeros(batch_size, dtype=torch.long, device=device)  # valid bytes seen

    def apply_(self, fn) -> None:
        self.prev_class, self.natural_start, self.prev_segment, self.position = map(
            fn, (self.prev_class, self.natural_start, self.prev_segment, self.position)
        )


def _at_previous_lead(values: torch.Tensor, lead: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """For every position, `values` at the previous lead byte of the row, or `initial` if there is none."""
    length = lead.shape[1]
    idx = torch.where(lead, torch.arange(length, device=lead.device), -1).cummax(dim=1).values  # (B, L)
    prev = torch.cat([idx.new_full((idx.shape[0], 1), -1), idx[:, :-1]], dim=1)
    return torch.where(prev >= 0, values.gather(1, prev.clamp(min=0)), initial[:, None])


def word_starts(
    input_ids: torch.Tensor, valid: torch.Tensor, max_word_bytes: int, state: WordSplitState | None = None
) -> torch.Tensor:
    """Word-start mask (B, L) of the new bytes `input_ids` (B, L); updates `state` in place when given.

    Args:
        input_ids (`torch.LongTensor` of shape `(B, L)`), valid (`torch.BoolTensor` of shape `(B, L)`).
        max_word_bytes (`int`): words are cut at the first character start after this many bytes.
        state (`WordSplitState`, *optional*): split state after the bytes already seen (fresh if `None`).
    """
    if state is None:
        state = WordSplitState(input_ids.shape[0], input_ids.device)
    cls = torch.where(valid, byte_classes(input_ids), CONT)
    lead = valid & (cls != CONT)
    prev = _at_previous_lead(cls, lead, state.prev_class)
    solo = (cls == PUNCT) | (cls == SOLO)
    natural = lead & (
        (prev < 0) | solo | ((cls == SPACE) & (prev != SPACE)) | ((cls == LETTER) & ((prev == PUNCT) | (prev == SOLO)))
    )
    position = state.position[:, None] + valid.long().cumsum(1) - 1  # (B, L) logical byte position
    nat_pos = torch.where(natural, position, -1)
    nat_pos = torch.maximum(nat_pos.cummax(dim=1).values, state.natural_start[:, None])
    segment = (position - nat_pos) // max_word_bytes
    forced = lead & ~natural & (segment != _at_previous_lead(segment, lead, state.prev_segment))
    if lead.shape[1]:
        last = torch.where(lead, torch.arange(lead.shape[1], device=lead.device), -1).amax(dim=1)
        seen = last >= 0
        at_last = last.clamp(min=0)[:, None]
        state.prev_class = torch.where(seen, cls.gather(1, at_last)[:, 0], state.prev_class)
        state.prev_segment = torch.where(seen, segment.gather(1, at_last)[:, 0], state.prev_segment)
        state.natural_start = nat_pos[:, -1]
        state.position = state.position + valid.sum(1)
    return natural | forced
