"""The one contract every hf_efficient cache shares: a `Cache` of per-layer policies that report their true bytes.

A method is a `CacheLayerMixin` subclass (the policy) plus a thin `Cache` subclass that builds one layer per
decoder layer of `config` and validates the hyperparameters. Two families build on it:

- quantised caches (`ResidualCompressedLayer` in `compressed.py`): the whole history, compressed in blocks;
- eviction caches (`EvictionLayer` in `eviction.py`): a scored subset of the history, per KV head.

Layers follow `config.layer_types`, as `DynamicCache` does: full-attention layers get the method's policy, and
sliding-window layers (Gemma 2/3's local layers, every layer of a Mistral-style `sliding_window` config) keep only
their window: in full precision (`SlidingWindowLayer`) or, for the quantised caches, compressed
(`sliding_layers="compressed"`). Other layer types (chunked, linear attention) are refused by name.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from transformers import PreTrainedConfig

from ..compat import Cache, CacheLayerMixin, DynamicSlidingWindowLayer
from .scoring import ATTENTION_NAME, HANDOFF_ATTRIBUTE, AttentionRoute

__all__ = [
    "CompressedKVCache",
    "MeasuredLayer",
    "SlidingWindowLayer",
    "check_choice",
    "decoder_layer_types",
    "head_dim_of",
    "kv_heads_of",
    "tensor_nbytes",
]


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


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """`ValueError` naming the argument and its valid values when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def decoder_layer_types(config: PreTrainedConfig) -> list[tuple[str, int | None]]:
    """`(layer type, sliding window)` per decoder layer, read like `DynamicCache(config=...)` reads them.

    `config.layer_types` when present (Gemma 2/3, Qwen 2/3 with `use_sliding_window`), else every layer
    `"sliding_attention"` when the config has a `sliding_window` (Mistral-style), `"chunked_attention"` when it has an
    `attention_chunk_size`, or `"full_attention"`. The window is `None` for non-sliding layers.
    """
    config = config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        if window is not None:
            kind = "sliding_attention"
        elif getattr(config, "attention_chunk_size", None) is not None:
            kind = "chunked_attention"
        else:
            kind = "full_attention"
        layer_types = [kind] * config.num_hidden_layers
    return [(kind, window if kind == "sliding_attention" else None) for kind in layer_types]


class SlidingWindowLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer (the last `sliding_window - 1` tokens, in full precision) with `nbytes`.

    Rolls back like `DynamicCache`'s sliding layers: after `activate_past_recording()`, `crop(-n)` is exact.
    """

    is_croppable = True

    def nbytes(self) -> int:
        """Bytes of the keys and values held."""
        return tensor_nbytes(self.keys, self.values) if self.is_initialized else 0


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
    """A `Cache` of one layer per decoder layer of `config`, following its layer types, reporting its true footprint.

    Full-attention layers get `layer_factory()`; sliding-window layers get `sliding_layer_factory(window)`, by
    default a full-precision `SlidingWindowLayer`. While the cache is filled, each policy layer's attention call is
    routed to its `attend` (`scoring.AttentionRoute`); the model's own attention setting is never changed.

    Args:
        config (`PreTrainedConfig`): the model's own config object (`model.config`): its decoder sub-config gives
            the layer types, and its attention setting is routed one call at a time.
        layer_factory (`Callable[[], MeasuredLayer]`): builds the policy of a full-attention layer.
        sliding_layer_factory (`Callable[[int], CacheLayerMixin]`, *optional*): builds a sliding-window layer from
            its window (default `SlidingWindowLayer`).

    Raises:
        `ValueError`: for a layer type the cache cannot hold (e.g. chunked or linear attention), naming the layer.
    """

    needs_attention_call = False  # True: refuse attention implementations whose masks cannot be read

    def __init__(
        self,
        config: PreTrainedConfig,
        layer_factory: Callable[[], MeasuredLayer],
        sliding_layer_factory: Callable[[int], CacheLayerMixin] | None = None,
    ):
        head_dim_of(config)  # validates that a config was given
        sliding_layer_factory = sliding_layer_factory or SlidingWindowLayer
        layers = []
        for index, (kind, window) in enumerate(decoder_layer_types(config)):
            if kind == "full_attention":
                layers.append(layer_factory())
            elif kind == "sliding_attention":
                layers.append(sliding_layer_factory(window))
            else:
                raise ValueError(
                    f"{type(self).__name__} cannot hold layer {index} of this model: its type is {kind!r}, and the "
                    "cache supports 'full_attention' and 'sliding_attention' layers only. Use transformers' "
                    "DynamicCache (generate's default) for this model."
                )
        super().__init__(layers=layers)
        route = AttentionRoute(config, type(self).__name__, required=self.needs_attention_call)
        for layer in self.layers:
            if isinstance(layer, MeasuredLayer):
                layer.route = route

    def nbytes(self) -> int:
        """True storage of the cache in bytes, summed over layers."""
        return sum(layer.nbytes() for layer in self.layers)
