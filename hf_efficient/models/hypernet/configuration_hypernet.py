"""Embedding hypernetwork configuration (remote code: imports nothing from `hf_efficient`)."""

from __future__ import annotations

from transformers import PreTrainedConfig

__all__ = ["HypernetConfig"]


class HypernetConfig(PreTrainedConfig):
    r"""
    Configuration of [`EmbeddingHypernetwork`], which predicts the embeddings of a token from its decomposition
    into the tokens of a frozen base model.

    Paper: Zero-Shot Tokenizer Transfer (Minixhofer, Ponti, Vulić, NeurIPS 2024, arXiv:2405.07883), §3.

    Args:
        source_vocab_size (`int`, *optional*, defaults to 30522): vocabulary size `V` of the base model.
        embedding_dim (`int`, *optional*, defaults to 384): embedding width `E` of the base model.
        separate_output (`bool`, *optional*, defaults to `False`): the base model has untied output embeddings;
            the hypernetwork then reads `concat(E_in, E_out)` and predicts both.
        hidden_size (`int`, *optional*, defaults to 256): width `H` of the hypernetwork's transformer.
        num_hidden_layers (`int`, *optional*, defaults to 2): transformer layers (ZeTT uses 3).
        num_attention_heads (`int`, *optional*, defaults to 4): attention heads; must divide `hidden_size`.
        intermediate_size (`int`, *optional*, defaults to 512): feed-forward width.
        max_surface_length (`int`, *optional*, defaults to 8): base tokens read per new token (longer
            decompositions are truncated; ZeTT: 7).
        cache_size (`int`, *optional*, defaults to 4096): rows of the LRU cache of predicted embeddings used in
            inference (0 disables it).
        dropout (`float`, *optional*, defaults to 0.0): dropout inside the transformer.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): LayerNorm epsilon.
        initializer_range (`float`, *optional*, defaults to 0.02): std of linear-layer initialisation.
        base_model_name_or_path (`str`, *optional*): the base model the hypernetwork was trained for (path or Hub id,
            PEFT's name for it); `from_pretrained` copies the base's embeddings from there.
    """

    model_type = "hfe_hypernet"

    def __init__(
        self,
        source_vocab_size: int = 30522,
        embedding_dim: int = 384,
        separate_output: bool = False,
        hidden_size: int = 256,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 512,
        max_surface_length: int = 8,
        cache_size: int = 4096,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        base_model_name_or_path: str | None = None,
        **kwargs,
    ) -> None:
        self.source_vocab_size = source_vocab_size
        self.embedding_dim = embedding_dim
        self.separate_output = separate_output
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_surface_length = max_surface_length
        self.cache_size = cache_size
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.base_model_name_or_path = base_model_name_or_path
        super().__init__(**kwargs)
        for name in ("source_vocab_size", "embedding_dim", "hidden_size", "num_attention_heads", "max_surface_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must be divisible by num_attention_heads={num_attention_heads}"
            )
        if cache_size < 0:
            raise ValueError(f"cache_size={cache_size} must be >= 0 (0 disables the cache)")


HypernetConfig.register_for_auto_class()
