"""H-Net: byte-level LM with learned dynamic chunking (remote code: a flat folder, copied by `save_pretrained`)."""

from .cache_hnet import HNetCache
from .configuration_hnet import HNET_PRESETS, HNetConfig
from .modeling_hnet import HNetCausalLMOutput, HNetForCausalLM, HNetModel, HNetPreTrainedModel

__all__ = [
    "HNET_PRESETS",
    "HNetCache",
    "HNetCausalLMOutput",
    "HNetConfig",
    "HNetForCausalLM",
    "HNetModel",
    "HNetPreTrainedModel",
]
