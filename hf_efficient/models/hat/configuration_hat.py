"""HAT configuration (remote code: imports nothing from `hf_efficient`)."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import PreTrainedConfig

__all__ = ["HAT_PRESETS", "HATConfig"]

# Larger configurations. "hat_llama3_8b" shapes the word-level backbone like Llama-3.1-8B, as in the TFree-HAT
# conversions (Neitemeier et al., 2025, §4); the byte encoder/decoder sizes are our choice.
HAT_PRESETS: dict[str, dict[str, Any]] = {
    "hat_1b": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_attention_heads": 12,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "backbone_hidden_size": 2048,
        "backbone_intermediate_size": 5632,
        "backbone_layers": 20,
        "backbone_num_attention_heads": 16,
        "sliding_window": 768,
    },
    "hat_llama3_8b": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_attention_heads": 8,
        "encoder_layers": 6,
        "decoder_layers": 4,
        "backbone_hidden_size": 4096,
        "backbone_intermediate_size": 14336,
        "backbone_layers": 32,
        "backbone_num_attention_heads": 32,
        "backbone_num_key_value_heads": 8,
        "sliding_window": 768,
        "rope_theta": 500000.0,
    },
}


class HATConfig(PreTrainedConfig):
    r"""
    Configuration of [`HATForCausalLM`]: a byte encoder pools each word into one vector, a word-level Llama
    backbone runs over words, and a byte decoder predicts the next bytes from the preceding words' outputs.

    `HATConfig()` describes a ~4M-parameter model that trains and generates on a CPU; larger ones:
    `HATConfig.from_preset("hat_1b")` (see `HAT_PRESETS`).

    Paper: HAT, "Hierarchical Autoregressive Transformers: Combining Byte- and Word-Level Processing for Robust,
    Adaptable Language Models" (Neitemeier et al., 2025, arXiv:2501.10322).

    Args:
        vocab_size (`int`, *optional*, defaults to 259): 256 bytes plus `<pad>`, `<s>`, `</s>` (`ByteTokenizer`).
        hidden_size (`int`, *optional*, defaults to 128): width of the byte encoder and decoder.
        intermediate_size (`int`, *optional*, defaults to 352): MLP width of the byte layers.
        num_attention_heads (`int`, *optional*, defaults to 4): heads of the byte layers and cross-attentions.
        encoder_layers (`int`, *optional*, defaults to 1): byte encoder Llama layers.
        decoder_layers (`int`, *optional*, defaults to 2): byte decoder layers (cross-attention + Llama layer).
        sliding_window (`int`, *optional*, defaults to 128): attention window of the byte layers, in bytes.
        backbone_hidden_size (`int`, *optional*, defaults to 256): width of the word-level backbone.
        backbone_intermediate_size (`int`, *optional*, defaults to 704): its MLP width.
        backbone_layers (`int`, *optional*, defaults to 4): its Llama layers.
        backbone_num_attention_heads (`int`, *optional*, defaults to 4): its heads.
        backbone_num_key_value_heads (`int`, *optional*): its KV heads (defaults to its heads).
        max_word_bytes (`int`, *optional*, defaults to 16): longer words are split (at character starts).
        decoder_word_window (`int`, *optional*, defaults to 2): how many preceding words a byte's decoder sees.
        rms_norm_eps (`float`, *optional*, defaults to 1e-5): RMSNorm epsilon.
        rope_theta (`float`, *optional*, defaults to 10000.0): RoPE base (byte positions and word positions).
        max_position_embeddings (`int`, *optional*, defaults to 8192): longest byte context.
        initializer_range (`float`, *optional*, defaults to 0.02): std of linear-layer initialisation.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`): tie `lm_head` to the byte embedding.
    """

    model_type = "hfe_hat"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["cache", "past_key_values"]  # the name before and after 5.24

    def __init__(
        self,
        vocab_size: int = 259,
        hidden_size: int = 128,
        intermediate_size: int = 352,
        num_attention_heads: int = 4,
        encoder_layers: int = 1,
        decoder_layers: int = 2,
        sliding_window: int | None = 128,
        backbone_hidden_size: int = 256,
        backbone_intermediate_size: int = 704,
        backbone_layers: int = 4,
        backbone_num_attention_heads: int = 4,
        backbone_num_key_value_heads: int | None = None,
        max_word_bytes: int = 16,
        decoder_word_window: int = 2,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 8192,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = 256,
        bos_token_id: int | None = 257,
        eos_token_id: int | None = 258,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.sliding_window = sliding_window
        self.backbone_hidden_size = backbone_hidden_size
        self.backbone_intermediate_size = backbone_intermediate_size
        self.backbone_layers = backbone_layers
        self.backbone_num_attention_heads = backbone_num_attention_heads
        self.backbone_num_key_value_heads = backbone_num_key_value_heads or backbone_num_attention_heads
        self.max_word_bytes = max_word_bytes
        self.decoder_word_window = decoder_word_window
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        for name in ("hidden_size", "backbone_hidden_size"):
            heads = self.num_attention_heads if name == "hidden_size" else self.backbone_num_attention_heads
            if getattr(self, name) % heads:
                raise ValueError(f"{name}={getattr(self, name)} must be divisible by its number of heads ({heads})")
        if self.backbone_num_attention_heads % self.backbone_num_key_value_heads:
            raise ValueError(
                f"backbone_num_attention_heads={self.backbone_num_attention_heads} must be divisible by "
                f"backbone_num_key_value_heads={self.backbone_num_key_value_heads}"
            )
        if self.max_word_bytes < 1 or self.decoder_word_window < 1:
            raise ValueError(
                f"max_word_bytes={self.max_word_bytes} and decoder_word_window={self.decoder_word_window} must be >= 1"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> HATConfig:
        """A larger configuration from `HAT_PRESETS`, e.g. `HATConfig.from_preset("hat_1b")`."""
        if name not in HAT_PRESETS:
            raise ValueError(f"unknown HAT preset name={name!r}; available: {sorted(HAT_PRESETS)}")
        return cls(**{**HAT_PRESETS[name], **overrides})


HATConfig.register_for_auto_class()
