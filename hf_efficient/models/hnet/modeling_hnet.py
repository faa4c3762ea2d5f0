"""H-Net: a byte-level causal LM with learned dynamic chunking (remote code: imports nothing from `hf_efficient`).

Paper: H-Net, "Dynamic Chunking for End-to-End Hierarchical Sequence Modeling" (Hwang, Wang, Gu, 2025,
arXiv:2507.07955).

One routed stage: encoder -> router -> chunk -> inner network (a nested stage or the main Llama stack) ->
EMA de-chunk -> `z * STE(c) + residual_proj(x̂)` -> decoder. Generation steps the encoder/decoder on every byte
and the inner network only on the rows whose byte closed a chunk (`HNetCache`).
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
from .cache_hnet import HNetCache, HNetStageCache
from .cache_slots import put_rows, take_rows
from .configuration_hnet import HNetConfig
from .dynamic_chunking_hnet import HNetDeChunk, HNetRouter, chunk, ratio_loss, straight_through
from .layers_hnet import HNetRecurrentBlock, HNetStack, HNetStackCache, last_valid_index

__all__ = ["HNetCache", "HNetCausalLMOutput", "HNetForCausalLM", "HNetModel", "HNetPreTrainedModel"]


@dataclass
class HNetCausalLMOutput(CausalLMOutputWithPast):
    r"""
    lm_loss (`torch.FloatTensor`, *optional*): next-byte cross-entropy (the `loss` adds the weighted ratio loss).
    ratio_loss (`torch.FloatTensor`, *optional*): sum over stages of the ratio loss (unweighted).
    compression (`tuple[float]`, *optional*): items per chunk at each stage (bytes per chunk at stage 0).
    boundaries (`tuple[torch.BoolTensor]`, *optional*): per-stage boundary masks, outer to inner; stage s has
        shape `(B, L_s)` where `L_s` is the number of chunks of stage s - 1 (bytes for s = 0). Returned with
        `output_boundaries=True`.
    """

    lm_loss: torch.FloatTensor | None = None
    ratio_loss: torch.FloatTensor | None = None
    compression: tuple[float, ...] | None = None
    boundaries: tuple[torch.BoolTensor, ...] | None = None


@dataclass
class _Routing:
    prob: torch.Tensor  # (B, L_s)
    boundary: torch.Tensor  # (B, L_s)
    valid: torch.Tensor  # (B, L_s)


class HNetStage(nn.Module):
    """Stage `stage` of the hierarchy; the innermost stage is just the main network stack."""

    def __init__(self, config: HNetConfig, stage: int) -> None:
        super().__init__()
        self.stage = stage
        self.innermost = stage == config.num_stages
        encoder, decoder = config.stage_layout(stage)
        self.hidden_size = config.hidden_size[stage]
        if self.innermost:
            self.main_network = HNetStack(config, stage, encoder)
            return
        self.encoder = HNetStack(config, stage, encoder)
        self.routing_module = HNetRouter(self.hidden_size)
        self.dechunk = HNetDeChunk()  # no parameters: its EMA scan is a kernelizable submodule
        self.residual_proj = nn.Linear(self.hidden_size, self.hidden_size)
        self.inner = HNetStage(config, stage + 1)
        self.decoder = HNetStack(config, stage, decoder)
        extra = config.hidden_size[stage + 1] - self.hidden_size
        self.pad_dimension = nn.Parameter(torch.zeros(extra)) if extra else None

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> HNetStageCache | HNetStackCache:
        if self.innermost:
            return self.main_network.new_cache(batch, device, dtype)
        parts = [part.new_cache(batch, device, dtype) for part in (self.encoder, self.inner, self.decoder)]
        return HNetStageCache(*parts, self.hidden_size, batch, device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        valid: torch.Tensor,
        cache: HNetStageCache | HNetStackCache | None,
        rows: torch.Tensor | None,
        routing: list[_Routing],
    ) -> torch.Tensor:
        """
        Args:
            x (`torch.Tensor` of shape `(B', L, D_s)`): new items of batch rows `rows` (all rows if `None`).
            valid (`torch.Tensor` of shape `(B', L)`): non-padding items, one contiguous run per row.
            cache (`HNetStageCache`, *optional*): full-batch state, read at and written back to `rows`.
            routing (`list`): collects each stage's `_Routing`, outer to inner.

        Returns:
            `torch.Tensor` of shape `(B', L, D_s)`.
        """
        if self.innermost:
            return self.main_network(x, valid, cache, rows)
        hidden = self.encoder(x, valid, cache.encoder if cache else None, rows)  # (B', L, D)
        last_hidden = take_rows(cache.last_hidden, rows) if cache else None
        prob, boundary = self.routing_module(
            hidden, valid, last_hidden, take_rows(cache.has_history, rows) if cache else None
        )
        routing.append(_Routing(prob, boundary, valid))

        chunks, chunk_valid, index = chunk(hidden, boundary)  # (B', M, D), (B', M)
        if self.pad_dimension is not None:
            chunks = torch.cat([chunks, self.pad_dimension.expand(*chunks.shape[:2], -1).to(chunks.dtype)], dim=-1)
        inner = self._run_inner(chunks, chunk_valid, cache, rows, routing)[..., : self.hidden_size]  # (B', M, D)

        last_value = (
            take_rows(cache.last_value, rows) if cache else hidden.new_zeros(hidden.shape[0], self.hidden_size)
        )
        upsampled, new_last_value = self.dechunk(inner, prob.gather(1, index), chunk_valid, boundary, last_value)
        confidence = torch.where(boundary, prob, 1 - prob)  # c_t: probability of the decision taken
        z = upsampled * straight_through(confidence)[..., None] + self.residual_proj(hidden)
        out = self.decoder(z, valid, cache.decoder if cache else None, rows)

        if cache is not None:
            last = last_valid_index(valid)
            seen = last >= 0
            new_hidden = torch.where(
                seen[:, None], hidden[torch.arange(hidden.shape[0]), last.clamp(min=0)], last_hidden
            )
            cache.last_hidden = put_rows(cache.last_hidden, rows, new_hidden)
            cache.has_history = put_rows(cache.has_history, rows, take_rows(cache.has_history, rows) | seen)
            cache.last_value = put_rows(cache.last_value, rows, new_last_value)
        return out

    def _run_inner(self, chunks, chunk_valid, cache, rows, routing) -> torch.Tensor:
        """Inner network on the rows that have at least one new chunk (gather -> step -> scatter)."""
        if cache is None:
            return self.inner(chunks, chunk_valid, None, None, routing)
        has_chunk = chunk_valid.any(dim=1)  # (B',)
        if bool(has_chunk.all()):
            return self.inner(chunks, chunk_valid, cache.inner, rows, routing)
        out = chunks.new_zeros(chunks.shape)
        sub = has_chunk.nonzero().squeeze(1)
        if sub.numel():
            absolute = sub if rows is None else rows[sub]
            out = out.index_copy(0, sub, self.inner(chunks[sub], chunk_valid[sub], cache.inner, absolute, routing))
        return out


class HNetPreTrainedModel(PreTrainedModel):
    config_class = HNetConfig
    config: HNetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules: ClassVar[list[str]] = ["HNetStage"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_attention_backend = True

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False) -> None:
        super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)
        for module in self.modules():  # the Llama layers read per-stack LlamaConfigs built from ours
            if isinstance(getattr(module, "config", None), LlamaConfig):
                module.config._attn_implementation = self.config._attn_implementation

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HNetRouter):
            init.eye_(module.q_proj.weight)  # §2.2.1: routing projections start at the identity
            init.eye_(module.k_proj.weight)
        elif isinstance(module, HNetStage) and not module.innermost:
            init.zeros_(module.residual_proj.weight)
            init.zeros_(module.residual_proj.bias)
            if module.pad_dimension is not None:
                init.zeros_(module.pad_dimension)
        elif isinstance(module, HNetRecurrentBlock):
            # decay a = sigmoid(bias) spread over [0.5, 0.99]: a range of memory lengths from 2 to 100 steps
            init.copy_(module.decay_bias, torch.logit(torch.linspace(0.5, 0.99, module.channels)))
            init.normal_(module.conv.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.conv.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)  # §3: embeddings N(0, 1)


class HNetModel(HNetPreTrainedModel):
    """Byte embedding + the stage hierarchy; returns the outer decoder's hidden states (B, L, D_0)."""

    def __init__(self, config: HNetConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size[0])
        self.backbone = HNetStage(config, 0)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self, input_ids: torch.LongTensor, valid: torch.Tensor, cache: HNetCache | None
    ) -> tuple[torch.Tensor, list[_Routing]]:
        x = self.embeddings(input_ids)  # (B, L, D_0)
        stage_cache = None
        if cache is not None:
            if cache.root is None:
                cache.root = self.backbone.new_cache(x.shape[0], x.device, x.dtype)
            stage_cache = cache.root
            cache.seen_tokens += input_ids.shape[1]
        routing: list[_Routing] = []
        return self.backbone(x, valid, stage_cache, None, routing), routing


class HNetForCausalLM(HNetPreTrainedModel, GenerationMixin):
    r"""
    H-Net causal LM over UTF-8 bytes (use with `ByteTokenizer`).

    `forward(input_ids, labels=...)` returns `loss = lm_loss + ratio_loss_weight * ratio_loss`, with both parts
    and the learned compression exposed separately; `generate` works with batches whose rows close chunks at
    different bytes, streaming, sampling and logits processors.

    Paper: H-Net (Hwang, Wang, Gu, 2025, arXiv:2507.07955).

    Example:

    ```python
    >>> from hf_efficient.models import ByteTokenizer, HNetConfig, HNetForCausalLM
    >>> model, tok = HNetForCausalLM(HNetConfig()), ByteTokenizer()
    >>> batch = tok(["def f(x):", "Hello"], padding=True, padding_side="left", return_tensors="pt")
    >>> out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    ```

    PEFT: `LoraConfig(target_modules=HNetForCausalLM.lora_target_modules)` puts LoRA on every linear layer of the
    stacks: attention (`q_proj`, `k_proj`, `v_proj`, `o_proj`), MLPs (`gate_proj`, `up_proj`, `down_proj`) and
    recurrent blocks (`in_proj`, `out_proj`); `q_proj` / `k_proj` also match the routers
    (`routing_module.q_proj`), so chunk boundaries adapt too (the regex `r".*layers\.\d+\..*_proj"` leaves them
    fixed). `lm_head` is tied to the byte embeddings (`docs/peft.md`).
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embeddings.weight"}
    lora_target_modules: ClassVar[list[str]] = [
        *("q_proj", "k_proj", "v_proj", "o_proj"),
        *("gate_proj", "up_proj", "down_proj"),
        *("in_proj", "out_proj"),
    ]

    def __init__(self, config: HNetConfig) -> None:
        super().__init__(config)
        self.model = HNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size[0], config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward creates its own HNetCache

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: HNetCache | None = None,
        use_cache: bool | None = None,
        output_boundaries: bool = False,
        logits_to_keep: int = 0,
        past_key_values: HNetCache | None = None,
        **kwargs,
    ) -> HNetCausalLMOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(B, L)`): byte ids; with a cache, only the new ones.
        attention_mask (`torch.Tensor` of shape `(B, L)` or `(B, past + L)`, *optional*): 1 for bytes, 0 for padding
            (left padding for prompts); the last `L` columns are used.
        labels (`torch.LongTensor` of shape `(B, L)`, *optional*): targets, shifted inside; -100 is ignored.
        cache (`HNetCache`, *optional*): created when `use_cache=True` and none is given.
        output_boundaries (`bool`, *optional*, defaults to `False`): return per-stage boundary masks.
        logits_to_keep (`int`, *optional*, defaults to 0): compute logits for the last n positions only (0 = all).
        past_key_values (`HNetCache`, *optional*): the name of `cache` before transformers 5.24 (either works).
        kwargs: `num_items_in_batch` (from `Trainer`) normalises the summed LM loss for gradient accumulation.
        """
        cache = either_cache(cache, past_key_values)
        if cache is not None and not isinstance(cache, HNetCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"H-Net needs an HNetCache, got a non-empty {type(cache).__name__}")
            cache = None
        if use_cache and cache is None:
            cache = HNetCache()
        cache = cache if use_cache is not False else None
        length = input_ids.shape[1]
        valid = attention_mask[:, -length:].bool() if attention_mask is not None else torch.ones_like(input_ids).bool()
        hidden, routing = self.model(input_ids, valid, cache)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden).float()  # (B, L, V)

        loss = lm_loss = aux = None
        if labels is not None:
            targets = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)  # (B, L): next byte
            summed = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            denom = kwargs.get("num_items_in_batch")
            if denom is None:
                denom = (targets != -100).sum().clamp(min=1)
            lm_loss = summed / torch.as_tensor(denom, device=summed.device)
            aux = sum(
                ratio_loss(r.prob, r.boundary, r.valid, n) for r, n in zip(routing, self.config.compression_ratio)
            )
            # under gradient accumulation the micro-batch LM losses sum to a mean: weight the ratio loss alike
            share = (targets != -100).sum() / denom if kwargs.get("num_items_in_batch") is not None else 1.0
            loss = lm_loss + self.config.ratio_loss_weight * aux * share if routing else lm_loss
        compression = tuple(
            float(r.valid.sum().clamp(min=1) / r.boundary.sum().clamp(min=1))
            for r in routing[: self.config.num_stages]
        )
        return HNetCausalLMOutput(
            loss=loss,
            logits=logits,
            **cache_kwarg(cache),
            lm_loss=lm_loss,
            ratio_loss=aux if routing else None,
            compression=compression,
            boundaries=tuple(r.boundary for r in routing) if output_boundaries else None,
        )

    def optimizer_param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Parameter groups with the per-stage learning rates `lr * config.lr_multiplier[stage]` (§3.1).

        Biases, norms, 1-D parameters and embeddings get no weight decay.

        Example:

        ```python
        >>> optimizer = torch.optim.AdamW(model.optimizer_param_groups(lr=3e-4, weight_decay=0.1))
        ```
        """
        groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            stage = name.split(".").count("inner")
            decay = param.ndim >= 2 and "embeddings" not in name and "norm" not in name
            groups.setdefault((stage, decay), []).append(param)
        return [
            {
                "params": params,
                "lr": lr * self.config.lr_multiplier[stage],
                "weight_decay": weight_decay if decay else 0.0,
            }
            for (stage, decay), params in sorted(groups.items())
        ]

    @torch.no_grad()
    def chunk_text(self, text: str, tokenizer) -> list[list[str]]:
        """Split `text` into the model's chunks at each stage (for inspection; see `byte_demo.render_chunks`).

        Returns:
            `list[list[str]]`: per stage, the text of each chunk (decoded with `errors="replace"`).
        """
        ids = torch.tensor([list(text.encode("utf-8"))], device=self.device)
        out = self(ids, output_boundaries=True, use_cache=False)
        spans, starts = [], list(range(ids.shape[1]))
        for mask in out.boundaries:
            starts = [starts[i] for i in mask[0].nonzero().flatten().tolist()]
            spans.append(
                [text.encode()[a:b].decode("utf-8", "replace") for a, b in zip(starts, [*starts[1:], ids.shape[1]])]
            )
        return spans


HNetForCausalLM.register_for_auto_class("AutoModelForCausalLM")
