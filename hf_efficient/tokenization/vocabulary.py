"""What a token *is* across tokenizer families: its bytes, its surface string and its decomposition.

Dynamic merges, the hypernetwork, transplant and byte-level sampling all compare tokens of different
vocabularies. They do it through the three views defined here, so that byte-level BPE (`Ġthe`), WordPiece
(`##ing`) and SentencePiece (`▁the`) tokens are handled in one place:

- `token_bytes(tokenizer)`: the exact UTF-8 bytes each id stands for (byte-level BPE only);
- `surface_form(tokenizer, ids)`: the string of a run of ids in the tokenizer's own token alphabet
  (`Ġthe` + `re` -> `Ġthere`, `play` + `##ing` -> `playing`), which is also the key of shared tokens;
- `decompose(tokenizer, surfaces)`: the base ids of such strings, running only the tokenizer's model
  (no normalizer or pre-tokenizer), as ZeTT does for surface forms.
"""

from __future__ import annotations

import functools
import json

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

__all__ = [
    "byte_to_unicode",
    "continuing_prefix",
    "decompose",
    "is_byte_level",
    "plain_backend",
    "special_affixes",
    "special_ids",
    "surface_form",
    "token_bytes",
]


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


def _backend_json(tokenizer: PreTrainedTokenizerBase) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def plain_backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    """A copy of `tokenizer`'s backend without padding and truncation (saved tokenizers often enable both)."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


def is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether `tokenizer` is a byte-level BPE (its decoder maps the 256-symbol byte alphabet back to bytes)."""
    return "ByteLevel" in json.dumps(_backend_json(tokenizer).get("decoder"))


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
    """The bytes of every id of a byte-level BPE tokenizer; `None` for special / added tokens.

    Raises:
        `ValueError` when `tokenizer` is not byte-level (bytes of WordPiece pieces are not defined).
    """
    if not is_byte_level(tokenizer):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a byte-level BPE tokenizer; exact byte views need one "
            "(GPT-2 / Llama-3 / Qwen style, decoder ByteLevel)"
        )
    table = _unicode_to_byte()
    specials = special_ids(tokenizer)
    out: list[bytes | None] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in specials or piece is None or any(c not in table for c in piece):
            out.append(None)
        else:
            out.append(bytes(table[c] for c in piece))
    return out


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
