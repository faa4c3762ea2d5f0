"""HAT: hierarchical autoregressive transformer over bytes and words (remote code: imports nothing from
`hf_efficient`).

Paper: HAT, "Hierarchical Autoregressive Transformers: Combining Byte- and Word-Level Processing for Robust,
Adaptable Language Models" (Neitemeier et al., 2025, arXiv:2501.10322).

Bytes -> byte encoder (Llama layers, sliding window) -> rule-based word split -> one learned query per word
cross-attends to that word's bytes -> word-level Llama backbone -> byte decoder (cross-attention to the
preceding words' backbone outputs + Llama layers) -> next byte. Generation runs the encoder and decoder on every
byte and the backbone only on the rows whose byte closed a word (`HATCache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache_argument import cache_kwarg, either_cache
from .cache_hat import HATCache, HATState
from .cache_slots import filled_positions, put_rows, take_rows
from .configuration_hat import HATConfig
from .layers_hat import HATCrossAttention, HATRMSNorm, HATStack, attention_bias
from .splitter_hat import word_starts

__all__ = ["HATCache", "HATCausalLMOutput", "HATForCausalLM", "HATPreTrainedModel"]


@dataclass
class HATCausalLMOutput(CausalLMOutputWithPast):
    r"""
    word_starts (`torch.BoolTensor` of shape `(B, L)`, *optional*): first byte of every word, with
        `output_boundaries=True`.
    compression (`tuple[float]`, *optional*): bytes per word of the batch.
    """

    word_starts: torch.BoolTensor | None = None
    compression: tuple[float, ...] | None = None


class HATPreTrainedModel(PreTrainedModel):
    config_class = HATConfig
    config: HATConfig
    base_model_prefix = "hat"
    _no_split_modules: ClassVar[list[str]] = ["LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False) -> None:
        super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)
        for module in self.modules():  # the Llama layers read per-stack LlamaConfigs built from ours
            if isinstance(getattr(module, "config", None), LlamaConfig):
                module.config._attn_implementation = self.config._attn_implementation

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HATForCausalLM):
            init.normal_(module.word_query, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.start_memory, mean=0.0, std=self.config.initializer_range)


class HATForCausalLM(HATPreTrainedModel, GenerationMixin):
    r"""
    HAT causal LM over UTF-8 bytes (use with `ByteTokenizer`); batched cached generation through `generate`.

    Paper: HAT (Neitemeier et al., 2025, arXiv:2501.10322).

    Example:

    ```python
    >>> from hf_efficient.models import ByteTokenizer, HATConfig, HATForCausalLM
    >>> model, tok = HATForCausalLM(HATConfig()), ByteTokenizer()
    >>> batch = tok(["Hello there", "def f("], padding=True, padding_side="left", return_tensors="pt")
    >>> out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    ```

    PEFT: `LoraConfig(target_modules=HATForCausalLM.lora_target_modules)` puts LoRA on the attention (`q_proj`,
    `k_proj`, `v_proj`, `o_proj`) and MLP (`gate_proj`, `up_proj`, `down_proj`) layers of the byte encoder, the word
    backbone and the byte decoder, and on the word pooler and the decoder's cross-attention (their projections
    have the same names); `word_in` / `word_out` can be added. `lm_head` is tied to the byte embeddings
    (`docs/peft.md`).
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "embeddings.weight"}
    lora_target_modules: ClassVar[list[str]] = [
        *("q_proj", "k_proj", "v_proj", "o_proj"),
        *("gate_proj", "up_proj", "down_proj"),
    ]

    def __init__(self, config: HATConfig) -> None:
        super().__init__(config)
        d, d_word = config.hidden_size, config.backbone_hidden_size
        self.embeddings = nn.Embedding(config.vocab_size, d)
        self.encoder = HATStack(config, config.encoder_layers, backbone=False)
        self.word_query = nn.Parameter(torch.zeros(d))  # learned query pooling each word (§3.2)
        self.pooler = HATCrossAttention(config, d)
        self.word_in = nn.Linear(d, d_word, bias=False)
        self.backbone = HATStack(config, config.backbone_layers, backbone=True)
        self.word_out = nn.Linear(d_word, d, bias=False)
        self.start_memory = nn.Parameter(torch.zeros(d))  # what bytes of the first word read
        self.cross_norms = nn.ModuleList(HATRMSNorm(d, eps=config.rms_norm_eps) for _ in range(config.decoder_layers))
        self.cross_attns = nn.ModuleList(HATCrossAttention(config, d) for _ in range(config.decoder_layers))
        self.decoder = HATStack(config, config.decoder_layers, backbone=False)
        self.lm_head = nn.Linear(d, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward creates its own HATCache

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: HATCache | None = None,
        use_cache: bool | None = None,
        output_boundaries: bool = False,
        logits_to_keep: int = 0,
        past_key_values: HATCache | None = None,
        **kwargs,
    ) -> HATCausalLMOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(B, L)`): byte ids; with a cache, only the new ones.
        attention_mask (`torch.Tensor` of shape `(B, L)` or `(B, past + L)`, *optional*): 1 for bytes, 0 for
            (left) padding; the last `L` columns are used.
        labels (`torch.LongTensor` of shape `(B, L)`, *optional*): targets, shifted inside; -100 is ignored.
        cache (`HATCache`, *optional*): created when `use_cache=True` and none is given.
        output_boundaries (`bool`, *optional*, defaults to `False`): return the word-start mask.
        logits_to_keep (`int`, *optional*, defaults to 0): logits for the last n positions only (0 = all).
        past_key_values (`HATCache`, *optional*): the name of `cache` before transformers 5.24 (either works).
        kwargs: `num_items_in_batch` (from `Trainer`) normalises the summed loss for gradient accumulation.
        """
        cache = either_cache(cache, past_key_values)
        if cache is not None and not isinstance(cache, HATCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"HAT needs a HATCache, got a non-empty {type(cache).__name__}")
            cache = None
        if use_cache and cache is None:
            cache = HATCache()
        cache = cache if use_cache is not False else None
        length = input_ids.shape[1]
        valid = attention_mask[:, -length:].bool() if attention_mask is not None else torch.ones_like(input_ids).bool()
        hidden, starts = self._hierarchy(input_ids, valid, cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden).float()  # (B, L, V)

        loss = None
        if labels is not None:
            targets = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)  # (B, L): next byte
            summed = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            denom = kwargs.get("num_items_in_batch")
            if denom is None:
                denom = (targets != -100).sum().clamp(min=1)
            loss = summed / torch.as_tensor(denom, device=summed.device)
        return HATCausalLMOutput(
            loss=loss,
            logits=logits,
            **cache_kwarg(cache),
            word_starts=starts if output_boundaries else None,
            compression=(float(valid.sum().clamp(min=1) / starts.sum().clamp(min=1)),),
        )

    def _hierarchy(
        self, input_ids: torch.LongTensor, valid: torch.Tensor, cache: HATCache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bytes (B, L) -> decoder states (B, L, D) and the word-start mask (B, L)."""
        batch = input_ids.shape[0]
        x = self.embeddings(input_ids)  # (B, L, D)
        state = None
        if cache is not None:
            if cache.state is None:
                cache.state = HATState(self, batch, x.device, x.dtype)
            state = cache.state
            cache.seen_tokens += input_ids.shape[1]
        starts = word_starts(input_ids, valid, self.config.max_word_bytes, state.split if state else None)
        words_before = state.words if state is not None else input_ids.new_zeros(batch)
        word = torch.where(valid, words_before[:, None] + starts.long().cumsum(1) - 1, -1)  # (B, L) word of each byte
        words_after = words_before + starts.sum(1)
        hidden = self.encoder(x, valid, state.encoder if state else None)  # (B, L, D)

        # encoder states of the bytes that may belong to words closing now: the cached open word, then the new bytes
        if state is not None:
            slot = torch.arange(state.buffer.shape[1], device=x.device)
            buffer_word = torch.where(slot < state.buffer_len[:, None], (words_before - 1)[:, None], -1)
            pool_in, pool_word = torch.cat([state.buffer, hidden], 1), torch.cat([buffer_word, word], 1)
        else:
            pool_in, pool_word = hidden, word
        first = (words_before - 1).clamp(min=0)  # oldest word that can close in this call
        closed = (words_after - 1 - first).clamp(min=0)  # words closing now (the last word stays open)
        new_memory = self._close_words(pool_in, pool_word, first, closed, state)  # (B, K, D), word index (B, K)

        if state is not None:
            is_open = pool_word == (words_after - 1)[:, None]  # (B, Lb + L)
            order = ((~is_open).long() * is_open.shape[1] + torch.arange(is_open.shape[1], device=x.device)).argsort(1)
            keep = int(is_open.sum(1).max())
            state.buffer = pool_in.gather(1, order[:, :keep, None].expand(-1, -1, pool_in.shape[-1]))
            state.buffer_len, state.words = is_open.sum(1), words_after

        # the decoder's bytes of word j read the start memory and the backbone outputs of words j-window .. j-1
        start_k, start_v = zip(*(attn.project_memory(self.start_memory.view(1, 1, -1)) for attn in self.cross_attns))
        if state is not None:
            size = int(state.memory_count.max())
            memory_pos = filled_positions(state.memory_count, size)  # (B, W): slot j holds word j
            keys, values = zip(*(state.memory.read(i, None, size) for i in range(len(self.cross_attns))))
        else:
            memory, memory_pos = new_memory
            keys, values = zip(*(attn.project_memory(memory) for attn in self.cross_attns))
        j, w = word[:, :, None], memory_pos[:, None, :]
        allowed = (w >= 0) & (w < j) & (w >= j - self.config.decoder_word_window)  # (B, L, W)
        bias = attention_bias(torch.cat([torch.ones_like(allowed[..., :1]), allowed], dim=-1), x.dtype)

        def cross(i: int, h: torch.Tensor) -> torch.Tensor:
            k = torch.cat([start_k[i].expand(batch, -1, -1, -1), keys[i]], dim=2)  # (B, H, 1 + W, D_h)
            v = torch.cat([start_v[i].expand(batch, -1, -1, -1), values[i]], dim=2)
            return h + self.cross_attns[i](self.cross_norms[i](h), k, v, bias)

        return self.decoder(hidden, valid, state.decoder if state else None, interleave=cross), starts

    def _close_words(self, pool_in, pool_word, first, closed, state):
        """Pool each closing word with the learned query, run the backbone on rows that closed a word, and (with a
        cache) append the results to the decoder memory. Returns `(memory (B, K, D), word index (B, K))`."""
        batch, most = pool_in.shape[0], int(closed.max()) if closed.numel() else 0
        target = first[:, None] + torch.arange(most, device=pool_in.device)  # (B, K) absolute word index
        word_valid = torch.arange(most, device=pool_in.device)[None] < closed[:, None]  # (B, K)
        memory_pos = torch.where(word_valid, target, -1)
        if most == 0:
            return pool_in.new_zeros(batch, 0, pool_in.shape[-1]), memory_pos
        member = (pool_word[:, None, :] == target[:, :, None]) & word_valid[..., None]  # (B, K, Lb + L)
        member = member | ~word_valid[..., None]  # padding words attend everywhere (ignored later)
        keys, values = self.pooler.project_memory(pool_in)
        query = self.word_query.expand(batch, most, -1)
        pooled = self.pooler(query, keys, values, attention_bias(member, pool_in.dtype))  # (B, K, D)
        rows = None
        if state is not None and not bool(word_valid[:, 0].all()):
            rows = word_valid[:, 0].nonzero().squeeze(1)  # only the rows that closed a word step the backbone
            pooled, word_valid, memory_pos = pooled[rows], word_valid[rows], memory_pos[rows]
        words = self.backbone(self.word_in(pooled), word_valid, state.backbone if state else None, rows)
        memory = self.word_out(words)  # (B', K, D)
        if state is not None:
            count = take_rows(state.memory_count, rows)  # (B',)
            _, flat, _ = state.memory.place(rows, count, word_valid, memory_pos)
            for i, attn in enumerate(self.cross_attns):
                state.memory.write(i, flat, *attn.project_memory(memory))
            state.memory_count = put_rows(state.memory_count, rows, count + word_valid.sum(1))
        return memory, memory_pos


HATForCausalLM.register_for_auto_class("AutoModelForCausalLM")
