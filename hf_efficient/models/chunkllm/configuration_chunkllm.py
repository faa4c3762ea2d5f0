"""ChunkLLM configuration: chunk-selection adapters on top of a frozen rotary decoder (the backbone)."""

from typing import ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

DISTILLATION_TARGETS = ("chunk", "token")


class ChunkLLMConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ChunkLLMForCausalLM`]: a frozen backbone decoder plus the ChunkLLM adapters that pick
    which chunks of the KV cache each attention layer reads.

    Paper: ChunkLLM: A Lightweight Pluggable Framework for Accelerating LLMs Inference (Ouyang et al., 2025,
    arXiv:2510.02361).

    Args:
        backbone_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the backbone causal LM (Llama, Qwen2, Mistral, ... any decoder with rotary attention).
        base_model_name_or_path (`str`, *optional*):
            Where the backbone comes from (Hub id or local path; PEFT's name for it). `save_pretrained` writes only the
            adapters, and `from_pretrained` loads the backbone from here. Configs saved before this field read
            `backbone_name_or_path`, which is still accepted.
        adapter_dim (`int`, *optional*, defaults to 32):
            Width per KV head of the Q/K adapters that score chunks.
        boundary_hidden_size (`int`, *optional*, defaults to 64):
            Hidden width of the chunk-boundary adapter (one hidden layer).
        top_k_chunks (`int`, *optional*, defaults to 8):
            Closed chunks each KV head selects (by adapter score) besides the sink tokens, the local window and the
            current chunk. With `top_k_chunks + local_chunks` at least the number of chunks, outputs equal the
            backbone's exactly.
        local_chunks (`int`, *optional*, defaults to 4):
            Most recent closed chunks every query reads whatever their score (a local window, like the recent
            tokens of StreamingLLM); the adapters pick the `top_k_chunks` among the older ones. Mean-pooled adapter
            keys carry no position, so without it the adapters miss much of the attention to the last few
            chunks, which a small decoder mostly attends to. Counted in `kv_retention`; 0 disables it.
        sink_tokens (`int`, *optional*, defaults to 4):
            First tokens of every sequence that are always attended (attention sinks).
        boundary_threshold (`float`, *optional*, defaults to 0.5):
            Probability above which the boundary adapter closes the current chunk.
        prefill_block_size (`int`, *optional*, defaults to 512):
            Prompts longer than this are prefilled in blocks of this many tokens.
        distillation_target (`str`, *optional*, defaults to `"chunk"`):
            What the Q/K adapters learn in training. `"chunk"`: the adapter query of each chunk's first token learns
            the attention its whole chunk pays to older chunks (mean over the chunk's tokens), since the selection
            made there serves the whole chunk at inference. `"token"`: every token's adapter query learns its own
            attention (relies on attention being consistent within a chunk).
        boundary_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the boundary BCE next to the attention-distillation KL in the training loss.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal initialisation of the adapter weights.

    Example:

    ```python
    >>> from hf_efficient.models import ChunkLLMConfig
    >>> from transformers import LlamaConfig
    >>> config = ChunkLLMConfig(backbone_config=LlamaConfig(num_hidden_layers=2).to_dict(), top_k_chunks=4)
    ```
    """

    model_type = "chunkllm"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")
    }

    backbone_config: dict | PreTrainedConfig | None = None
    base_model_name_or_path: str | None = None
    adapter_dim: int = 32
    boundary_hidden_size: int = 64
    top_k_chunks: int = 8
    local_chunks: int = 4
    sink_tokens: int = 4
    boundary_threshold: float = 0.5
    prefill_block_size: int = 512
    distillation_target: str = "chunk"
    boundary_loss_weight: float = 1.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        legacy = kwargs.pop("backbone_name_or_path", None)  # the field's name in configs saved before adapters-only
        if self.base_model_name_or_path is None:
            self.base_model_name_or_path = legacy
        super().__post_init__(**kwargs)
        for name in ("adapter_dim", "boundary_hidden_size", "top_k_chunks", "prefill_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        for name in ("sink_tokens", "local_chunks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.distillation_target not in DISTILLATION_TARGETS:
            raise ValueError(f"distillation_target={self.distillation_target} is not one of {DISTILLATION_TARGETS}")
        if not 0.0 < self.boundary_threshold < 1.0:
            raise ValueError(f"boundary_threshold={self.boundary_threshold} must lie strictly between 0 and 1")


__all__ = ["ChunkLLMConfig"]
