"""Embedding hypernetwork: embeddings of arbitrary new tokens from their decomposition into base tokens.

Remote code: a flat folder that imports nothing from `hf_efficient`; `save_pretrained` copies it.

Paper: Zero-Shot Tokenizer Transfer (Minixhofer, Ponti, Vulić, NeurIPS 2024, arXiv:2405.07883), §3; used per batch
by Retrofitting (Large) Language Models with Dynamic Tokenization (Feher, Vulić, Minixhofer, ACL 2025), App. D
for the LRU cache.

A new token `t` with base decomposition `(b_1, ..., b_k)` is read as the sequence of frozen base embeddings
`S[b_1..b_k]` (`S = E_in`, or `concat(E_in, E_out)` for untied bases), projected to width `H`, encoded by a small
transformer and pooled at the first position. The prediction is the mean of the pieces' embeddings (FVT) plus
a correction from the pooled state whose projection starts at zero, so a fresh hypernetwork already maps
every base token to its own embedding (the identity warm-up's fixed point) and training only has to learn
how multi-piece tokens differ from the mean of their pieces.

Checkpoints hold the hypernetwork's own weights and name the base model (`base_model_name_or_path`, as PEFT does);
`from_pretrained` copies the base's embeddings back in from there.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, cached_file, logging

from .configuration_hypernet import HypernetConfig

__all__ = ["EmbeddingCache", "EmbeddingHypernetwork", "HypernetOutput"]

logger = logging.get_logger(__name__)

_BASE_BUFFER = "source_embeddings"  # the base model's embeddings: written by `adapters_only=False` only
# `from_pretrained` arguments that locate files; those that locate the checkpoint itself do not apply to the base
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
_CHECKPOINT_ONLY_KWARGS = ("revision", "subfolder")


def _saved_tensor_names(name_or_path: str | os.PathLike, **kwargs) -> set[str] | None:
    """Names of the tensors in the checkpoint's single `model.safetensors` (its header only); `None` without one."""
    from safetensors import safe_open

    hub_kwargs = {name: value for name, value in kwargs.items() if name in _HUB_KWARGS}
    variant = kwargs.get("variant")
    filename = "model.safetensors" if variant is None else f"model.{variant}.safetensors"
    resolved = cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if resolved is None:
        return None
    with safe_open(resolved, framework="pt") as file:
        return set(file.keys())


@dataclass
class HypernetOutput(ModelOutput):
    """Predicted embeddings.

    Args:
        input_embeddings (`torch.FloatTensor` of shape `(n, E)`): input embeddings of the `n` tokens.
        output_embeddings (`torch.FloatTensor` of shape `(n, E)`, *optional*): output embeddings, for
            hypernetworks of untied bases (`config.separate_output`).
    """

    input_embeddings: torch.FloatTensor | None = None
    output_embeddings: torch.FloatTensor | None = None


class EmbeddingCache:
    """An LRU cache of predicted embedding rows: a fixed `(size, D)` buffer and a key -> slot map.

    Frequent tokens ("the", "and", ...) recur in every batch; their rows are gathered instead of recomputed.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: OrderedDict[tuple[int, ...], int] = OrderedDict()
        self.table: torch.Tensor | None = None  # (size, D)
        self.hits = self.misses = 0

    def clear(self) -> None:
        self.slots.clear()
        self.table = None

    def lookup(self, keys: Sequence[tuple[int, ...]], compute) -> torch.Tensor:
        """Rows for `keys`; `compute(missing_keys) -> (m, D)` is called once for the keys not cached."""
        hit_rows, hit_slots, miss_rows = [], [], []
        for row, key in enumerate(keys):
            slot = self.slots.get(key)
            if slot is None:
                miss_rows.append(row)
            else:
                self.slots.move_to_end(key)
                hit_rows.append(row)
                hit_slots.append(slot)
        self.hits += len(hit_rows)
        self.misses += len(miss_rows)
        computed = compute([keys[r] for r in miss_rows]) if miss_rows else None  # (m, D)
        reference = computed if computed is not None else self.table
        out = torch.empty((len(keys), reference.shape[1]), dtype=reference.dtype, device=reference.device)  # (n, D)
        if hit_rows:
            out[hit_rows] = self.table[hit_slots]
        if computed is not None:
            out[miss_rows] = computed
            self._store([keys[r] for r in miss_rows], computed)
        return out

    def _store(self, keys: list[tuple[int, ...]], rows: torch.Tensor) -> None:
        if self.table is None or self.table.shape[1] != rows.shape[1]:
            self.table = torch.zeros((self.size, rows.shape[1]), dtype=rows.dtype, device=rows.device)
            self.slots.clear()
        keys, rows = keys[-self.size :], rows[-self.size :]  # more new keys than slots: keep the last ones
        slots = []
        for key in keys:
            if len(self.slots) < self.size:
                slot = len(self.slots)
            else:
                _, slot = self.slots.popitem(last=False)  # evict the least recently used
            self.slots[key] = slot
            slots.append(slot)
        self.table[slots] = rows.detach()


class EmbeddingHypernetwork(PreTrainedModel):
    """Predicts input (and output) embeddings of new tokens for a frozen base model.

    Paper: Zero-Shot Tokenizer Transfer (arXiv:2405.07883).

    The base model's embeddings are kept in the `source_embeddings` buffer. `save_pretrained` writes the
    hypernetwork's own weights and its config (`base_model_name_or_path` names the base), not that copy;
    `from_pretrained` (or `AutoModel.from_pretrained(folder, trust_remote_code=True)`) copies the embeddings back in
    from the base model. `save_pretrained(..., adapters_only=False)` keeps the copy in the checkpoint, which is then
    self-contained. In eval mode, `embed` serves repeated tokens from an LRU cache of `config.cache_size` rows.

    Example:

    ```python
    config = HypernetConfig(source_vocab_size=V, embedding_dim=E)
    hypernet = EmbeddingHypernetwork(config)
    hypernet.set_source_embeddings(base.get_input_embeddings().weight)
    out = hypernet.embed([(17, 5), (9,)])  # out.input_embeddings: (2, E); (9,) gives row 9 exactly at init
    hypernet.save_pretrained("hypernet")  # weights + config; the base's embeddings stay with the base
    hypernet = EmbeddingHypernetwork.from_pretrained("hypernet", base_model=base)  # or loaded from the config's path
    ```
    """

    config_class = HypernetConfig
    base_model_prefix = "hypernet"
    main_input_name = "surface_ids"
    supports_gradient_checkpointing = False
    # adapter checkpoints leave the base's embeddings out; `from_pretrained` copies them in from the base model
    _keys_to_ignore_on_load_missing: ClassVar[list[str]] = [rf"^{_BASE_BUFFER}$"]

    def __init__(self, config: HypernetConfig) -> None:
        super().__init__(config)
        width = config.embedding_dim * (2 if config.separate_output else 1)
        self.register_buffer("source_embeddings", torch.zeros(config.source_vocab_size, width), persistent=True)
        self.input_projection = nn.Linear(width, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_surface_length, config.hidden_size)
        layer = nn.TransformerEncoderLayer(
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            dropout=config.dropout,
            activation="gelu",
            layer_norm_eps=config.layer_norm_eps,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.num_hidden_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.output_in = nn.Linear(config.hidden_size, config.embedding_dim)
        self.output_out = nn.Linear(config.hidden_size, config.embedding_dim) if config.separate_output else None
        self.cache = EmbeddingCache(config.cache_size)
        self.post_init()

    @classmethod
    def for_base_model(cls, model: PreTrainedModel, **config_kwargs) -> EmbeddingHypernetwork:
        """A fresh hypernetwork sized for `model` (tied or untied) holding a copy of its embeddings.

        `config_kwargs` go to `HypernetConfig` (e.g. `hidden_size=128`, `max_surface_length=8`).
        """
        table = model.get_input_embeddings().weight  # (V, E)
        head = model.get_output_embeddings()
        untied = head is not None and head.weight is not table and head.weight.shape == table.shape
        config = HypernetConfig(
            source_vocab_size=table.shape[0],
            embedding_dim=table.shape[1],
            separate_output=untied,
            base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
            **config_kwargs,
        )
        hypernet = cls(config)
        hypernet.set_source_embeddings(table, head.weight if untied else None)
        return hypernet

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
        Save the hypernetwork's weights, its config (with `base_model_name_or_path`) and the remote code, without its
        copy of the base model's embeddings. All other arguments are `PreTrainedModel`'s.

        Args:
            save_directory (`str` or `os.PathLike`): the folder to write.
            adapters_only (`bool`, *optional*, defaults to `True`): `False` also writes the base's embeddings
                (`source_embeddings`, `V x E` or `V x 2E`), so that loading needs no base model.
        """
        if adapters_only:
            state_dict = self.state_dict() if state_dict is None else state_dict
            state_dict = {name: value for name, value in state_dict.items() if name != _BASE_BUFFER}
            if self.config.base_model_name_or_path is None and is_main_process:
                logger.warning(
                    "config.base_model_name_or_path is None (the base model was built in memory): loading this "
                    "checkpoint needs `from_pretrained(path, base_model=...)`; set the field to where the base model "
                    "is saved, or save with adapters_only=False"
                )
        super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        base_model: PreTrainedModel | None = None,
        base_model_kwargs: dict | None = None,
        **kwargs,
    ) -> EmbeddingHypernetwork:
        r"""
        Load a saved hypernetwork. A checkpoint without the base's embeddings (what `save_pretrained` writes by
        default) gets them from `base_model`, or else from the model at `config.base_model_name_or_path` (offline
        when that is a local folder), loaded for this purpose only.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): the checkpoint's folder or Hub id.
            base_model (`PreTrainedModel`, *optional*): the base model, already loaded (nothing is loaded twice).
            base_model_kwargs (`dict`, *optional*): `from_pretrained` arguments for loading the base model.
            kwargs: `PreTrainedModel.from_pretrained` arguments; `token`, `cache_dir` and `local_files_only`
                apply to the base model too.
        """
        names = _saved_tensor_names(pretrained_model_name_or_path, **kwargs)
        adapters_only = names is not None and _BASE_BUFFER not in names
        if not adapters_only and (base_model is not None or base_model_kwargs is not None):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds the base's embeddings (saved with adapters_only=False): drop "
                "`base_model` and `base_model_kwargs`"
            )
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if adapters_only:
            hypernet = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) on request
            if base_model is None:
                shared = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS and k not in _CHECKPOINT_ONLY_KWARGS}
                loading = {**shared, **(base_model_kwargs or {})}
                base_model = hypernet._load_base(loading, pretrained_model_name_or_path)
            head = base_model.get_output_embeddings() if hypernet.config.separate_output else None
            hypernet.set_source_embeddings(base_model.get_input_embeddings().weight, head.weight if head else None)
        return loaded

    def _load_base(self, loading_kwargs: dict, checkpoint: str | os.PathLike) -> PreTrainedModel:
        """The base model named by the config: a causal LM when the hypernetwork predicts output embeddings too."""
        path = self.config.base_model_name_or_path
        if path is None:
            raise ValueError(
                f"{checkpoint} holds the hypernetwork only and names no base model (config.base_model_name_or_path is "
                "None): pass `base_model=` (the model it was trained for)"
            )
        base_config = AutoConfig.from_pretrained(path, **loading_kwargs)
        causal = self.config.separate_output or any(a.endswith("ForCausalLM") for a in base_config.architectures or [])
        auto = AutoModelForCausalLM if causal else AutoModel
        return auto.from_pretrained(path, config=base_config, **loading_kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self.output_in or module is self.output_out:
            init.zeros_(module.weight)  # prediction = FVT mean at init: identity on base tokens
            init.zeros_(module.bias)

    def train(self, mode: bool = True) -> EmbeddingHypernetwork:
        self.cache.clear()  # cached rows were predicted by other weights
        return super().train(mode)

    def set_source_embeddings(self, input_embeddings: torch.Tensor, output_embeddings: torch.Tensor | None = None):
        """Copy the base model's embeddings `(V, E)` (and untied output embeddings `(V, E)`) into the buffer."""
        parts = [input_embeddings] + ([output_embeddings] if self.config.separate_output else [])
        if self.config.separate_output and output_embeddings is None:
            raise ValueError("config.separate_output=True needs output_embeddings (the base model's untied head)")
        source = torch.cat([p.detach().to(self.source_embeddings) for p in parts], dim=1)  # (V, S)
        if source.shape != self.source_embeddings.shape:
            raise ValueError(
                f"embeddings of shape {tuple(source.shape)} do not fit {tuple(self.source_embeddings.shape)}"
            )
        self.source_embeddings.copy_(source)
        self.cache.clear()

    def surface_matrix(self, decompositions: Sequence[Sequence[int]]) -> torch.Tensor:
        """Decompositions as a `(n, L)` id matrix, truncated to `config.max_surface_length`, padded with -1."""
        length = min(max(len(d) for d in decompositions), self.config.max_surface_length)
        ids = torch.full((len(decompositions), length), -1, dtype=torch.long)  # (n, L)
        for row, d in enumerate(decompositions):
            d = list(d)[:length]
            ids[row, : len(d)] = torch.tensor(d, dtype=torch.long)
        return ids.to(self.source_embeddings.device)

    def forward(self, surface_ids: torch.LongTensor) -> HypernetOutput:
        """Embeddings of `n` tokens from their base ids.

        Args:
            surface_ids (`torch.LongTensor` of shape `(n, L)`): base ids of each token, padded with -1 on the
                right (see `surface_matrix`).
        """
        if surface_ids.shape[1] > self.config.max_surface_length:
            raise ValueError(
                f"surface_ids has {surface_ids.shape[1]} columns > max_surface_length="
                f"{self.config.max_surface_length}; truncate with surface_matrix()"
            )
        mask = surface_ids >= 0  # (n, L)
        pieces = self.source_embeddings[surface_ids.clamp_min(0)]  # (n, L, S)
        counts = mask.sum(1, keepdim=True).clamp_min(1)  # (n, 1)
        mean = (pieces * mask[..., None]).sum(1) / counts  # (n, S) FVT
        positions = torch.arange(surface_ids.shape[1], device=surface_ids.device)
        hidden = self.input_projection(pieces) + self.position_embeddings(positions)  # (n, L, H)
        hidden = self.encoder(hidden, src_key_padding_mask=~mask)  # (n, L, H)
        pooled = self.norm(hidden[:, 0])  # (n, H)
        dim = self.config.embedding_dim
        input_embeddings = mean[:, :dim] + self.output_in(pooled)  # (n, E)
        output_embeddings = mean[:, dim:] + self.output_out(pooled) if self.output_out is not None else None
        return HypernetOutput(input_embeddings=input_embeddings, output_embeddings=output_embeddings)

    def embed(self, decompositions: Sequence[Sequence[int]], use_cache: bool | None = None) -> HypernetOutput:
        """Embeddings of tokens given as base-id decompositions, through the LRU cache in inference.

        Args:
            decompositions (`Sequence[Sequence[int]]`): base ids of each of the `n` tokens.
            use_cache (`bool`, *optional*): defaults to `not self.training and config.cache_size > 0` (gradients
                never flow through cached rows).
        """
        if use_cache is None:
            use_cache = not self.training and self.config.cache_size > 0 and not torch.is_grad_enabled()
        keys = [tuple(int(i) for i in d) for d in decompositions]
        unique = list(dict.fromkeys(keys))
        index = {key: row for row, key in enumerate(unique)}

        def compute(batch: list[tuple[int, ...]]) -> torch.Tensor:
            out = self(self.surface_matrix(batch))
            parts = [out.input_embeddings] + ([out.output_embeddings] if self.output_out is not None else [])
            return torch.cat(parts, dim=1)  # (m, E or 2E)

        rows = self.cache.lookup(unique, compute) if use_cache else compute(unique)  # (u, E or 2E)
        rows = rows[torch.tensor([index[key] for key in keys], device=rows.device)]  # (n, E or 2E)
        dim = self.config.embedding_dim
        return HypernetOutput(
            input_embeddings=rows[:, :dim], output_embeddings=rows[:, dim:] if self.output_out is not None else None
        )

    def identity_loss(self, token_ids: torch.LongTensor, output: HypernetOutput | None = None) -> torch.Tensor:
        """Mean squared error between predictions for single base tokens `(n,)` and their own embeddings.

        The identity warm-up of ZeTT (§3.3) minimises this before tokenizer sampling starts.

        Args:
            token_ids (`torch.LongTensor` of shape `(n,)`): base token ids.
            output (`HypernetOutput`, *optional*): the prediction for `token_ids[:, None]` when the caller ran the
                forward itself (through a distributed wrapper, so that gradients are synchronised); computed here
                otherwise.
        """
        out = self(token_ids[:, None]) if output is None else output
        dim = self.config.embedding_dim
        loss = nn.functional.mse_loss(out.input_embeddings, self.source_embeddings[token_ids, :dim])
        if out.output_embeddings is not None:
            loss = loss + nn.functional.mse_loss(out.output_embeddings, self.source_embeddings[token_ids, dim:])
        return loss


EmbeddingHypernetwork.register_for_auto_class("AutoModel")
