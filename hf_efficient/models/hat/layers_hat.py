"""HAT building blocks: a Llama-layer stack with a row-indexed cache, and the cross-attention used to pool words
and to let bytes read the preceding words' backbone outputs.

The RMSNorms and MLP activations are modules marked with `use_kernel_forward_from_hub`, so `kernels.kernelize` (or
`hf_efficient.kernelize`) can swap their forward for a hub kernel; without the optional `kernels` package they are
plain PyTorch layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
)

from .cache_argument import cache_kwarg
from .cache_slots import KVSlots, put_rows, take_rows
from .configuration_hat import HATConfig

try:
    from kernels import use_kernel_forward_from_hub
except ImportError:  # `kernels` is optional (and absent from most remote-code environments): plain PyTorch layers

    def use_kernel_forward_from_hub(layer_name: str):
        return lambda cls: cls


__all__ = [
    "HATCrossAttention",
    "HATRMSNorm",
    "HATSiLU",
    "HATStack",
    "HATStackCache",
    "attention_bias",
    "marked_llama_layer",
]


@use_kernel_forward_from_hub("RMSNorm")
class HATRMSNorm(LlamaRMSNorm):
    """`LlamaRMSNorm` (same weight, same forward) marked for the `RMSNorm` hub kernels."""


@use_kernel_forward_from_hub("SiLU")
class HATSiLU(nn.SiLU):
    """`nn.SiLU` marked for the `SiLU` hub kernels (which expect a contiguous input, as the MLP's gate is)."""


def marked_llama_layer(llama: LlamaConfig, layer_idx: int) -> LlamaDecoderLayer:
    """A `LlamaDecoderLayer` whose RMSNorms and MLP activation are the marked classes above (same parameters and
    outputs): transformers marks its own only with the `kernels` releases its integration accepts."""
    layer = LlamaDecoderLayer(llama, layer_idx=layer_idx)
    layer.input_layernorm = HATRMSNorm(llama.hidden_size, eps=llama.rms_norm_eps)
    layer.post_attention_layernorm = HATRMSNorm(llama.hidden_size, eps=llama.rms_norm_eps)
    if llama.hidden_act == "silu":
        layer.mlp.act_fn = HATSiLU()
    return layer


def attention_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (0 where `allowed`, the dtype minimum elsewhere) with a head axis: (B, q, S) -> (B, 1, q, S)."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def llama_config(config: HATConfig, backbone: bool) -> LlamaConfig:
    """`LlamaConfig` of the byte layers (`backbone=False`) or of the word-level backbone."""
    prefix = "backbone_" if backbone else ""
    llama = LlamaConfig(
        vocab_size=1,
        hidden_size=getattr(config, f"{prefix}hidden_size"),
        intermediate_size=getattr(config, f"{prefix}intermediate_size"),
        num_hidden_layers=1,
        num_attention_heads=getattr(config, f"{prefix}num_attention_heads"),
        num_key_value_heads=config.backbone_num_key_value_heads if backbone else config.num_attention_heads,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    llama._attn_implementation = config._attn_implementation or "sdpa"
    return llama


class HATStackCache:
    """The stack's KV for the full batch (`KVSlots`, compact per-row slots) and the items seen per row (`count`)."""

    def __init__(self, stack: HATStack, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        attn = stack.layers[0].self_attn
        heads, head_dim = attn.config.num_key_value_heads, attn.head_dim
        self.kv = KVSlots(len(stack.layers), batch_size, heads, head_dim, device, dtype)
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.kv.apply_(fn)
        self.count = fn(self.count)


class HATStack(nn.Module):
    """Llama decoder layers over a padded sequence (one contiguous run of valid items per row) + final RMSNorm.

    Args:
        config ([`HATConfig`]): model configuration.
        num_layers (`int`): number of layers.
        backbone (`bool`): word-level backbone (global attention) or byte layers (sliding window).
    """

    def __init__(self, config: HATConfig, num_layers: int, backbone: bool) -> None:
        super().__init__()
        llama = llama_config(config, backbone)
        self.window = None if backbone else config.sliding_window
        self.layers = nn.ModuleList(marked_llama_layer(llama, i) for i in range(num_layers))
        self.rotary_emb = LlamaRotaryEmbedding(llama)
        self.norm = HATRMSNorm(llama.hidden_size, eps=config.rms_norm_eps)

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> HATStackCache:
        return HATStackCache(self, batch_size, device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor,
        cache: HATStackCache | None = None,
        rows: torch.Tensor | None = None,
        interleave: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B', L, D) new items of rows `rows` (all if `None`), valid (B', L) -> (B', L, D).

        `interleave(i, x)` runs before layer i (the decoder's cross-attention).
        """
        count = take_rows(cache.count, rows) if cache is not None else valid.new_zeros(valid.shape[0]).long()
        q_pos = torch.where(valid, count[:, None] + valid.long().cumsum(1) - 1, -1)  # (B', L)
        k_pos = q_pos
        if cache is not None:
            k_pos, flat, size = cache.kv.place(rows, count, valid, q_pos)  # (B', S): slot i holds position i
        qp, kp = q_pos[:, :, None], k_pos[:, None, :]
        allowed = (kp >= 0) & (kp <= qp)
        if self.window is not None:
            allowed = allowed & (qp - kp < self.window)
        bias, rope = attention_bias(allowed, x.dtype), self.rotary_emb(x, q_pos.clamp(min=0))
        for i, layer in enumerate(self.layers):
            if interleave is not None:
                x = interleave(i, x)
            kv = cache.kv.layer_cache(i, rows, flat, size) if cache is not None else None
            x = layer(x, attention_mask=bias, position_embeddings=rope, **cache_kwarg(kv))
        if cache is not None:
            cache.count = put_rows(cache.count, rows, count + valid.sum(1))
        return self.norm(x)


class HATCrossAttention(nn.Module):
    """Multi-head cross-attention `queries (B, q, D) -> memory (B, S, D_kv)` through the attention interface."""

    def __init__(self, config: HATConfig, memory_size: int) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(memory_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(memory_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, D_kv) -> keys, values (B, H, S, D_h)."""
        shape = (*memory.shape[:2], self.num_heads, self.head_dim)
        return self.k_proj(memory).view(shape).transpose(1, 2), self.v_proj(memory).view(shape).transpose(1, 2)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """queries (B, q, D), keys/values (B, H, S, D_h), bias (B, 1, q, S) -> (B, q, D)."""
        q = self.q_proj(queries).view(*queries.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention(self, q, keys, values, bias, dropout=0.0, scaling=self.scaling)  # (B, q, H, D_h)
        return self.o_proj(out.reshape(*queries.shape[:2], -1))
