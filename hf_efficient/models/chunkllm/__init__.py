"""ChunkLLM adapters (flat remote-code folder): config, chunk-selective cache and the causal-LM wrapper."""

from .cache_chunkllm import ChunkLLMCache
from .configuration_chunkllm import ChunkLLMConfig
from .modeling_chunkllm import ChunkLLMForCausalLM

__all__ = ["ChunkLLMCache", "ChunkLLMConfig", "ChunkLLMForCausalLM"]
