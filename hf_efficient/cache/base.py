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
from .scoring import ATTENTION_NAME, HANDOFF_ATTRIBUTE, AttentionRoute

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
    """A cache layer that knows its real storage in bytes and sees its attention call (`attend`).

    `update` ends with `hand_off(keys)`: the call that follows is routed to the `"hfe_kv"` attention
    (`scoring.AttentionRoute`), which calls `attend` with the queries and the model's mask.
    """

    route: AttentionRoute | None = None  # set by `CompressedKVCache`
    awaiting_attention = False

    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes held by this layer (every tensor it keeps, packed codes and bookkeeping included)."""

    @abc.abstractmethod
    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        **kwargs,
    ) -> torch.Tensor:
        """The attention output `(B, q, H, D)` of `query` `(B, H, q, D)` over what `update` returned."""

    def missed_attention(self) -> None:
        """Called when `update` comes again before a routed attention call ran (the layer filled by hand, outside a
        model, or through a copy of the model's config) and the route is optional: finish the previous update."""

    def hand_off(self, keys: torch.Tensor) -> bool:
        """Route the attention call that follows `update` to this layer's `attend`; whether it was routed.

        Raises:
            `RuntimeError`: when the previous routed call never reached the attention (a cache built on a copy of
                the model's config) and the layer cannot work without it.
        """
        if self.awaiting_attention and not self.route.required:
            self.route.back()
            self.awaiting_attention = False
            self.missed_attention()
        if self.awaiting_attention:
            raise RuntimeError(
                f"{type(self).__name__} was updated twice without its attention running: the cache routes the "
                f"model's attention to {ATTENTION_NAME!r} through the config it was built with; build it with "
                "`config=model.config` (the model's own config object, not a copy)"
            )
        if self.route is None or not self.route.to_scoring():
            return False
        self.awaiting_attention = True
        setattr(keys, HANDOFF_ATTRIBUTE, self)
        return True


class CompressedKVCache(Cache):
    """A `Cache` with one `layer_factory()` layer per decoder layer of `config`, reporting its true footprint.

    While the cache is filled, each layer's attention call is routed to its `attend` (`scoring.AttentionRoute`);
    the model's own attention setting is never changed.

    Args:
        config (`PreTrainedConfig`): the model's own config object (`model.config`): its decoder sub-config gives
            the layer count, and its attention setting is routed one call at a time.
        layer_factory (`Callable[[], MeasuredLayer]`): builds one layer policy.
    """

    needs_attention_call = False  # True: refuse attention implementations whose masks cannot be read

    def __init__(self, config: PreTrainedConfig, layer_factory: Callable[[], MeasuredLayer]):
        head_dim_of(config)  # validates that a config was given
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[layer_factory() for _ in range(num_layers)])
        route = AttentionRoute(config, type(self).__name__, required=self.needs_attention_call)
        for layer in self.layers:
            layer.route = route

    def nbytes(self) -> int:
        """True storage of the cache in bytes, summed over layers."""
        return sum(layer.nbytes() for layer in self.layers)
