"""Embedding hypernetwork for dynamic tokenization (remote code: a flat folder, copied by `save_pretrained`)."""

from .configuration_hypernet import HypernetConfig
from .modeling_hypernet import EmbeddingCache, EmbeddingHypernetwork, HypernetOutput

__all__ = ["EmbeddingCache", "EmbeddingHypernetwork", "HypernetConfig", "HypernetOutput"]
