"""Factories of tiny random models, shared by every test file.

The case matrix covers the three decoder families the project promises (Llama, Qwen2-style GQA with
q/k/v biases, Mistral-style with a sliding window), tied and untied embeddings. Nothing is downloaded.

```python
from factories import ARCHITECTURES, tiny_causal_lm, tiny_tokenizer

model = tiny_causal_lm("qwen2", tie_word_embeddings=True)
```
"""

from __future__ import annotations

import functools

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ARCHITECTURES = ("llama", "qwen2", "mistral")

_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}

# small but not degenerate: GQA (4 query heads over 2 KV heads), head_dim 8, two layers
_DEFAULTS = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(arch: str = "llama", **overrides) -> PreTrainedConfig:
    """A tiny config of `arch` (one of `ARCHITECTURES`); keyword arguments override the defaults."""
    if arch not in _CLASSES:
        raise ValueError(f"arch={arch!r} is not one of {ARCHITECTURES}")
    kwargs = {**_DEFAULTS, **overrides}
    if arch == "mistral":  # decoupled head_dim (q_proj 32 -> 64) and a sliding window longer than tests
        kwargs.setdefault("head_dim", 16)
        kwargs.setdefault("sliding_window", 4096)
    return _CLASSES[arch][0](**kwargs)


def tiny_causal_lm(
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **config_overrides,
) -> PreTrainedModel:
    """A randomly initialised causal LM of `arch` in eval mode, deterministic for a given `seed`.

    The default init (std 0.02) gives near-uniform next-token distributions; the weights are rescaled so
    greedy decoding has clear winners and repeated n-grams, as trained models do.
    """
    config = tiny_config(arch, **config_overrides)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed + ARCHITECTURES.index(arch))
    model = _CLASSES[arch][1](config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(10.0)  # std 0.2: peaked, still numerically tame in bf16
    return model.to(dtype).eval()


def tiny_hybrid_lm(sliding_window: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A tiny random Gemma-3 text model: sliding-window and full-attention layers mixed (`config.layer_types`)."""
    config = Gemma3TextConfig(
        **{**_DEFAULTS, "num_hidden_layers": 4},
        head_dim=8,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(10.0)  # peaked distributions, as in `tiny_causal_lm`
    return model.to(dtype).eval()


@functools.cache
def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of `vocab_size` (> 259) ids trained on a few standard-library docstrings.

    Special tokens: <pad>=0, <s>=1, </s>=2, matching the tiny configs; pair it with
    `tiny_causal_lm(vocab_size=len(tokenizer))` for tests that go through text.
    """
    import inspect
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [inspect.getdoc(obj) or "" for obj in (json, functools, inspect, str, dict, list)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    return fast
