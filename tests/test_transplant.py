"""transplant_tokenizer: shared rows copied, FVT means, OMP codes, untied heads, plain save/load."""

import inspect
import os

import pytest
import torch
from factories import tiny_causal_lm, tiny_tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from hf_efficient.tokenization import transplant_tokenizer
from hf_efficient.tokenization.transplant import batched_omp
from hf_efficient.tokenization.vocabulary import decompose


@pytest.fixture(scope="module")
def new_tokenizer():
    """A byte-level BPE trained on other text than `tiny_tokenizer`: some tokens shared, many new."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=["<s>", "</s>", "<pad>"],  # same roles, other ids
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([inspect.getdoc(m) or "" for m in (os, os.path, inspect, torch.nn.Module)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def old_tokenizer():
    return tiny_tokenizer()


def _shared_and_new(old, new):
    old_vocab = old.get_vocab()
    # ordered by new id: `get_vocab()` iterates in an order that changes from process to process
    shared = dict(sorted((i, old_vocab[t]) for t, i in new.get_vocab().items() if t in old_vocab))
    fresh = [i for i in range(len(new)) if i not in shared]
    return shared, fresh


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("method", ["fvt", "omp"])
def test_rows_and_plain_round_trip(tmp_path, old_tokenizer, new_tokenizer, method, tie):
    model = tiny_causal_lm("llama", vocab_size=len(old_tokenizer), tie_word_embeddings=tie)
    result = transplant_tokenizer(model, old_tokenizer, new_tokenizer, method=method, k=4)
    assert result.config.vocab_size == len(new_tokenizer) and result.config.bos_token_id == new_tokenizer.bos_token_id
    emb_in, old_in = result.get_input_embeddings().weight, model.get_input_embeddings().weight
    assert emb_in.shape == (len(new_tokenizer), model.config.hidden_size) and torch.isfinite(emb_in).all()
    shared, fresh = _shared_and_new(old_tokenizer, new_tokenizer)
    assert len(shared) > 200 and len(fresh) > 20
    for new_id, old_id in list(shared.items())[:50]:
        torch.testing.assert_close(emb_in[new_id], old_in[old_id])
    torch.testing.assert_close(emb_in[new_tokenizer.eos_token_id], old_in[old_tokenizer.eos_token_id])  # by role
    token = next(i for i in fresh if len(decompose(old_tokenizer, [new_tokenizer.convert_ids_to_tokens(i)])[0]) > 1)
    pieces = decompose(old_tokenizer, [new_tokenizer.convert_ids_to_tokens(token)])[0]
    if method == "fvt":
        torch.testing.assert_close(emb_in[token], old_in[pieces].mean(0))
    head, old_head = result.get_output_embeddings().weight, model.get_output_embeddings().weight
    assert (head.data_ptr() == emb_in.data_ptr()) == tie
    if not tie:
        torch.testing.assert_close(head[new_tokenizer.eos_token_id], old_head[old_tokenizer.eos_token_id])
        assert not torch.allclose(head[token], emb_in[token])

    result.save_pretrained(tmp_path)
    new_tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no trust_remote_code: a plain Llama
    assert type(loaded) is type(model) and "auto_map" not in loaded.config.to_dict()
    for name, tensor in result.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)
    inputs = new_tokenizer("the path", return_tensors="pt")
    out = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_donor_omp_recovers_sparse_codes(old_tokenizer, new_tokenizer):
    model = tiny_causal_lm("qwen2", vocab_size=len(old_tokenizer))
    donor = tiny_causal_lm("llama", vocab_size=len(new_tokenizer), seed=3)
    shared, fresh = _shared_and_new(old_tokenizer, new_tokenizer)
    (a, a_old), (b, b_old) = list(shared.items())[10:12]
    with torch.no_grad():
        donor_table = donor.get_input_embeddings().weight
        donor_table[fresh[0]] = 0.5 * donor_table[a] - 2.0 * donor_table[b]
    result = transplant_tokenizer(model, old_tokenizer, new_tokenizer, method="omp", donor=donor, k=2)
    old_table = model.get_input_embeddings().weight
    expected = 0.5 * old_table[a_old] - 2.0 * old_table[b_old]
    torch.testing.assert_close(result.get_input_embeddings().weight[fresh[0]], expected, atol=1e-4, rtol=1e-4)


def test_batched_omp_exact_on_sparse_signals():
    generator = torch.Generator().manual_seed(0)
    atoms = torch.randn(50, 64, generator=generator, dtype=torch.float64)  # incoherent enough for exact recovery
    idx = torch.stack([torch.randperm(50, generator=generator)[:3] for _ in range(40)])  # (40, 3)
    coef = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    targets = torch.einsum("bk,bkd->bd", coef, atoms[idx])
    found_idx, found_coef = batched_omp(targets, atoms, k=3, chunk_size=16)
    torch.testing.assert_close(torch.einsum("bk,bkd->bd", found_coef, atoms[found_idx]), targets)


def test_bad_arguments(old_tokenizer, new_tokenizer):
    model = tiny_causal_lm("llama", vocab_size=len(old_tokenizer))
    with pytest.raises(ValueError, match="method"):
        transplant_tokenizer(model, old_tokenizer, new_tokenizer, method="mean")
    with pytest.raises(ValueError, match="donor"):
        transplant_tokenizer(model, old_tokenizer, new_tokenizer, donor=tiny_causal_lm("llama", vocab_size=64))


@pytest.mark.real
@pytest.mark.slow  # ~1 min of CPU: MiniLM and SmolLM2-135M-Instruct (ByteLevelSampler: seconds per byte)
def test_benchmark_quick_run():
    from hf_efficient.bench import tokenization

    report = tokenization.run(quick=True)
    parts = {row["part"] for row in report.rows}
    assert {"a MiniLM", "b SmolLM2 prefill", "c transplant", "d mid-word prompts", "e merge speed"} <= parts
    assert all(row["value"] == row["value"] for row in report.rows)  # no NaN
    prefill = [row for row in report.rows if row["part"] == "b SmolLM2 prefill"]
    assert {row["method"] for row in prefill} >= {"original", "FVT"}
    assert all(row["speedup"] > 0 for row in prefill)  # interleaved prefill timing on every setting
    assert "test split" in report.setup and "SmolLM2-135M-Instruct" in report.setup and "bfloat16" in report.setup
