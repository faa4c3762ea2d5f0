"""Model families shipped by hf_efficient.

Each family is one flat folder (``byte/``, ``hnet/``, ``hat/``, ``chunkllm/``, ``hypernet/``) whose files are
exactly the remote code copied to the Hub by ``save_pretrained``. This module maps public names to those
folders lazily and registers every family that is present with the ``Auto*`` classes, so that
``AutoModelForCausalLM.from_pretrained(path)`` resolves our classes in-process without
``trust_remote_code``.
"""

import importlib
import importlib.util
from typing import Any

# public name -> module (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    "ByteTokenizer": ".byte.tokenization_byte",
    "HNetConfig": ".hnet.configuration_hnet",
    "HNetForCausalLM": ".hnet.modeling_hnet",
    "HATConfig": ".hat.configuration_hat",
    "HATForCausalLM": ".hat.modeling_hat",
    "ChunkLLMConfig": ".chunkllm.configuration_chunkllm",
    "ChunkLLMForCausalLM": ".chunkllm.modeling_chunkllm",
    "HypernetConfig": ".hypernet.configuration_hypernet",
    "EmbeddingHypernetwork": ".hypernet.modeling_hypernet",
}

# (config name, auto class name, model name) registered when the family's folder exists
_AUTO_MODELS: tuple[tuple[str, str, str], ...] = (
    ("HNetConfig", "AutoModelForCausalLM", "HNetForCausalLM"),
    ("HATConfig", "AutoModelForCausalLM", "HATForCausalLM"),
    ("ChunkLLMConfig", "AutoModelForCausalLM", "ChunkLLMForCausalLM"),
    ("HypernetConfig", "AutoModel", "EmbeddingHypernetwork"),
)

__all__ = list(_EXPORTS)


def _family_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(_EXPORTS[name], __name__) is not None
    except ModuleNotFoundError:  # the family's folder itself is absent
        return False


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_efficient.models' has no attribute {name!r}")
    if not _family_present(name):
        raise ImportError(f"{name} is not part of this hf_efficient build ({_EXPORTS[name]} is missing)")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def register_auto_classes() -> list[str]:
    """Register every family present with ``AutoConfig`` / ``AutoModel*`` / ``AutoTokenizer``.

    Idempotent. Returns the registered ``model_type`` strings.
    """
    import transformers

    registered = []
    for config_name, auto_name, model_name in _AUTO_MODELS:
        if not (_family_present(config_name) and _family_present(model_name)):
            continue
        config_class, model_class = __getattr__(config_name), __getattr__(model_name)
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)
        if config_name in ("HNetConfig", "HATConfig") and _family_present("ByteTokenizer"):
            transformers.AutoTokenizer.register(
                config_class, slow_tokenizer_class=__getattr__("ByteTokenizer"), exist_ok=True
            )
        registered.append(config_class.model_type)
    return registered
