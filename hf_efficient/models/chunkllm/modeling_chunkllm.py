"""ChunkLLM: chunk-selection adapters on a frozen rotary decoder, with chunk-selective attention and its cache.

The backbone runs unchanged; only its attention implementation is swapped for `chunkllm_attention_forward`
(registered in `AttentionInterface` and, with the SDPA mask, in `AttentionMaskInterface`). A forward pre-hook on
every backbone attention module feeds the layer's input to its Q/K adapter; the adapter outputs travel to the
attention function through the cache (decoding) or the distillation state (training) passed as keyword arguments.
A backbone handed to `from_backbone` is never altered: the wrapper holds its own module tree (own config, frozen
parameters, hooks and attention setting) over the same weight storage (`share_weights`).
When every query may read all its closed chunks, the attention function calls SDPA with the backbone's own
arguments, so outputs are bit-identical to the backbone's.
Checkpoints hold the adapters only and name their backbone (`base_model_name_or_path`, as PEFT does), which
`from_pretrained` loads (`checkpoint_chunkllm.py`).
"""

import copy
import os
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file, logging

from .backbone_chunkllm import (
    BACKBONE_PREFIX,
    HUB_KWARGS,
    backbone_loading_kwargs,
    check_backbone,
    check_backbone_matches,
    is_adapter_checkpoint,
    load_or_share,
    peft_adapter_base,
    saved_tensor_names,
    weights_name,
)
from .cache_argument import CACHE_ARG, cache_kwarg, either_cache
from .cache_chunkllm import ChunkLLMCache, DecodeSelection
from .configuration_chunkllm import ChunkLLMConfig

logger = logging.get_logger(__name__)

ATTENTION_NAME = "chunkllm"
_MASKED = -1e9  # finite, so queries without closed chunks keep finite gradients


class ChunkLLMDistillation:
    """Training state of one forward pass: teacher-forced chunks from boundary labels and the per-layer KL terms.

    Args:
        boundary_labels (`torch.Tensor` of shape `(B, L)`): 1 where a token closes its chunk.
        local_chunks (`int`, *optional*, defaults to 0): chunks before each query's own that inference always
            keeps; the adapters are distilled only on the older chunks, the ones they choose among.
        target (`str`, *optional*, defaults to `"chunk"`): `"chunk"` distils each chunk's first token on the mean
            attention of its chunk, `"token"` every token on its own (`ChunkLLMConfig.distillation_target`).
    """

    needs_adapter_queries = True

    def __init__(self, boundary_labels: torch.Tensor, local_chunks: int = 0, target: str = "chunk"):
        self.local_chunks, self.target = local_chunks, target
        labels = boundary_labels.long()
        self.chunk_of = labels.cumsum(dim=1) - labels  # (B, L) closed chunks before each token
        num_chunks = int(self.chunk_of.max().item()) + 1
        self.one_hot = F.one_hot(self.chunk_of, num_chunks).float()  # (B, L, C)
        self.adapter_states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.losses: list[torch.Tensor] = []

    def add_layer(self, query: torch.Tensor, key: torch.Tensor, scaling: float, groups: int, layer_idx: int) -> None:
        """KL(teacher || adapters) over the candidate chunks (closed, older than the local window) of every
        distilled query (`target`), averaged over those with >= 2 candidates.

        Args:
            query (`torch.Tensor` of shape `(B, H, L, D)`): backbone queries (after RoPE).
            key (`torch.Tensor` of shape `(B, H_kv, L, D)`): backbone keys (after RoPE).
        """
        adapter_queries, adapter_keys = self.adapter_states.pop(layer_idx)  # (B, H_kv, L, d)
        batch_size, num_kv_heads, length, _ = adapter_keys.shape
        chunk_index = torch.arange(self.one_hot.shape[-1], device=query.device)
        candidates = chunk_index < self.chunk_of[:, :, None] - self.local_chunks  # (B, L, C) the candidates
        with torch.no_grad():
            scores = (query @ repeat_kv(key, groups).transpose(-1, -2)).float() * scaling  # (B, H, L, L)
            causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            probs = probs.view(batch_size, num_kv_heads, groups, length, length).mean(dim=2)  # (B, H_kv, L, L)
            teacher = (probs @ self.one_hot[:, None]) * candidates[:, None]  # (B, H_kv, L, C)
            teacher = teacher / teacher.sum(dim=-1, keepdim=True).clamp(min=1e-9)
        sizes = self.one_hot.sum(dim=1).clamp(min=1)[:, None, :, None]  # (B, 1, C, 1)
        weight = (candidates.sum(dim=-1) >= 2).float()  # (B, L)
        if self.target == "chunk":  # the chunk's mean attention, learnt where the selection is made: its first token
            teacher = self.one_hot[:, None] @ ((self.one_hot.transpose(1, 2)[:, None] @ teacher) / sizes)
            first = F.pad(self.chunk_of[:, 1:] != self.chunk_of[:, :-1], (1, 0), value=True)  # (B, L)
            weight = weight * first.float()
        chunk_keys = (self.one_hot.transpose(1, 2)[:, None] @ adapter_keys) / sizes  # (B, H_kv, C, d)
        logits = (adapter_queries @ chunk_keys.transpose(-1, -2)).masked_fill(~candidates[:, None], _MASKED)
        log_student = logits.log_softmax(dim=-1)  # (B, H_kv, L, C)
        kl = torch.where(teacher > 0, teacher * (teacher.clamp(min=1e-9).log() - log_student), 0.0).sum(dim=-1)
        weight = weight[:, None].expand_as(kl)  # (B, H_kv, L)
        self.losses.append((kl * weight).sum() / weight.sum().clamp(min=1.0))


def chunkllm_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    chunkllm_cache: ChunkLLMCache | None = None,
    chunkllm_distillation: ChunkLLMDistillation | None = None,
    chunkllm_adapters: nn.ModuleList | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Chunk-selective attention (ChunkLLM); plain SDPA when no ChunkLLM state is passed.

    Args:
        query (`torch.Tensor` of shape `(B, H, Lq, D)`), key / value (`torch.Tensor` of shape `(B, H_kv, L, D)`):
            backbone projections after RoPE, keys and values including the cache.
        attention_mask (`torch.Tensor` of shape `(B, 1, Lq, L)`, *optional*): the backbone's causal/padding mask.
        chunkllm_cache (`ChunkLLMCache`, *optional*): chunk state for inference.
        chunkllm_distillation (`ChunkLLMDistillation`, *optional*): collects the distillation loss in training.
        chunkllm_adapters (`nn.ModuleList`, *optional*): the Q/K adapters, read by the pre-attention hook only.

    Returns:
        `(attn_output, None)` with `attn_output` of shape `(B, Lq, H, D)`.
    """
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    dense = (module, query, key, value, attention_mask)
    if chunkllm_distillation is not None:
        chunkllm_distillation.add_layer(query, key, scaling, module.num_key_value_groups, module.layer_idx)
    if chunkllm_cache is None:
        return sdpa_attention_forward(*dense, scaling=scaling, dropout=dropout, **kwargs)

    cache, layer_idx = chunkllm_cache, module.layer_idx
    adapter_queries, adapter_keys = cache.adapter_states.pop(layer_idx)  # (B, H_kv, Lq, d)
    cache.add_adapter_states(layer_idx, adapter_queries, adapter_keys)
    num_kv_heads = key.shape[1]
    if cache.block_dense:
        cache.count(None, num_kv_heads)
        return sdpa_attention_forward(*dense, scaling=scaling, dropout=dropout, **kwargs)
    if query.shape[2] == 1:
        return _decode_attention(cache, layer_idx, query, key, value, attention_mask, scaling)
    return _block_attention(cache, layer_idx, adapter_queries, query, key, value, attention_mask, scaling)


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask == 0  # additive float masks: 0 keeps, -inf drops


def _decode_attention(
    cache: ChunkLLMCache,
    layer_idx: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, None]:
    """One query token: the selected positions and the open chunk, attended per KV head group.

    The selection is fixed inside a chunk, so its keys/values are gathered at the first step after a chunk start
    and kept in the cache; later steps only append the new token (the same values as a fresh gather, without
    re-reading the selected positions every step).
    """
    batch_size, num_heads, _, head_dim = query.shape
    num_kv_heads, length = key.shape[1], key.shape[2]
    selection = cache.decode_kv[layer_idx]
    if selection is not None and selection.length == length - 1:
        new_keep = torch.ones_like(selection.keep[..., :1])  # (B, H_kv, 1)
        if attention_mask is not None:
            new_keep = new_keep & _as_bool(attention_mask[:, 0, -1, -1:]).expand(batch_size, 1)[:, None]
        selection.append(key[:, :, -1:], value[:, :, -1:], new_keep)
    else:
        index, valid = cache.decode_positions(layer_idx)  # (B, H_kv, M)
        tail_start = int(cache.current_start.min().item())
        gather = index[..., None].expand(-1, -1, -1, head_dim)
        keys = torch.cat([key.gather(2, gather), key[:, :, tail_start:]], dim=2)  # (B, H_kv, M + T, D)
        values = torch.cat([value.gather(2, gather), value[:, :, tail_start:]], dim=2)
        tail = torch.arange(tail_start, length, device=key.device) >= cache.current_start[:, None]  # (B, T)
        keep = torch.cat([valid, tail[:, None].expand(-1, num_kv_heads, -1)], dim=-1)  # (B, H_kv, M + T)
        if attention_mask is not None:
            row = _as_bool(attention_mask[:, 0, -1]).expand(batch_size, length)  # (B, L)
            row = row[:, None].expand(-1, num_kv_heads, -1)
            keep = keep & torch.cat([row.gather(2, index), row[..., tail_start:]], dim=-1)
        selection = cache.decode_kv[layer_idx] = DecodeSelection(keys, values, keep, length)
    keys, values, keep = selection.keys, selection.values, selection.keep
    cache.count(keep.sum(), num_kv_heads)
    grouped = query.view(batch_size, num_kv_heads, num_heads // num_kv_heads, head_dim)  # (B, H_kv, G, D)
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=keep[:, :, None], scale=scaling)
    return out.reshape(batch_size, num_heads, 1, head_dim).transpose(1, 2), None  # (B, 1, H, D)


def _block_attention(
    cache: ChunkLLMCache,
    layer_idx: int,
    adapter_queries: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, None]:
    """A block of queries (prefill): the same selection as decoding, expressed as a boolean mask."""
    num_kv_heads, length = key.shape[1], key.shape[2]
    query_length = query.shape[2]
    keep = cache.block_keep_mask(layer_idx, adapter_queries)  # (B, H_kv, Lq, L)
    if attention_mask is None:
        positions = torch.arange(length, device=key.device)
        attention_mask = positions[None, :] <= positions[length - query_length :, None]  # (Lq, L) causal
    keep = keep & _as_bool(attention_mask)
    if bool((cache.block_chunk_of < 0).any()):
        cache.count(torch.count_nonzero(keep & (cache.block_chunk_of >= 0)[:, None, :, None]), num_kv_heads)
    else:
        cache.count(torch.count_nonzero(keep), num_kv_heads)
    # each KV head with its query group as one batch entry: the mask (one per KV head) broadcasts over the group,
    # so neither the mask nor the keys/values are repeated per query head
    batch_size, num_heads, _, head_dim = query.shape
    groups = num_heads // num_kv_heads
    flat = (batch_size * num_kv_heads, groups, query_length, head_dim)
    out = F.scaled_dot_product_attention(
        query.reshape(flat),
        key.reshape(batch_size * num_kv_heads, 1, length, head_dim).expand(-1, groups, -1, -1),
        value.reshape(batch_size * num_kv_heads, 1, length, head_dim).expand(-1, groups, -1, -1),
        attn_mask=keep.reshape(batch_size * num_kv_heads, 1, query_length, length),
        scale=scaling,
    )  # (B * H_kv, G, Lq, D)
    return out.view(batch_size, num_heads, query_length, head_dim).transpose(1, 2), None


AttentionInterface.register(ATTENTION_NAME, chunkllm_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # without it the causal mask is silently None


class ChunkLLMQKAdapter(nn.Module):
    """Q/K adapter of one layer: small projections of the attention input, used only to score chunks."""

    def __init__(self, config: ChunkLLMConfig, layer_idx: int):
        super().__init__()
        backbone = config.backbone_config
        self.layer_idx = layer_idx
        self.num_key_value_heads = backbone.num_key_value_heads
        self.adapter_dim = config.adapter_dim
        width = self.num_key_value_heads * self.adapter_dim
        self.q_proj = nn.Linear(backbone.hidden_size, width, bias=False)
        self.k_proj = nn.Linear(backbone.hidden_size, width, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, with_queries: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(B, L, E) -> adapter queries (scaled by 1/sqrt(d); `None` unless `with_queries`) and keys, each
        (B, H_kv, L, d), in float32. Decoding steps inside a chunk need only the keys."""
        hidden_states = hidden_states.to(self.q_proj.weight.dtype)
        shape = (*hidden_states.shape[:-1], self.num_key_value_heads, self.adapter_dim)
        keys = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        if not with_queries:
            return None, keys.float()
        queries = self.q_proj(hidden_states).view(shape).transpose(1, 2) * self.adapter_dim**-0.5
        return queries.float(), keys.float()


class ChunkLLMBoundaryAdapter(nn.Module):
    """Chunk-boundary adapter: a one-hidden-layer classifier on the hidden states entering the bottom layer.

    Reading the bottom layer's input (rather than its output) makes every token's boundary known before any
    attention runs, so all layers, the bottom one included, can be chunk-selective and block prefill stays causal.
    """

    def __init__(self, config: ChunkLLMConfig):
        super().__init__()
        hidden_size = config.backbone_config.hidden_size
        self.norm = nn.LayerNorm(hidden_size)
        self.up = nn.Linear(hidden_size, config.boundary_hidden_size)
        self.act = nn.GELU()
        self.out = nn.Linear(config.boundary_hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, E) -> boundary logits (B, L)."""
        hidden_states = self.norm(hidden_states.to(self.up.weight.dtype))
        return self.out(self.act(self.up(hidden_states)))[..., 0].float()


def _run_qk_adapter(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a backbone attention module: adapter outputs of its input, into the ChunkLLM state."""
    state = kwargs.get("chunkllm_cache")
    if state is None:
        state = kwargs.get("chunkllm_distillation")
    if state is not None:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        adapter = kwargs["chunkllm_adapters"][module.layer_idx]
        state.adapter_states[module.layer_idx] = adapter(hidden_states, state.needs_adapter_queries)


def _hook_attention_inputs(backbone: PreTrainedModel) -> None:
    """Install `_run_qk_adapter` once per attention module (several wrappers may share one backbone)."""
    for layer in backbone.base_model.layers:
        if not getattr(layer.self_attn, "_chunkllm_hooked", False):
            layer.self_attn.register_forward_pre_hook(_run_qk_adapter, with_kwargs=True)
            layer.self_attn._chunkllm_hooked = True


class ChunkLLMPreTrainedModel(PreTrainedModel):
    config_class = ChunkLLMConfig
    base_model_prefix = "chunkllm"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_attention_backend = True
    accepts_loss_kwargs = False  # losses are means over tokens of the batch

    def _init_weights(self, module: nn.Module) -> None:
        # only the adapters: the backbone keeps its pretrained weights (its modules are already initialised)
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class ChunkLLMForCausalLM(ChunkLLMPreTrainedModel, GenerationMixin):
    r"""
    A frozen causal LM with ChunkLLM adapters: per-layer Q/K adapters score chunks of the KV cache, a boundary
    adapter on the bottom layer closes chunks, and each attention layer reads only the sink tokens, the current
    chunk, the `local_chunks` chunks before it and the `top_k_chunks` best older chunks per KV head. The selection
    is recomputed only at chunk starts (right after a boundary). `kv_retention` holds the fraction of visible keys
    read by the last call.

    Paper: ChunkLLM: A Lightweight Pluggable Framework for Accelerating LLMs Inference (Ouyang et al., 2025,
    arXiv:2510.02361).

    `save_pretrained` writes the adapters, the config and `base_model_name_or_path` (the backbone's path or Hub
    id), not the backbone; `from_pretrained` (or `AutoModelForCausalLM.from_pretrained(folder,
    trust_remote_code=True)`) loads that backbone and attaches the adapters. `save_pretrained(...,
    adapters_only=False)` writes a self-contained checkpoint, backbone included.

    PEFT: `LoraConfig(target_modules=ChunkLLMForCausalLM.lora_target_modules)` puts LoRA on the adapters' linear
    layers (`qk_adapters.{i}.q_proj`, `qk_adapters.{i}.k_proj`, `boundary_adapter.up`, `boundary_adapter.out`) and
    leaves the backbone, whose attention also has `q_proj` / `k_proj`, alone (`docs/peft.md`).

    Example:

    ```python
    >>> from hf_efficient.models import ChunkLLMForCausalLM
    >>> model = ChunkLLMForCausalLM.from_backbone("path/to/llama", top_k_chunks=8, local_chunks=4)
    >>> out = model.generate(input_ids, max_new_tokens=32)
    >>> model.kv_retention
    0.47
    >>> model.save_pretrained("chunkllm-adapters")  # adapters + config; the backbone stays at path/to/llama
    >>> model = AutoModelForCausalLM.from_pretrained("chunkllm-adapters", trust_remote_code=True)
    ```
    """

    # a regex over full module names (PEFT matches a string with `re.fullmatch`): the adapters' linear layers only
    lora_target_modules: ClassVar[str] = r"(.*\.)?(qk_adapters\.\d+\.(q_proj|k_proj)|boundary_adapter\.(up|out))"

    def __init__(self, config: ChunkLLMConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        if backbone is None:
            backbone = AutoModelForCausalLM.from_config(config.backbone_config)
        check_backbone(backbone)
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.backbone.set_attn_implementation(ATTENTION_NAME)
        self.boundary_adapter = ChunkLLMBoundaryAdapter(config)
        num_layers = config.backbone_config.num_hidden_layers
        self.qk_adapters = nn.ModuleList([ChunkLLMQKAdapter(config, layer_idx) for layer_idx in range(num_layers)])
        _hook_attention_inputs(self.backbone)
        self.kv_retention = 1.0
        self.post_init()

    @classmethod
    def from_backbone(
        cls,
        backbone_or_path: PreTrainedModel | str | os.PathLike,
        *,
        top_k_chunks: int = 8,
        sink_tokens: int = 4,
        backbone_kwargs: dict | None = None,
        **config_kwargs,
    ) -> "ChunkLLMForCausalLM":
        r"""
        Wrap a causal LM (or load one) with fresh ChunkLLM adapters; the backbone is frozen.

        A model passed in is left as it was (its config, attention implementation, `requires_grad` flags and modules):
        the wrapper runs a copy of its module tree over the same weight storage (`share_weights`), so plain and
        speculative generation on the original keep working, and no weight is duplicated.

        Args:
            backbone_or_path (`PreTrainedModel` or `str`): the backbone, or where `AutoModelForCausalLM` loads it.
            top_k_chunks (`int`, *optional*, defaults to 8): older closed chunks selected per KV head.
            sink_tokens (`int`, *optional*, defaults to 4): first tokens always attended.
            backbone_kwargs (`dict`, *optional*): `from_pretrained` arguments for the backbone, e.g.
                `{"quantization_config": BitsAndBytesConfig(load_in_4bit=True)}`.
            **config_kwargs: other [`ChunkLLMConfig`] fields (`local_chunks`, `adapter_dim`, ...).
        """
        backbone, name_or_path = load_or_share(backbone_or_path, backbone_kwargs or {})
        check_backbone(backbone)
        backbone_config = backbone.config.to_dict()
        backbone_config.pop("quantization_config", None)  # the saved wrapper holds plain weights
        config = ChunkLLMConfig(
            backbone_config=backbone_config,
            base_model_name_or_path=name_or_path,
            top_k_chunks=top_k_chunks,
            sink_tokens=sink_tokens,
            bos_token_id=backbone.config.bos_token_id,
            eos_token_id=backbone.config.eos_token_id,
            pad_token_id=backbone.config.pad_token_id,
            **config_kwargs,
        )
        model = cls(config, backbone=backbone)
        model.generation_config = copy.deepcopy(backbone.generation_config)
        model._adapters_to_backbone_device()
        return model

    def _adapters_to_backbone_device(self, dtype: torch.dtype | None = None) -> None:
        device = self.backbone.get_input_embeddings().weight.device
        self.boundary_adapter.to(device, dtype)  # only the adapters move: a quantized backbone refuses `.to`
        self.qk_adapters.to(device, dtype)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters' weights, what `save_pretrained` writes: every `state_dict()` entry outside the backbone."""
        return {name: tensor for name, tensor in self.state_dict().items() if not name.startswith(BACKBONE_PREFIX)}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        *,
        adapters_only: bool = True,
        **kwargs,
    ) -> None:
        r"""
        Save the adapters, the config (with `base_model_name_or_path`) and the remote code; the backbone is not
        written, so the checkpoint is the size of the adapters. All other arguments are `PreTrainedModel`'s
        (`push_to_hub`, `max_shard_size`, ...); `Trainer` checkpoints are adapter checkpoints too.

        Args:
            save_directory (`str` or `os.PathLike`): the folder to write.
            adapters_only (`bool`, *optional*, defaults to `True`): `False` also writes the backbone's weights, a
                self-contained checkpoint the size of the backbone (refused for a quantized backbone: save it with its
                own `save_pretrained` and point `base_model_name_or_path` at it).
        """
        if adapters_only:
            state_dict = self.state_dict() if state_dict is None else state_dict
            state_dict = {name: value for name, value in state_dict.items() if not name.startswith(BACKBONE_PREFIX)}
            if self.config.base_model_name_or_path is None and is_main_process:
                logger.warning(
                    "config.base_model_name_or_path is None (the backbone was built in memory): the checkpoint holds "
                    "the adapters only, so loading it needs `from_pretrained(path, backbone=...)`; set "
                    "`config.base_model_name_or_path` to where the backbone is saved, or save with adapters_only=False"
                )
        elif getattr(self.backbone, "hf_quantizer", None) is not None:
            raise ValueError(
                "adapters_only=False cannot write a quantized backbone inside the ChunkLLM checkpoint: save the "
                "adapters (the default) and keep the backbone where config.base_model_name_or_path points"
            )
        super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        backbone: PreTrainedModel | str | os.PathLike | None = None,
        backbone_kwargs: dict | None = None,
        **kwargs,
    ) -> "ChunkLLMForCausalLM":
        r"""
        Load a saved ChunkLLM. An adapter checkpoint (what `save_pretrained` writes by default) loads its backbone
        from `config.base_model_name_or_path` (offline when that is a local folder) and attaches the adapters; a
        checkpoint saved with `adapters_only=False` loads as any model does.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): the checkpoint's folder or Hub id.
            backbone (`PreTrainedModel` or `str`, *optional*): the backbone to attach the adapters to instead of the
                one the config names (e.g. a local copy of it); a model passed in is left as it was (`from_backbone`).
            backbone_kwargs (`dict`, *optional*): `from_pretrained` arguments for the backbone only.
            kwargs: [`ChunkLLMConfig`] fields (e.g. `top_k_chunks=16`) override the saved ones; `revision` and
                `subfolder` locate the checkpoint; every other argument (`dtype`, `device_map`, `token`,
                `quantization_config=BitsAndBytesConfig(load_in_4bit=True)`, ...) goes to the backbone's
                `from_pretrained`. The adapters keep the dtype they were saved in.
        """
        # a PEFT adapter (LoRA on the ChunkLLM adapters): the Auto classes name it in `adapter_kwargs`, a direct call
        # gets its folder; it goes onto its base once that is loaded
        peft_kwargs = dict(kwargs.get("adapter_kwargs") or {})
        checkpoint, peft_path = pretrained_model_name_or_path, peft_kwargs.pop("_adapter_model_path", None)
        if peft_path is None and (base := peft_adapter_base(pretrained_model_name_or_path, **kwargs)) is not None:
            checkpoint, peft_path = base, pretrained_model_name_or_path
        if is_adapter_checkpoint(saved_tensor_names(checkpoint, kwargs.get("variant"), **kwargs)):
            model = cls._from_adapter_checkpoint(checkpoint, backbone, backbone_kwargs, kwargs)
            if peft_path is not None:
                if "token" in kwargs:
                    peft_kwargs.setdefault("token", kwargs["token"])
                name = kwargs.get("adapter_name", "default")
                (model[0] if isinstance(model, tuple) else model).load_adapter(
                    peft_path, adapter_name=name, adapter_kwargs=peft_kwargs
                )
            return model
        if backbone is not None or backbone_kwargs is not None:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds its backbone (saved with adapters_only=False): drop "
                "`backbone` and `backbone_kwargs`, or save the model again with adapters only"
            )
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def _from_adapter_checkpoint(
        cls, path: str | os.PathLike, backbone, backbone_kwargs: dict | None, kwargs: dict
    ) -> "ChunkLLMForCausalLM":
        """Load the backbone the checkpoint names (or `backbone`), then the adapters' weights into a fresh wrapper."""
        from safetensors.torch import load_file

        kwargs = dict(kwargs)
        config, output_loading_info = kwargs.pop("config", None), kwargs.pop("output_loading_info", False)
        hub_kwargs = {name: kwargs[name] for name in HUB_KWARGS if name in kwargs}
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in ChunkLLMConfig.__annotations__}
        if not isinstance(config, PreTrainedConfig):
            config = ChunkLLMConfig.from_pretrained(config if config is not None else path, **hub_kwargs)
        # a copy (validated again when fields change): the caller's config object is left as it was
        config = ChunkLLMConfig.from_dict({**config.to_dict(), **overrides}) if overrides else copy.deepcopy(config)
        config.name_or_path = str(path)
        source = backbone if backbone is not None else config.base_model_name_or_path
        if source is None:
            raise ValueError(
                f"{path} holds ChunkLLM adapters only and names no backbone (config.base_model_name_or_path is None): "
                "pass `backbone=` (the model the adapters were trained on, or its path)"
            )
        loading = {**backbone_loading_kwargs(kwargs), **(backbone_kwargs or {})}
        loaded, name_or_path = load_or_share(source, loading)
        check_backbone(loaded)
        check_backbone_matches(config.backbone_config, loaded, str(name_or_path or type(loaded).__name__))
        if backbone is not None and name_or_path is not None:
            config.base_model_name_or_path = name_or_path  # re-saving points at the backbone actually used

        model = cls(config, backbone=loaded)
        state = load_file(cached_file(path, weights_name(kwargs.get("variant")), **hub_kwargs))
        model._adapters_to_backbone_device(next(iter(state.values())).dtype if state else None)  # the saved dtype
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [name for name in missing if not name.startswith(BACKBONE_PREFIX)]
        if missing or unexpected:
            raise ValueError(
                f"{path} does not hold the adapters of this ChunkLLMConfig: missing {missing}, unexpected {unexpected}"
            )
        try:
            model.generation_config = GenerationConfig.from_pretrained(path, **hub_kwargs)
        except OSError:  # saved without one: the backbone's
            model.generation_config = copy.deepcopy(loaded.generation_config)
        model.eval()
        if output_loading_info:
            return model, {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
        return model

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def new_cache(self) -> ChunkLLMCache:
        """An empty [`ChunkLLMCache`] sized for the backbone."""
        config = self.config
        return ChunkLLMCache(
            config.backbone_config.num_hidden_layers, config.top_k_chunks, config.sink_tokens, config.local_chunks
        )

    def boundary_probabilities(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Probability that each token closes its chunk, `(B, L)`."""
        return self.boundary_adapter(self.get_input_embeddings()(input_ids)).sigmoid()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        if model_kwargs.get(CACHE_ARG) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_ARG] = self.new_cache()
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: ChunkLLMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        boundary_labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: ChunkLLMCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): token ids (or `inputs_embeds` of shape `(B, L, E)`).
            attention_mask (`torch.Tensor` of shape `(B, past + L)`, *optional*): 1 for real tokens (left padding).
            cache (`ChunkLLMCache`, *optional*): created when absent (see `new_cache`); `past_key_values` is its
                name before transformers 5.24 (either works).
            labels (`torch.LongTensor` of shape `(B, L)`, *optional*): next-token targets for the LM loss.
            boundary_labels (`torch.Tensor` of shape `(B, L)`, *optional*): training mode. 1 where a token closes a
                chunk (rule labels); the loss is then the attention-distillation KL of the Q/K adapters plus
                `boundary_loss_weight` times the boundary BCE, with full attention in the backbone.
            logits_to_keep (`int`, *optional*, defaults to 0): keep the logits of the last tokens only (0 = all).
        """
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, L, E)
        boundary_logits = self.boundary_adapter(inputs_embeds)  # (B, L)
        if boundary_labels is not None:
            return self._distillation_forward(inputs_embeds, boundary_logits, boundary_labels, **kwargs)
        cache = either_cache(cache, past_key_values)
        if cache is None:
            cache = self.new_cache()
        elif not isinstance(cache, ChunkLLMCache):
            raise ValueError(f"cache={type(cache).__name__} is not a ChunkLLMCache; pass None or `model.new_cache()`.")
        length = inputs_embeds.shape[1]
        real = torch.ones_like(boundary_logits, dtype=torch.bool)
        if attention_mask is not None:
            real = attention_mask[:, -length:].bool()
        fires = boundary_logits > torch.logit(torch.tensor(self.config.boundary_threshold)).item()

        block, logits = self.config.prefill_block_size, []
        for start in range(0, length, block):
            end = min(start + block, length)
            cache.begin_block(fires[:, start:end], real[:, start:end])
            mask = None if attention_mask is None else attention_mask[:, : attention_mask.shape[1] - length + end]
            outputs = self.backbone(
                inputs_embeds=inputs_embeds[:, start:end],
                attention_mask=mask,
                position_ids=None if position_ids is None else position_ids[:, start:end],
                use_cache=True,
                logits_to_keep=logits_to_keep if end == length or logits_to_keep == 0 else 1,
                chunkllm_cache=cache,
                chunkllm_adapters=self.qk_adapters,
                **cache_kwarg(cache),
                **kwargs,
            )
            if end == length or logits_to_keep == 0:
                logits.append(outputs.logits)
        logits = torch.cat(logits, dim=1)  # (B, L or logits_to_keep, V)
        self.kv_retention = cache.kv_retention

        loss = None
        if labels is not None:
            shifted = labels[:, 1:].reshape(-1).to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted, ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_kwarg(cache if use_cache else None))

    def _distillation_forward(
        self, inputs_embeds: torch.Tensor, boundary_logits: torch.Tensor, boundary_labels: torch.Tensor, **kwargs
    ) -> CausalLMOutputWithPast:
        """Backbone with full attention; loss = mean KL over layers + boundary_loss_weight * BCE."""
        kwargs.pop("num_items_in_batch", None)
        distillation = ChunkLLMDistillation(boundary_labels, self.config.local_chunks, self.config.distillation_target)
        self.backbone(
            inputs_embeds=inputs_embeds,
            use_cache=False,
            chunkllm_distillation=distillation,
            chunkllm_adapters=self.qk_adapters,
            **kwargs,
        )
        kl = torch.stack(distillation.losses).mean()
        bce = F.binary_cross_entropy_with_logits(boundary_logits, boundary_labels.float())
        loss = kl + self.config.boundary_loss_weight * bce
        return CausalLMOutputWithPast(loss=loss, logits=boundary_logits[..., None])


ChunkLLMConfig.register_for_auto_class()
ChunkLLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["ChunkLLMCache", "ChunkLLMForCausalLM", "ChunkLLMPreTrainedModel", "chunkllm_attention_forward"]
