"""What a token *is* across tokenizer families: its bytes, its surface string and its decomposition.

Dynamic merges, the hypernetwork, transplant and byte-level sampling all compare tokens of different
vocabularies. They do it through the three views defined here, so that byte-level BPE (`Ġthe`), WordPiece
(`##ing`) and SentencePiece (`▁the`) tokens are handled in one place:

- `token_bytes(tokenizer)`: the exact bytes each id contributes to the decoded text (byte-level BPE, and
  SentencePiece BPE with byte fallback: `▁the` -> `b" the"`, `<0xE6>` -> `b"\xe6"`), with `text_prefix` the bytes
  the tokenizer puts before every text (`b" "` for Llama-2 / Mistral, whose first token carries a `▁`);
- `surface_form(tokenizer, ids)`: the string of a run of ids in the tokenizer's own token alphabet
  (`Ġthe` + `re` -> `Ġthere`, `play` + `##ing` -> `playing`), which is also the key of shared tokens;
- `decompose(tokenizer, surfaces)`: the base ids of such strings, running only the tokenizer's model
  (no normalizer or pre-tokenizer), as ZeTT does for surface forms.
"""

from __future__ import annotations

import bisect
import functools
import json
from collections.abc import Callable, Iterable
from typing import Any

import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerBase

__all__ = [
    "BytePrefixIndex",
    "byte_to_unicode",
    "continuing_prefix",
    "decompose",
    "is_byte_level",
    "is_sentencepiece_bpe",
    "plain_backend",
    "special_affixes",
    "special_ids",
    "surface_form",
    "text_prefix",
    "token_bytes",
]

SPACE_MARK = "\u2581"  # `▁`, SentencePiece's visible space


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable character map of byte-level BPE (bytes 0..255 -> one char each).

    Printable Latin-1 bytes map to themselves; the 68 others (controls, space, ...) are shifted to
    code points 256.. in byte order, which is why a space reads `Ġ` (256 + 32) and a newline `Ċ`.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = sorted(set(range(256)) - set(printable))
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return mapping


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def _decoder_json(tokenizer: PreTrainedTokenizerBase) -> str:
    decoder = tokenizer.backend_tokenizer.decoder
    return "null" if decoder is None else decoder.__getstate__().decode()


def plain_backend(tokenizer: PreTrainedTokenizerBase, prefix_space: bool = True) -> Tokenizer:
    """A copy of `tokenizer`'s backend without padding and truncation (saved tokenizers often enable both).

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a fast tokenizer.
        prefix_space (`bool`, *optional*, defaults to `True`): keep the space the tokenizer puts before every text
            (Llama-2's `Prepend("▁")` normalizer or Metaspace `prepend_scheme`, ByteLevel's `add_prefix_space`).
            With `False` the copy encodes a text exactly as its bytes read, so `text_prefix(tokenizer) + text`
            encodes to the ids the tokenizer gives `text`.
    """
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    if not prefix_space:
        backend.normalizer = _edited(backend, "normalizer", _without_prepend)
        backend.pre_tokenizer = _edited(backend, "pre_tokenizer", _without_prefix_space)
    return backend


def _edited(backend: Tokenizer, role: str, edit: Callable[[dict | None], dict | None]) -> Any:
    """`backend`'s normalizer / pre-tokenizer with its JSON state edited, rebuilt through a stub tokenizer (the
    components have no public constructor from JSON); `None` when the edit removes it."""
    component = getattr(backend, role)
    state = edit(None if component is None else json.loads(component.__getstate__()))
    stub = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"[UNK]": 0}, "unk_token": "[UNK]"}, role: state}
    return getattr(Tokenizer.from_str(json.dumps(stub)), role)


def _without_prepend(normalizer: dict | None) -> dict | None:
    if normalizer is None or normalizer.get("type") == "Prepend":
        return None
    if normalizer.get("type") == "Sequence":
        return {**normalizer, "normalizers": [n for n in normalizer["normalizers"] if n.get("type") != "Prepend"]}
    return normalizer


def _without_prefix_space(pre_tokenizer: dict | None) -> dict | None:
    if pre_tokenizer is None:
        return None
    if pre_tokenizer.get("type") == "Sequence":
        return {**pre_tokenizer, "pretokenizers": [_without_prefix_space(p) for p in pre_tokenizer["pretokenizers"]]}
    if pre_tokenizer.get("type") == "Metaspace":
        return {**pre_tokenizer, "prepend_scheme": "never", "add_prefix_space": False}
    if pre_tokenizer.get("type") == "ByteLevel":
        return {**pre_tokenizer, "add_prefix_space": False}
    return pre_tokenizer


def is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` is a byte-level BPE (its decoder maps the 256-symbol byte alphabet back to bytes)."""
    return "ByteLevel" in _decoder_json(tokenizer)


def is_sentencepiece_bpe(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` is a SentencePiece-style BPE with byte fallback (Gemma, Llama-2, Mistral).

    Its model is a BPE with `byte_fallback` (characters outside the vocabulary become `<0xNN>` tokens) and its decoder
    turns `▁` back into a space.
    """
    model = tokenizer.backend_tokenizer.model
    return isinstance(model, models.BPE) and bool(model.byte_fallback) and "ByteFallback" in _decoder_json(tokenizer)


def continuing_prefix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The marker of word-internal pieces (`"##"` for WordPiece), or `""` when the model has none."""
    return getattr(tokenizer.backend_tokenizer.model, "continuing_subword_prefix", None) or ""


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of special and added tokens: never merged, never decomposed, never sampled as text."""
    return {int(i) for i in tokenizer.all_special_ids} | {int(i) for i in tokenizer.added_tokens_decoder}


def special_affixes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Special ids the tokenizer puts before and after a text: `([CLS], [SEP])`, `([<s>], [])`, ..."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def token_bytes(tokenizer: PreTrainedTokenizerBase) -> list[bytes | None]:
    """The bytes every id contributes to the decoded text; `None` for special tokens.

    Byte-level BPE: the 256-symbol alphabet mapped back to bytes (`Ġthe` -> `b" the"`). SentencePiece BPE with byte
    fallback: `▁` is a space and `<0xNN>` is the single byte `0xNN`, so a character outside the vocabulary is the
    concatenation of its byte tokens. Added tokens that are not special (Gemma's newline runs, HTML tags) stand for
    their own text.

    Raises:
        `ValueError` when `tokenizer` is neither (bytes of WordPiece pieces are not defined).
    """
    if is_byte_level(tokenizer):
        table = _unicode_to_byte()

        def piece_bytes(piece: str) -> bytes | None:
            return None if any(c not in table for c in piece) else bytes(table[c] for c in piece)

    elif is_sentencepiece_bpe(tokenizer):

        def piece_bytes(piece: str) -> bytes | None:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace(SPACE_MARK, " ").encode()

    else:
        raise ValueError(
            f"{type(tokenizer).__name__} is neither a byte-level BPE tokenizer (GPT-2 / Llama-3 / Qwen style, decoder "
            "ByteLevel) nor a SentencePiece BPE with byte fallback (Gemma / Llama-2 / Mistral); exact byte views need "
            "one of them"
        )
    added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
    specials = {int(i) for i in tokenizer.all_special_ids} | {i for i, t in added.items() if t.special}
    out: list[bytes | None] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in specials or piece is None:
            out.append(None)
        elif i in added:
            out.append(added[i].content.encode())
        else:
            out.append(piece_bytes(piece))
    return out


def text_prefix(tokenizer: PreTrainedTokenizerBase, table: list[bytes | None] | None = None) -> bytes:
    """The bytes `tokenizer` puts before every text: `b" "` when it adds a prefix space (Llama-2 / Mistral `▁`,
    ByteLevel `add_prefix_space`), else `b""` (Gemma-3, GPT-2, SmolLM2). Read from the encoding of `"a"`.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): a byte-level or SentencePiece byte-fallback BPE tokenizer.
        table (`list[bytes | None]`, *optional*): `token_bytes(tokenizer)`, when already computed.
    """
    table = token_bytes(tokenizer) if table is None else table
    ids = plain_backend(tokenizer).encode("a", add_special_tokens=False).ids
    encoded = b"".join(table[i] or b"" for i in ids)
    if not encoded.endswith(b"a"):
        raise ValueError(f"{type(tokenizer).__name__} encodes 'a' as {encoded!r}: its normalizer rewrites the text")
    return encoded[:-1]


class BytePrefixIndex:
    """Token ids sorted by their bytes, to list the tokens whose bytes start with a given prefix.

    Args:
        table (`list[bytes | None]`): the bytes of every id (`token_bytes`); ids without bytes are left out.
        exclude (`Iterable[int]`, *optional*): further ids to leave out.
    """

    def __init__(self, table: list[bytes | None], exclude: Iterable[int] = ()) -> None:
        skip = set(exclude)
        pairs = sorted((b, i) for i, b in enumerate(table) if b and i not in skip)
        self.keys = [b for b, _ in pairs]
        self.ids = torch.tensor([i for _, i in pairs], dtype=torch.long)  # (N,) ids in byte order
        self.lengths = torch.tensor([len(b) for b in self.keys], dtype=torch.long)  # (N,)
        self.max_len = max(len(b) for b in self.keys)

    def span(self, prefix: bytes) -> tuple[int, int]:
        """Positions `[lo, hi)` in byte order of the tokens whose bytes start with `prefix`."""
        lo = bisect.bisect_left(self.keys, prefix)
        return lo, bisect.bisect_left(self.keys, prefix + b"\xff" * (self.max_len + 1), lo)

    def starting_with(self, prefix: bytes, min_len: int = 0) -> torch.Tensor:
        """Ids `(C,)` of the tokens whose bytes start with `prefix` and are at least `min_len` bytes long."""
        lo, hi = self.span(prefix)
        ids = self.ids[lo:hi]
        return ids[self.lengths[lo:hi] >= min_len] if min_len > len(prefix) else ids


def surface_form(tokenizer: PreTrainedTokenizerBase, ids: list[int] | tuple[int, ...]) -> str:
    """The token string of a run of `ids` in `tokenizer`'s alphabet, as if it were one token.

    Example: byte-level `["Ġthe", "re"] -> "Ġthere"`; WordPiece `["play", "##ing"] -> "playing"` and
    `["##pl", "##ay"] -> "##play"` (the run keeps the marker of its first piece).
    """
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    prefix = continuing_prefix(tokenizer)
    rest = [p[len(prefix) :] if prefix and p.startswith(prefix) else p for p in pieces[1:]]
    return pieces[0] + "".join(rest)


def decompose(tokenizer: PreTrainedTokenizerBase, surfaces: list[str]) -> list[list[int]]:
    """Base ids of each token string in `surfaces`, found by the tokenizer's model alone.

    Strings are in the tokenizer's own alphabet (see `surface_form`), so byte-level strings need no
    re-encoding and WordPiece continuation pieces (`"##ing"`) stay continuation pieces. Special tokens map
    to themselves.
    """
    backend = tokenizer.backend_tokenizer
    vocab = tokenizer.get_vocab()
    out = []
    for surface in surfaces:
        if surface in vocab:  # the common case, and the only correct one for added / special tokens
            out.append([vocab[surface]])
        else:
            out.append([token.id for token in backend.model.tokenize(surface)])
    return out
