"""UTF-8 byte tokenizer shared by the hierarchical byte models (remote code: a flat folder)."""

from .tokenization_byte import BYTE_VOCAB_SIZE, ByteTokenizer

__all__ = ["BYTE_VOCAB_SIZE", "ByteTokenizer"]
