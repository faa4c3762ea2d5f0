"""The embedded reference corpus (splits, kinds, version) and the reference-model cache (keys, builds, errors)."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from hf_efficient import reference
from hf_efficient.recipes import train_reference
from hf_efficient.reference import (
    CORPUS_VERSION,
    REFERENCE_MODELS,
    SPLITS,
    ReferenceConfig,
    corpus,
    reference_corpus,
    reference_key,
    reference_model,
    reference_model_path,
    trained,
)

TINY = ReferenceConfig(
    description="tiny test model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    vocab_size=300,
    seq_len=32,
    batch_size=4,
    max_steps=3,
    warmup_steps=1,
)


# ----------------------------------------------------------------------------------------------------- corpus


def test_version_stamp_names_python_and_format():
    assert f"py{sys.version_info.major}.{sys.version_info.minor}" in CORPUS_VERSION
    assert f"format{corpus.CORPUS_FORMAT}" in CORPUS_VERSION


def test_splits_are_deterministic_disjoint_and_sized():
    first = {split: reference_corpus(split, "all") for split in SPLITS}
    corpus._documents.cache_clear()  # rebuild from disk: same documents, same order
    assert {split: reference_corpus(split, "all") for split in SPLITS} == first
    sets = {split: set(docs) for split, docs in first.items()}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    total = sum(map(len, first.values()))
    for split in ("validation", "test"):
        assert 0.02 < len(first[split]) / total < 0.1, split
    assert all(len(doc) <= corpus.MAX_DOCUMENT_CHARS for docs in first.values() for doc in docs)


def test_split_assignment_is_a_stable_hash():
    # pinned: a change here means every split moved, which needs a CORPUS_FORMAT bump
    assignments = [corpus._split_of(name) for name in ("os.py", "json/decoder.py", "topic:if")]
    assert assignments == [corpus._split_of(name) for name in ("os.py", "json/decoder.py", "topic:if")]
    assert set(map(corpus._split_of, (f"doc{i}" for i in range(2000)))) == set(SPLITS)


def test_kinds_are_code_and_prose():
    code, prose = reference_corpus("validation", "code"), reference_corpus("validation", "prose")
    assert reference_corpus("validation", "all") == code + prose
    assert code and prose
    complete = [doc for doc in code if len(doc) < corpus.MAX_DOCUMENT_CHARS - 1000]
    for doc in complete:
        compile(doc, "<corpus>", "exec")  # untruncated code documents are valid Python
    letters = sum(c.isalpha() or c.isspace() for doc in prose for c in doc) / sum(map(len, prose))
    assert letters > 0.8  # English, not code


def test_bad_split_or_kind():
    with pytest.raises(ValueError, match="split='dev'"):
        reference_corpus("dev")
    with pytest.raises(ValueError, match="kind='markdown'"):
        reference_corpus("train", "markdown")


# ------------------------------------------------------------------------------------------------------ cache


def test_unknown_name_lists_valid_names(tmp_path):
    for call in (reference_model, reference_model_path, reference_key):
        with pytest.raises(ValueError, match="valid names: target, drafter"):
            call("nope")
    with pytest.raises(SystemExit) as error:
        train_reference.main(["--name", "nope", "--output-dir", str(tmp_path)])
    assert "valid names" in str(error.value.code) and "\n" not in str(error.value.code)


def test_reference_configs_use_gqa_and_a_much_smaller_drafter():
    target, drafter = REFERENCE_MODELS["target"], REFERENCE_MODELS["drafter"]
    assert target.num_key_value_heads < target.num_attention_heads
    assert drafter.hidden_size * drafter.num_hidden_layers * 4 <= target.hidden_size * target.num_hidden_layers
    assert target.vocab_size == drafter.vocab_size  # one shared tokenizer
    assert target.max_position_embeddings >= 2048
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        dataclasses.replace(TINY, num_key_value_heads=3)


def test_key_follows_training_code_corpus_and_config(monkeypatch):
    key = reference_key("target")
    assert key == reference_key("target") and key != reference_key("drafter")
    monkeypatch.setitem(REFERENCE_MODELS, "target", dataclasses.replace(REFERENCE_MODELS["target"], max_steps=7))
    changed_config = reference_key("target")
    assert changed_config != key
    monkeypatch.setattr(trained, "_recipe_source_hash", lambda: "edited training code")
    assert reference_key("target") not in (key, changed_config)
    monkeypatch.setattr(trained, "CORPUS_VERSION", "another python")
    assert reference_key("target") != changed_config


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_EFFICIENT_CACHE", str(tmp_path / "mine"))
    assert reference.cache_dir() == tmp_path / "mine"
    assert reference_model_path("target").parent == tmp_path / "mine"
    monkeypatch.delenv("HF_EFFICIENT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert reference.cache_dir() == tmp_path / "xdg" / "hf_efficient" / "reference"


@pytest.fixture
def tiny_reference(monkeypatch, tmp_path):
    """A 'tiny' reference model trained for 3 steps on 24 documents, in a temporary cache."""
    full_corpus = reference_corpus

    monkeypatch.setattr(trained, "reference_corpus", lambda split, kind: full_corpus(split, kind)[:12])
    monkeypatch.setenv("HF_EFFICIENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(REFERENCE_MODELS, "tiny", TINY)
    return tmp_path / "cache"


def test_tiny_build_then_load_from_cache(tiny_reference, monkeypatch):
    assert not reference_model_path("tiny").exists()
    model, tokenizer = reference_model("tiny", progress=False)
    path = reference_model_path("tiny")
    assert path.is_dir() and path.parent == tiny_reference
    assert not [p for p in tiny_reference.iterdir() if p.name.endswith(".build")]  # temp folders are gone
    assert json.loads((path / "reference_training.json").read_text())["config"]["max_steps"] == 3
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert len(tokenizer) == model.config.vocab_size == TINY.vocab_size
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id == 0
    text = "def f(x):\n    return x  # ünïcode ✓\n\tTab"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == text
    out = model.generate(**tokenizer("import os", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[-1] > 3

    def no_training(*args, **kwargs):
        raise AssertionError("a cached reference model must not be trained again")

    monkeypatch.setattr(trained, "train_model", no_training)
    again, _ = reference_model("tiny")  # cached: loads
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    monkeypatch.setitem(REFERENCE_MODELS, "tiny", dataclasses.replace(TINY, learning_rate=1e-3))
    assert reference_model_path("tiny") != path  # a changed config is a new cache entry
    with pytest.raises(FileNotFoundError, match="not built"):
        reference_model("tiny", build=False)


def test_recipe_cli_resumes_from_checkpoint(tiny_reference, tmp_path):
    out = tmp_path / "run"
    args = ["--name", "tiny", "--output-dir", str(out), "--max-steps", "2"]
    train_reference.main(args)
    assert (out / "checkpoint-2").is_dir() and (out / "model.safetensors").is_file()
    weights = load_file(out / "model.safetensors")
    train_reference.main([*args, "--learning-rate", "0.5"])  # resumes at step 2 of 2: nothing left to train
    assert all(torch.equal(weights[k], v) for k, v in load_file(out / "model.safetensors").items())


# ----------------------------------------------------------------------------------- built reference models


@pytest.mark.reference
def test_reference_models_share_a_tokenizer_and_beat_gzip():
    from hf_efficient.eval import bits_per_byte, gzip_bits_per_byte

    target, tokenizer = reference_model("target", build=False)
    drafter, drafter_tokenizer = reference_model("drafter", build=False)
    assert tokenizer.get_vocab() == drafter_tokenizer.get_vocab()
    assert drafter.num_parameters() * 3 < target.num_parameters()
    assert target.config.num_key_value_heads < target.config.num_attention_heads
    for kind in ("code", "prose"):
        texts = [doc[:1500] for doc in reference_corpus("validation", kind)[:4]]
        assert all(tokenizer.decode(tokenizer(t)["input_ids"], skip_special_tokens=True) == t for t in texts)
        assert bits_per_byte(target, tokenizer, texts) < gzip_bits_per_byte(texts)


def test_recipe_cli_boolean_fields_override_only_when_given():
    assert train_reference.parse_args(["--output-dir", "run", "--no-bf16"]).bf16 is False
    assert train_reference.parse_args(["--output-dir", "run", "--bf16"]).bf16 is True
    assert train_reference.parse_args(["--output-dir", "run"]).bf16 is None  # the model's own setting applies
