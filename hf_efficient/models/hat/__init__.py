"""HAT: byte encoder -> word backbone -> byte decoder (remote code: a flat folder, copied by `save_pretrained`)."""

from .cache_hat import HATCache
from .configuration_hat import HAT_PRESETS, HATConfig
from .modeling_hat import HATCausalLMOutput, HATForCausalLM, HATPreTrainedModel

__all__ = ["HAT_PRESETS", "HATCache", "HATCausalLMOutput", "HATConfig", "HATForCausalLM", "HATPreTrainedModel"]
