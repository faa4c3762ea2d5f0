"""The frozen backbone under ChunkLLM's adapters: what it must offer, a weight-sharing copy of a model passed in, and
the adapter-only checkpoints that name it.

A ChunkLLM checkpoint follows PEFT's convention: it holds the trained adapters, the config and
`base_model_name_or_path`, not the frozen backbone, which `from_pretrained` loads from where that field points.
A folder saved with `adapters_only=False` holds the backbone too and loads as any `PreTrainedModel` does; the two
are told apart by the tensor names in the folder's `model.safetensors`.
"""

from __future__ import annotations

import copy
import inspect
import json
import os

from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.utils import cached_file

from .cache_argument import CACHE_ARG, CACHE_ARG_SPELLINGS

BACKBONE_PREFIX = "backbone."
# `from_pretrained` arguments that locate a file on disk or on the Hub
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
# arguments about the adapter checkpoint itself (its repo revision and subfolder, its file variant) or the Auto
# class's bookkeeping: never passed on to the backbone, which lives in another folder or repo
CHECKPOINT_ONLY_KWARGS = (
    "revision",
    "subfolder",
    "variant",
    "use_safetensors",
    "code_revision",
    "_commit_hash",
    "_from_auto",
    "adapter_kwargs",
    "adapter_name",
)
# the backbone fields the adapters' shapes and hooks depend on
MATCHING_FIELDS = ("num_hidden_layers", "hidden_size", "num_key_value_heads", "vocab_size")

__all__ = [
    "BACKBONE_PREFIX",
    "backbone_loading_kwargs",
    "check_backbone",
    "check_backbone_matches",
    "is_adapter_checkpoint",
    "load_or_share",
    "peft_adapter_base",
    "saved_tensor_names",
    "share_weights",
    "weights_name",
]


def share_weights(module: nn.Module) -> nn.Module:
    """A copy of `module`'s tree (submodules, config, hooks) over the same weight storage, with parameters of its own
    that are frozen: freezing, hooking or switching the attention of the copy leaves `module` as it was, and no
    weight is duplicated. Quantized parameters (a `Parameter` subclass, already frozen) are shared as they are."""
    memo: dict[int, object] = {}
    for parameter in module.parameters():
        shared = type(parameter) is not nn.Parameter
        memo[id(parameter)] = parameter if shared else nn.Parameter(parameter.detach(), requires_grad=False)
    for buffer in module.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(module, memo)


def load_or_share(
    backbone_or_path: PreTrainedModel | str | os.PathLike, loading_kwargs: dict
) -> tuple[PreTrainedModel, str | None]:
    """`(backbone, where it comes from)`: loaded with `AutoModelForCausalLM` from a path or Hub id, or a weight-sharing
    copy of a model passed in (which stays as it was)."""
    if isinstance(backbone_or_path, (str, os.PathLike)):
        return AutoModelForCausalLM.from_pretrained(backbone_or_path, **loading_kwargs), str(backbone_or_path)
    return share_weights(backbone_or_path), backbone_or_path.config._name_or_path or None


def check_backbone(backbone: PreTrainedModel) -> None:
    """`ValueError` unless `backbone` is a decoder with rotary attention, a KV cache and the v5 attention interface."""
    config, name = backbone.config, type(backbone).__name__
    if getattr(config, "rope_parameters", None) is None or not hasattr(backbone.base_model, "rotary_emb"):
        raise ValueError(
            f"ChunkLLM needs a decoder with rotary attention (Llama, Qwen2, Mistral families); {name} "
            f"(model_type={config.model_type!r}) has no rotary embedding."
        )
    parameters = inspect.signature(backbone.forward).parameters
    if not any(name in parameters for name in CACHE_ARG_SPELLINGS):
        raise ValueError(
            f"ChunkLLM needs a backbone with a KV cache; {name} (model_type={config.model_type!r}) takes no "
            f"`{CACHE_ARG}` (encoders cannot be used)."
        )
    layers = getattr(backbone.base_model, "layers", None)
    attentions = [getattr(layer, "self_attn", None) for layer in layers or []]
    if not attentions or any(not hasattr(attn, "num_key_value_groups") for attn in attentions):
        raise ValueError(f"ChunkLLM expects `{name}.base_model.layers[i].self_attn` with grouped-query attention")


def weights_name(variant: str | None = None) -> str:
    """`model.safetensors`, or `model.{variant}.safetensors`: the file an adapter checkpoint keeps its weights in."""
    return "model.safetensors" if variant is None else f"model.{variant}.safetensors"


def saved_tensor_names(name_or_path: str | os.PathLike, variant: str | None = None, **hub_kwargs) -> set[str] | None:
    """Names of the tensors in the folder's (or Hub repo's) single `model.safetensors`, read from its header only;
    `None` when there is no such file (a sharded or `.bin` checkpoint)."""
    from safetensors import safe_open

    hub_kwargs = {name: value for name, value in hub_kwargs.items() if name in HUB_KWARGS}
    hub_kwargs["_raise_exceptions_for_missing_entries"] = False  # no such file: `None`
    resolved = cached_file(name_or_path, weights_name(variant), **hub_kwargs)
    if resolved is None:
        return None
    with safe_open(resolved, framework="pt") as file:
        return set(file.keys())


def peft_adapter_base(name_or_path: str | os.PathLike, **hub_kwargs) -> str | None:
    """The `base_model_name_or_path` of a PEFT adapter folder (LoRA trained on a ChunkLLM, say), `None` for any
    other folder: the base a PEFT adapter is loaded onto, as the Auto classes do."""
    hub_kwargs = {name: value for name, value in hub_kwargs.items() if name in HUB_KWARGS}
    hub_kwargs["_raise_exceptions_for_missing_entries"] = False
    if cached_file(name_or_path, "config.json", **hub_kwargs) is not None:
        return None  # a model folder (possibly with an adapter inside): loaded as a model
    adapter_config = cached_file(name_or_path, "adapter_config.json", **hub_kwargs)
    if adapter_config is None:
        return None
    with open(adapter_config, encoding="utf-8") as file:
        return json.load(file).get("base_model_name_or_path")


def is_adapter_checkpoint(names: set[str] | None) -> bool:
    """Whether a checkpoint with these tensor names holds the adapters only (no `backbone.*` weight)."""
    return names is not None and not any(name.startswith(BACKBONE_PREFIX) for name in names)


def backbone_loading_kwargs(kwargs: dict) -> dict:
    """The `from_pretrained` arguments that load the backbone of an adapter checkpoint: all of them (`dtype`,
    `device_map`, `quantization_config`, `token`, `cache_dir`, ...) but those about the checkpoint itself."""
    return {name: value for name, value in kwargs.items() if name not in CHECKPOINT_ONLY_KWARGS}


def check_backbone_matches(expected: PreTrainedConfig, backbone: PreTrainedModel, source: str) -> None:
    """`ValueError` unless `backbone` has the shape the adapters were trained for (`expected`, the saved
    `backbone_config`).

    Args:
        expected (`PreTrainedConfig`): the backbone config saved with the adapters.
        backbone (`PreTrainedModel`): the backbone about to receive them.
        source (`str`): where the backbone came from, for the error message.
    """
    for field in MATCHING_FIELDS:
        want, got = getattr(expected, field, None), getattr(backbone.config, field, None)
        if want is not None and want != got:
            raise ValueError(
                f"the ChunkLLM adapters were trained on a backbone with {field}={want}, but {source} has "
                f"{field}={got}: load the backbone they were trained on (pass `backbone=` to `from_pretrained`)"
            )
