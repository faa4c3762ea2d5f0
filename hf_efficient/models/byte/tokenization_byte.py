"""Byte-level tokenizer shared by the hierarchical byte models (H-Net, HAT).

The vocabulary is the 256 raw UTF-8 byte values (id == byte value) followed by three special tokens:
`<pad>` = 256, `<s>` = 257 (BOS), `</s>` = 258 (EOS). Nothing is learned, so the tokenizer has no vocabulary
file: `save_pretrained` writes only `tokenizer_config.json` (plus this module when the class is registered for
`AutoTokenizer`, see `ByteTokenizer.register_for_auto_class`).

This file is self-contained remote code: it imports nothing from `hf_efficient`.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken

__all__ = ["BYTE_VOCAB_SIZE", "ByteTokenizer"]

# 256 byte values + <pad>, <s>, </s>
BYTE_VOCAB_SIZE = 259
_NUM_BYTES = 256


class ByteTokenizer(PreTrainedTokenizer):
    r"""
    UTF-8 byte tokenizer: one id per byte (ids 0-255), plus `<pad>` (256), `<s>` (257) and `</s>` (258).

    Text is never split into special tokens (`split_special_tokens=True` by default): the string `"</s>"` in user
    text becomes its five bytes, so every string round-trips exactly. Decoding replaces invalid UTF-8 with U+FFFD;
    an incomplete multi-byte character at the end of the ids decodes to a single U+FFFD that streaming decoders
    (`transformers.TextStreamer`, `ByteTokenizer.decode_incremental`) hold back until the character is complete.

    Paper: shared by H-Net (Hwang et al., 2025, arXiv:2507.07955) and HAT (Neitemeier et al., 2025,
    arXiv:2501.10322), which both model raw UTF-8 bytes.

    Args:
        bos_token (`str`, *optional*, defaults to `"<s>"`):
            Beginning-of-sequence token (id 257).
        eos_token (`str`, *optional*, defaults to `"</s>"`):
            End-of-sequence token (id 258).
        pad_token (`str`, *optional*, defaults to `"<pad>"`):
            Padding token (id 256).
        prepend_bos (`bool`, *optional*, defaults to `True`):
            Whether `add_special_tokens=True` puts `<s>` before each sequence.
        append_eos (`bool`, *optional*, defaults to `False`):
            Whether `add_special_tokens=True` puts `</s>` after each sequence.

    Example:

    ```python
    >>> tok = ByteTokenizer()
    >>> tok("héllo").input_ids
    [257, 104, 195, 169, 108, 108, 111]
    >>> tok.decode([104, 195, 169], skip_special_tokens=True)
    'hé'
    ```
    """

    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def __init__(
        self,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
        prepend_bos: bool = True,
        append_eos: bool = False,
        **kwargs,
    ) -> None:
        self.prepend_bos = prepend_bos
        self.append_eos = append_eos
        specials = {_NUM_BYTES: pad_token, _NUM_BYTES + 1: bos_token, _NUM_BYTES + 2: eos_token}
        self._added_tokens_decoder = {
            i: AddedToken(t, special=True, normalized=False) if isinstance(t, str) else t for i, t in specials.items()
        }
        kwargs.pop("added_tokens_decoder", None)  # fixed ids; never taken from a saved config
        kwargs.setdefault("split_special_tokens", True)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            prepend_bos=prepend_bos,
            append_eos=append_eos,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return _NUM_BYTES

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(i): i for i in range(_NUM_BYTES)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # one "token" per byte, spelled as the Latin-1 character with that code point (reversible, 1 char each)
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) != 1 or ord(token) >= _NUM_BYTES:
            raise ValueError(f"ByteTokenizer tokens are single characters below U+0100, got token={token!r}")
        return ord(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index < _NUM_BYTES:
            return chr(index)
        return self._added_tokens_decoder[index].content

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out, pending = [], bytearray()
        for token in tokens:
            if len(token) == 1 and ord(token) < _NUM_BYTES:
                pending.append(ord(token))
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
            out.append(token)
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            token_ids = [i for i in token_ids if i < _NUM_BYTES]
        return self.convert_tokens_to_string([self._convert_id_to_token(int(i)) for i in token_ids])

    def decode_incremental(self, token_ids: list[int], pending: bytes = b"") -> tuple[str, bytes]:
        """Decode `pending + token_ids`, holding back a trailing incomplete UTF-8 character.

        Args:
            token_ids (`list[int]`): new ids; special tokens are dropped.
            pending (`bytes`, *optional*, defaults to `b""`): bytes held back by the previous call.

        Returns:
            `tuple[str, bytes]`: the complete characters, and the bytes to pass as `pending` next time.
        """
        data = pending + bytes(i for i in token_ids if i < _NUM_BYTES)
        cut = _complete_prefix_length(data)
        return data[:cut].decode("utf-8", errors="replace"), data[cut:]

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        def wrap(ids: list[int]) -> list[int]:
            bos = [self.bos_token_id] if self.prepend_bos else []
            eos = [self.eos_token_id] if self.append_eos else []
            return bos + ids + eos

        return wrap(token_ids_0) if token_ids_1 is None else wrap(token_ids_0) + wrap(token_ids_1)

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return [int(i >= _NUM_BYTES) for i in token_ids_0 + (token_ids_1 or [])]
        ids = self.build_inputs_with_special_tokens([0] * len(token_ids_0), token_ids_1 and [0] * len(token_ids_1))
        return [int(i != 0) for i in ids]

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the byte vocabulary is implicit


def _complete_prefix_length(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a valid but incomplete UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else 4 if lead & 0xF8 == 0xF0 else 1
        return len(data) - back if need > back else len(data)
    return len(data)


# `save_pretrained` writes `auto_map` and copies this file, so saved folders load with `trust_remote_code=True`
ByteTokenizer.register_for_auto_class("AutoTokenizer")
