"""The one place where hf_efficient reaches transformers internals (outside the remote-code model folders).

A transformers release that moves a private name breaks this file only. Public transformers APIs are
imported directly where they are used.

transformers 5.24 renamed the cache argument `past_key_values` to `cache` (forward and `generate` kwargs, model
outputs, the kwargs a `custom_generate` callable receives); the old name warns until 5.40 / 6.0. Our code passes
`**cache_kwarg(cache)`, reads `output_cache(out)` and accepts both spellings from callers (`either_cache`), so it
raises no deprecation warning on any supported release. The helpers live in the model folders' shim
(`models/cache_argument.py`, carried by remote code) and are re-exported here.
"""

import inspect
import sys

from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    QuantizedCache,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .models.cache_argument import (
    CACHE_ARG,
    CACHE_ARG_SPELLINGS,
    LEGACY_CACHE_ARG,
    cache_kwarg,
    either_cache,
    output_cache,
)

__all__ = [
    "ALL_ATTENTION_FUNCTIONS",
    "ALL_MASK_ATTENTION_FUNCTIONS",
    "CACHE_ARG",
    "CACHE_ARG_SPELLINGS",
    "LEGACY_CACHE_ARG",
    "AttentionInterface",
    "AttentionMaskInterface",
    "Cache",
    "CacheLayerMixin",
    "DynamicCache",
    "DynamicLayer",
    "DynamicSlidingWindowLayer",
    "GenerateDecoderOnlyOutput",
    "QuantizedCache",
    "accepts_cache",
    "cache_kwarg",
    "either_cache",
    "generate_streamer",
    "output_cache",
    "sdpa_attention_forward",
    "sdpa_mask",
]


def accepts_cache(model) -> bool:
    """Whether `model.forward` takes a KV cache (under either name)."""
    parameters = inspect.signature(model.forward).parameters
    return any(name in parameters for name in CACHE_ARG_SPELLINGS)


def generate_streamer(strategy):
    """The `streamer=` of the `generate` call that is running `strategy` as its `custom_generate` callable.

    `GenerationMixin._extract_generation_mode_kwargs` keeps, for a callable, only the arguments missing from
    `_sample`'s signature, so the streamer `generate` received never reaches the callable (transformers 5.17-5.24;
    `generate` itself still puts the prompt into it). It is read from that `generate` frame instead: the nearest
    caller frame of a function named `generate` whose `custom_generate` is `strategy`. `None` outside `generate`.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "generate" and frame.f_locals.get("custom_generate") is strategy:
            return frame.f_locals.get("streamer")
        frame = frame.f_back
    return None
