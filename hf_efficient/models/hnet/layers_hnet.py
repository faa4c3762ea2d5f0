"""H-Net building blocks: the parallel linear scan, the gated recurrent block and the block stack ("Isotropic").

Every stack runs on a padded batch whose valid positions form ONE contiguous run per row (left padding for the
byte prompt, right padding for chunk sequences), with an optional per-stack cache indexed by absolute batch rows
so that an inner stage can step only the rows that closed a chunk (gather -> step -> scatter).

The RMSNorms, the MLP activations and the EMA scan are modules marked with `use_kernel_forward_from_hub`, so
`kernels.kernelize` (or `hf_efficient.kernelize`) can swap their forward for a hub kernel; without the optional
`kernels` package they are plain PyTorch layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from .cache_argument import cache_kwarg
from .cache_slots import KVSlots, put_rows, take_rows
from .configuration_hnet import HNetConfig

try:
    from kernels import use_kernel_forward_from_hub
except ImportError:  # `kernels` is optional (and absent from most remote-code environments): plain PyTorch layers

    def use_kernel_forward_from_hub(layer_name: str):
        return lambda cls: cls


__all__ = [
    "HNetEMAScan",
    "HNetRMSNorm",
    "HNetRecurrentBlock",
    "HNetSiLU",
    "HNetStack",
    "HNetStackCache",
    "linear_scan",
    "marked_llama_layer",
]


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Inclusive scan of `h_t = a_t * h_{t-1} + b_t` in log2(L) parallel steps (Hillis-Steele).

    Args:
        a (`torch.Tensor` of shape `(B, L, C)` or `(B, L, 1)`): decay in [0, 1].
        b (`torch.Tensor` of shape `(B, L, C)`): input.
        h0 (`torch.Tensor` of shape `(B, C)`, *optional*): state before position 0 (zeros if `None`).

    Returns:
        `torch.Tensor` of shape `(B, L, C)`: every `h_t`.
    """
    shift, length = 1, b.shape[1]
    if h0 is not None and length > 0:
        first = b[:, :1] + a[:, :1] * h0[:, None]
        b = first if length == 1 else torch.cat([first, b[:, 1:]], dim=1)
    while shift < length:
        # compose element t with element t - shift: (a, b)_t <- (a_t a_{t-s}, a_t b_{t-s} + b_t)
        b = torch.cat([b[:, :shift], b[:, shift:] + a[:, shift:] * b[:, :-shift]], dim=1)
        a = torch.cat([a[:, :shift], a[:, shift:] * a[:, :-shift]], dim=1)
        shift *= 2
    return b


@use_kernel_forward_from_hub("EMAScan")
class HNetEMAScan(nn.Module):
    """`linear_scan` as a layer: the EMA `h_t = a_t h_{t-1} + b_t` of the recurrent blocks and of de-chunking.

    Kernel: `EMAScan` (hf_efficient's `ema-scan`, bit-for-bit equal, fewer allocations).
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        """a (B, L, C) or (B, L, 1), b (B, L, C), h0 (B, C) or `None` -> every h_t (B, L, C)."""
        return linear_scan(a, b, h0)


@use_kernel_forward_from_hub("RMSNorm")
class HNetRMSNorm(LlamaRMSNorm):
    """`LlamaRMSNorm` (same weight, same forward) marked for the `RMSNorm` hub kernels."""


@use_kernel_forward_from_hub("SiLU")
class HNetSiLU(nn.SiLU):
    """`nn.SiLU` marked for the `SiLU` hub kernels (which expect a contiguous input, as the MLP's gate is)."""


def marked_llama_layer(llama: LlamaConfig, layer_idx: int) -> LlamaDecoderLayer:
    """A `LlamaDecoderLayer` whose RMSNorms and MLP activation are the marked classes above (same parameters and
    outputs): transformers marks its own only with the `kernels` releases its integration accepts."""
    layer = LlamaDecoderLayer(llama, layer_idx=layer_idx)
    layer.input_layernorm = HNetRMSNorm(llama.hidden_size, eps=llama.rms_norm_eps)
    layer.post_attention_layernorm = HNetRMSNorm(llama.hidden_size, eps=llama.rms_norm_eps)
    if llama.hidden_act == "silu":
        layer.mlp.act_fn = HNetSiLU()
    return layer


def last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    """Index of the last `True` per row of `valid` (B, L), or -1 for rows without any."""
    idx = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    return torch.where(valid, idx, -1).amax(dim=1) if valid.shape[1] else valid.new_full((valid.shape[0],), -1).long()


def attention_bias(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask from logical positions (-1 = empty slot): causal, windowed, padding-aware.

    Args:
        q_pos (`torch.Tensor` of shape `(B, q)`), k_pos (`torch.Tensor` of shape `(B, S)`): positions.
        window (`int`, *optional*): a query sees keys with `q_pos - k_pos < window`.

    Returns:
        `torch.Tensor` of shape `(B, 1, q, S)`: 0 where attention is allowed, the dtype minimum elsewhere.
    """
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]  # (B, 1, q, 1), (B, 1, 1, S)
    allowed = (kp >= 0) & (kp <= qp)
    if window is not None:
        allowed = allowed & (qp - kp < window)
    return torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device).masked_fill(~allowed, torch.finfo(dtype).min)


def stage_llama_config(config: HNetConfig, stage: int) -> LlamaConfig:
    """The `LlamaConfig` that builds the attention layers (and MLPs) of one stage."""
    llama = LlamaConfig(
        vocab_size=1,
        hidden_size=config.hidden_size[stage],
        intermediate_size=max(config.intermediate_size[stage], 1),
        num_hidden_layers=1,
        num_attention_heads=config.num_attention_heads[stage],
        num_key_value_heads=config.num_key_value_heads[stage],
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    llama._attn_implementation = config._attn_implementation or "sdpa"
    return llama


class HNetStackCache:
    """Per-stack generation state for the full batch: the attention layers' KV (`KVSlots`, compact per-row slots),
    conv/recurrent state per recurrent layer and the number of valid items seen per row (`count`)."""

    def __init__(self, stack: HNetStack, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attention_layer: dict[int, int] = {}  # block index -> layer of `kv`
        for i, block in enumerate(stack.layers):
            if isinstance(block, HNetRecurrentBlock):
                self.states[i] = block.initial_state(batch_size, device, dtype)
            else:
                self.attention_layer[i] = len(self.attention_layer)
        self.kv = None
        if self.attention_layer:
            attn = stack.layers[next(iter(self.attention_layer))].self_attn
            heads, head_dim = attn.config.num_key_value_heads, attn.head_dim
            self.kv = KVSlots(len(self.attention_layer), batch_size, heads, head_dim, device, dtype)

    def apply_(self, fn) -> None:
        """Replace every state tensor `t` by `fn(t)` (batch reordering, selection, repetition, device moves)."""
        self.count = fn(self.count)
        if self.kv is not None:
            self.kv.apply_(fn)
        self.states = {i: tuple(fn(t) for t in s) for i, s in self.states.items()}


class HNetRecurrentBlock(nn.Module):
    """Gated linear recurrence with a short causal convolution (a Mamba-style block without selective B/C):

    `u = SiLU(conv(W_u x))`, `a = sigmoid(W_a x + bias)`, `h_t = a_t h_{t-1} + (1 - a_t) u_t`,
    `y = W_o (h * SiLU(W_g x))`; pre-norm residual, plus a SwiGLU MLP for `M` blocks. Trains with `linear_scan`
    and steps with an O(1) state `(conv window, h)`, so it runs anywhere PyTorch does.
    """

    def __init__(self, config: HNetConfig, stage: int, with_mlp: bool) -> None:
        super().__init__()
        d = config.hidden_size[stage]
        self.channels = config.recurrent_expand * d
        self.kernel = config.conv_kernel
        self.norm = HNetRMSNorm(d, eps=config.rms_norm_eps)
        self.in_proj = nn.Linear(d, 3 * self.channels, bias=False)
        self.conv = nn.Conv1d(self.channels, self.channels, self.kernel, groups=self.channels)
        self.decay_bias = nn.Parameter(torch.zeros(self.channels))
        self.out_proj = nn.Linear(self.channels, d, bias=False)
        self.scan = HNetEMAScan()
        llama = stage_llama_config(config, stage)
        self.mlp = LlamaMLP(llama) if with_mlp else None
        if self.mlp is not None and llama.hidden_act == "silu":
            self.mlp.act_fn = HNetSiLU()
        self.mlp_norm = HNetRMSNorm(d, eps=config.rms_norm_eps) if with_mlp else None

    def initial_state(self, batch_size: int, device: torch.device, dtype: torch.dtype):
        conv = torch.zeros(batch_size, self.channels, self.kernel - 1, device=device, dtype=dtype)  # (B, C, K-1)
        return conv, torch.zeros(batch_size, self.channels, device=device, dtype=dtype)  # (B, C)

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, L, D), valid (B, L) -> (B, L, D) and the state after the last valid position."""
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        conv_state, h0 = state
        u, gate, a_raw = self.in_proj(self.norm(x)).chunk(3, dim=-1)  # 3 x (B, L, C)
        mask = valid[..., None]
        seq = torch.cat([conv_state, (u * mask).transpose(1, 2)], dim=2)  # (B, C, K-1+L)
        # the next conv window = the K-1 inputs ending at the last valid position (old window if none)
        if x.shape[1] == 1:  # decoding step: a dot product with the kernel is much cheaper than conv1d
            conv = (seq * self.conv.weight[:, 0]).sum(-1, keepdim=True) + self.conv.bias[:, None]  # (B, C, 1)
            new_conv = torch.where(valid[:, :, None], seq[..., 1:], conv_state)  # (B, C, K-1)
        else:
            conv = F.conv1d(seq, self.conv.weight, self.conv.bias, groups=self.channels)  # (B, C, L)
            window = last_valid_index(valid)[:, None] + 1 + torch.arange(self.kernel - 1, device=x.device)
            new_conv = seq.gather(2, window[:, None, :].expand(-1, self.channels, -1))  # (B, C, K-1)
        u = F.silu(conv).transpose(1, 2)
        a = torch.sigmoid(a_raw + self.decay_bias)  # (B, L, C)
        b = torch.where(mask, (1 - a) * u, 0.0)
        a = torch.where(mask, a, 1.0)  # padding passes the state through unchanged
        h = self.scan(a, b, h0)  # (B, L, C): linear_scan
        x = x + self.out_proj(h * F.silu(gate))
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, (new_conv, h[:, -1] if h.shape[1] else h0)


class HNetStack(nn.Module):
    """A stack of blocks from a layout string (`T` Llama layer, `m`/`M` recurrent) followed by an RMSNorm.

    Args:
        config ([`HNetConfig`]): model configuration.
        stage (`int`): stage index (width, heads and window come from the per-stage lists).
        blocks (`list[str]`): expanded layout, e.g. `["T", "m", "m"]`.
    """

    def __init__(self, config: HNetConfig, stage: int, blocks: list[str]) -> None:
        super().__init__()
        window = config.sliding_window[stage]
        self.window = None if window is None or window < 0 else window
        llama = stage_llama_config(config, stage)
        self.layers = nn.ModuleList(
            marked_llama_layer(llama, i) if kind == "T" else HNetRecurrentBlock(config, stage, kind == "M")
            for i, kind in enumerate(blocks)
        )
        self.rotary_emb = LlamaRotaryEmbedding(llama) if "T" in blocks else None
        self.norm = HNetRMSNorm(config.hidden_size[stage], eps=config.rms_norm_eps)

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> HNetStackCache:
        return HNetStackCache(self, batch_size, device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor,
        cache: HNetStackCache | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B', L, D) new items of batch rows `rows` (all rows if `None`), valid (B', L) -> (B', L, D)."""
        count = take_rows(cache.count, rows) if cache is not None else valid.new_zeros(valid.shape[0]).long()
        q_pos = torch.where(valid, count[:, None] + valid.long().cumsum(1) - 1, -1)  # (B', L) logical positions
        if self.rotary_emb is not None:
            k_pos = q_pos
            if cache is not None:
                k_pos, flat, size = cache.kv.place(rows, count, valid, q_pos)  # (B', S): slot i holds position i
            bias = attention_bias(q_pos, k_pos, self.window, x.dtype)  # (B', 1, L, S)
            rope = self.rotary_emb(x, q_pos.clamp(min=0))
        for i, block in enumerate(self.layers):
            if isinstance(block, HNetRecurrentBlock):
                state = tuple(take_rows(s, rows) for s in cache.states[i]) if cache is not None else None
                x, new_state = block(x, valid, state)
                if cache is not None:
                    cache.states[i] = tuple(put_rows(s, rows, n) for s, n in zip(cache.states[i], new_state))
                continue
            kv = cache.kv.layer_cache(cache.attention_layer[i], rows, flat, size) if cache is not None else None
            x = block(x, attention_mask=bias, position_embeddings=rope, **cache_kwarg(kv))
        if cache is not None:
            cache.count = put_rows(cache.count, rows, count + valid.sum(1))
        return self.norm(x)
