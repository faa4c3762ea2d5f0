"""The one contract every hf_efficient cache shares: a `Cache` of per-layer policies that report their true bytes.

A method is a `CacheLayerMixin` subclass (the policy) plus a thin `Cache` subclass that builds one layer per
decoder layer of `config` and validates the hyperparameters. Two families build on it:

- quantised caches (`ResidualCompressedLayer` in `compressed.py`): the whole history, compressed in blocks;
- eviction caches (`EvictionLayer` in `eviction.py`): a scored subset of the history, per KV head.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from transformers import PreTrainedConfig

from ..compat import Cache, CacheLayerMixin

__all__ = ["CompressedKVCache", "MeasuredLayer", "head_dim_of", "kv_heads_of", "tensor_nbytes"]


def tensor_nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by `tensors` (`None` counts as 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def head_dim_of(config: PreTrainedConfig) -> int:
    """The attention head dimension of a decoder config (explicit `head_dim` or `hidden_size // heads`)."""
    if config is None:
        raise ValueError("the cache needs the model config: pass `config=model.config`")
    config = config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None)
    return head_dim if head_dim is not None else config.hidden_size // config.num_attention_heads


def kv_heads_of(config: PreTrainedConfig) -> int:
    """The number of key-value heads of a decoder config (`num_key_value_heads`, else `num_attention_heads`)."""
    config = config.get_text_config(decoder=True)
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


class MeasuredLayer(CacheLayerMixin):
    """A cache layer that knows its real storage in bytes."""

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held by this layer (every tensor it keeps, packed codes and bookkeeping included)."""


class CompressedKVCache(Cache):
    """A `Cache` with one `layer_factory()` layer per decoder layer of `config`, reporting its true footprint.

    Args:
        config (`PreTrainedConfig`): the model config (`model.config`); its decoder sub-config gives the layer count.
        layer_factory (`Callable[[], MeasuredLayer]`): builds one layer policy.
    """

    def __init__(self, config: PreTrainedConfig, layer_factory: Callable[[], MeasuredLayer]):
        head_dim_of(config)  # validates that a config was given
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[layer_factory() for _ in range(num_layers)])

    def nbytes(self) -> int:
        """True storage of the cache in bytes, summed over layers."""
        return sum(layer.nbytes() for layer in self.layers)
