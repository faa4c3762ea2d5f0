"""The one place where hf_efficient reaches transformers internals (outside the remote-code model folders).

A transformers release that moves a private name breaks this file only. Public transformers APIs are
imported directly where they are used.
"""

from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, QuantizedCache
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

__all__ = [
    "ALL_ATTENTION_FUNCTIONS",
    "ALL_MASK_ATTENTION_FUNCTIONS",
    "AttentionInterface",
    "AttentionMaskInterface",
    "Cache",
    "CacheLayerMixin",
    "DynamicCache",
    "DynamicLayer",
    "GenerateDecoderOnlyOutput",
    "QuantizedCache",
    "sdpa_attention_forward",
    "sdpa_mask",
]
