"""ChunkLLM adapters: exactness with selection off, selective attention consistency, training, save/load, errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from factories import ARCHITECTURES, tiny_causal_lm
from transformers import AutoModelForCausalLM

from hf_efficient.compat import cache_kwarg
from hf_efficient.models import ChunkLLMConfig, ChunkLLMForCausalLM
from hf_efficient.models.chunkllm import ChunkLLMCache


def _prompt(batch_size: int = 2, length: int = 40, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 90, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :pad] = 0
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def _chunky(backbone, **kwargs) -> ChunkLLMForCausalLM:
    """A wrapper whose untrained boundary adapter fires on roughly half of the tokens (many short chunks); a local
    window of one chunk unless `local_chunks` is given."""
    model = ChunkLLMForCausalLM.from_backbone(backbone, **{"local_chunks": 1, **kwargs})
    with torch.no_grad():
        model.boundary_adapter.out.bias.zero_()
    return model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_selection_covering_all_chunks_equals_backbone(arch):
    backbone = tiny_causal_lm(arch)
    model = _chunky(backbone, top_k_chunks=64, sink_tokens=2)
    input_ids, attention_mask = _prompt(pad=6)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids, attention_mask=attention_mask).logits,
            backbone(input_ids, attention_mask=attention_mask).logits,
        )
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(input_ids, **kwargs), backbone.generate(input_ids, **kwargs))
    assert model.kv_retention == 1.0


def test_hybrid_sliding_window_backbone_equals_backbone_past_its_window():
    from factories import tiny_hybrid_lm

    backbone = tiny_hybrid_lm(sliding_window=8)  # Gemma-3 layout: sliding and full-attention layers
    model = _chunky(backbone, top_k_chunks=64, sink_tokens=2)
    input_ids = torch.randint(3, 90, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, backbone(input_ids).logits)
    kwargs = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(input_ids, **kwargs), backbone.generate(input_ids, **kwargs))


def test_exact_with_tied_embeddings_and_default_chunking():
    backbone = tiny_causal_lm("qwen2", tie_word_embeddings=True)
    model = ChunkLLMForCausalLM.from_backbone(backbone, top_k_chunks=100_000)
    input_ids, _ = _prompt(batch_size=1)
    kwargs = dict(max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(input_ids, **kwargs), backbone.generate(input_ids, **kwargs))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefill_blocks_and_decoding_select_the_same_keys(arch):
    """The mask path (prefill, any block size) and the gather path (decoding) implement one selection rule."""
    model = _chunky(tiny_causal_lm(arch), top_k_chunks=2, sink_tokens=2)
    input_ids, attention_mask = _prompt(length=36, pad=5)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    real = attention_mask.bool()
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        assert model.kv_retention < 0.6
        cache, steps = model.new_cache(), []
        for start, end in [(0, 20), *((t, t + 1) for t in range(20, 36))]:
            out = model(
                input_ids[:, start:end],
                attention_mask=attention_mask[:, :end],
                position_ids=position_ids[:, start:end],
                **cache_kwarg(cache),
                use_cache=True,
            )
            steps.append(out.logits)
        model.config.prefill_block_size = 7
        blocks = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(blocks[real], full[real], rtol=1e-4, atol=1e-4)
    backbone_logits = model.backbone(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    assert not torch.allclose(full[real], backbone_logits[real], atol=1e-3)  # selection is really on


@pytest.mark.parametrize(("local_chunks", "expected"), [(0, [0]), (2, [0, 3, 4]), (9, [0, 1, 2, 3, 4])])
def test_local_window_is_kept_besides_the_top_k(local_chunks, expected):
    """The `local_chunks` chunks before the query's own are kept whatever their score; top-k picks among older ones."""
    cache = ChunkLLMCache(num_hidden_layers=1, top_k_chunks=1, sink_tokens=0, local_chunks=local_chunks)
    cache.chunk_sizes = torch.ones(1, 6, dtype=torch.long)
    chunk_keys = torch.zeros(1, 1, 6, 2)  # (B, H_kv, C, d)
    chunk_keys[..., 0, 0] = 10.0  # chunk 0 scores highest, the recent chunks lowest
    chunk_keys[..., 3:, 0] = -10.0
    cache.chunk_key_sums = [chunk_keys]
    selected = cache.select_chunks(0, torch.tensor([1.0, 0.0]).view(1, 1, 1, 2), torch.tensor([[5]]))
    assert selected[0, 0, 0].nonzero().flatten().tolist() == expected


def test_local_window_raises_retention_and_is_counted():
    backbone = tiny_causal_lm("llama")
    input_ids, _ = _prompt(length=40)
    retention = []
    for local_chunks in (0, 2):
        model = _chunky(backbone, top_k_chunks=1, sink_tokens=1, local_chunks=local_chunks)
        with torch.no_grad():
            model(input_ids)
        retention.append(model.kv_retention)
    assert retention[0] < retention[1] < 1.0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cached_decode_selection_equals_a_fresh_gather(arch):
    """Decoding steps reuse the keys/values gathered at the chunk start; re-gathering every step gives the same."""
    model = _chunky(tiny_causal_lm(arch), top_k_chunks=2, sink_tokens=1)
    input_ids, attention_mask = _prompt(length=16, pad=3)
    logits, reused = [], 0
    with torch.no_grad():
        for fresh in (False, True):
            cache, ids, mask, steps = model.new_cache(), input_ids, attention_mask, []
            for _ in range(20):
                out = model(ids, attention_mask=mask, **cache_kwarg(cache), use_cache=True)
                steps.append(out.logits[:, -1])
                ids = out.logits[:, -1:].argmax(dim=-1)
                mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
                if fresh:
                    cache.decode_kv = [None] * len(cache.decode_kv)
                else:
                    reused += sum(entry is not None for entry in cache.decode_kv)
            logits.append(torch.stack(steps))
    assert reused > 0 and model.kv_retention < 1.0
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_cache_layers_append_in_place_and_equal_concatenation():
    """Keys/values grow inside a buffer with spare room (no whole-cache copy per token), equal to `torch.cat`."""
    from hf_efficient.models.chunkllm.cache_chunkllm import ChunkLLMLayer

    layer, chunks = ChunkLLMLayer(), [torch.randn(2, 3, n, 4) for n in (5, 1, 1, 300, 1)]
    pointers = []
    for i, chunk in enumerate(chunks):
        keys, values = layer.update(chunk, -chunk)
        expected = torch.cat(chunks[: i + 1], dim=2)
        assert torch.equal(keys, expected) and torch.equal(values, -expected)
        assert layer.get_seq_length() == expected.shape[2]
        pointers.append(keys.data_ptr())
    assert pointers[0] == pointers[1] == pointers[2] != pointers[3] == pointers[4]  # grown once, at the 300
    layer.batch_select_indices(torch.tensor([1]))  # replaced keys: the next update starts a new buffer
    keys, _ = layer.update(torch.ones(1, 3, 1, 4), torch.ones(1, 3, 1, 4))
    assert torch.equal(keys, torch.cat([torch.cat(chunks, dim=2)[1:], torch.ones(1, 3, 1, 4)], dim=2))


def test_copied_cache_decodes_like_the_original():
    """The decode benchmark times copies of one prefilled cache: a deep copy must continue exactly alike."""
    import copy

    model = _chunky(tiny_causal_lm("llama"), top_k_chunks=2, sink_tokens=1)
    input_ids, _ = _prompt(batch_size=1, length=30)
    runs = []
    with torch.no_grad():
        cache = model.new_cache()
        first = model(input_ids, **cache_kwarg(cache), use_cache=True).logits[:, -1:].argmax(dim=-1)
        for copied in (copy.deepcopy(cache), cache):
            token, steps = first, []
            for _ in range(12):
                logits = model(token, **cache_kwarg(copied), use_cache=True).logits
                token = logits[:, -1:].argmax(dim=-1)
                steps.append(logits)
            runs.append(torch.cat(steps, dim=1))
    assert model.kv_retention < 1.0
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_wrappers_sharing_a_backbone_keep_their_own_adapters():
    backbone = tiny_causal_lm("llama")
    first = _chunky(backbone, top_k_chunks=2, sink_tokens=2)
    input_ids, _ = _prompt(length=40)
    with torch.no_grad():
        before = first(input_ids).logits
        second = _chunky(backbone, top_k_chunks=2, sink_tokens=2)  # other random adapters, same backbone
        assert torch.equal(first(input_ids).logits, before)
        assert not torch.equal(second(input_ids).logits, before)


def test_cache_tracks_chunks_and_refuses_crop():
    model = _chunky(tiny_causal_lm("llama"), top_k_chunks=1, sink_tokens=3)
    input_ids, attention_mask = _prompt(length=30, pad=4)
    cache = model.new_cache()
    with torch.no_grad():
        model(input_ids, attention_mask=attention_mask, **cache_kwarg(cache), use_cache=True)
    assert cache.get_seq_length() == 30
    assert (cache.chunk_of[0, :4] == -1).all() and (cache.chunk_of[0, 4:] >= 0).all()
    assert cache.is_sink.sum(dim=1).tolist() == [3, 3] and cache.is_sink[0, 4:7].all()
    fires = model.boundary_probabilities(input_ids) > 0.5
    expected = (fires[1, :-1].long().cumsum(0) + 0).tolist()  # row 1 has no padding: chunk = boundaries before
    assert cache.chunk_of[1, 1:].tolist() == expected and cache.chunk_of[1, 0] == 0
    assert 0.0 < cache.kv_retention < 1.0
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)


def test_foreign_cache_is_refused():
    from transformers import DynamicCache

    model = ChunkLLMForCausalLM.from_backbone(tiny_causal_lm("llama"))
    with pytest.raises(ValueError, match="not a ChunkLLMCache"):
        model(torch.tensor([[5, 6, 7]]), **cache_kwarg(DynamicCache()))


def test_only_adapters_receive_gradients():
    model = ChunkLLMForCausalLM.from_backbone(tiny_causal_lm("mistral"), top_k_chunks=2)
    input_ids, _ = _prompt(length=32)
    boundary_labels = (input_ids % 5 == 0).float()
    loss = model(input_ids, boundary_labels=boundary_labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        if name.startswith("backbone."):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("target", ["chunk", "token"])
def test_distillation_trains_the_queries_that_select(target):
    """ "chunk" distils only each chunk's first token (where inference selects) on its chunk's mean attention;
    "token" distils every token with at least two candidate chunks."""
    from hf_efficient.models.chunkllm.modeling_chunkllm import ChunkLLMDistillation

    generator = torch.Generator().manual_seed(0)
    labels = torch.zeros(1, 24)
    labels[0, 2::3] = 1  # chunks of 3 tokens: [0, 1, 2], [3, 4, 5], ...
    distillation = ChunkLLMDistillation(labels, local_chunks=1, target=target)
    queries = torch.randn(1, 1, 24, 8, generator=generator, requires_grad=True)  # (B, H_kv, L, d)
    distillation.adapter_states[0] = (queries, torch.randn(1, 1, 24, 8, generator=generator))
    query, key = torch.randn(1, 2, 24, 16, generator=generator), torch.randn(1, 1, 24, 16, generator=generator)
    distillation.add_layer(query, key, scaling=0.25, groups=2, layer_idx=0)
    distillation.losses[0].backward()
    trained = queries.grad[0, 0].abs().sum(dim=-1) > 0  # (L,)
    enough = torch.arange(24) // 3 >= 3  # >= 2 candidates: chunks older than the local one
    expected = enough & (torch.arange(24) % 3 == 0) if target == "chunk" else enough
    assert torch.equal(trained, expected)


def test_boundary_adapter_learns_rule_boundaries(tmp_path):
    """Train with the recipe on a tiny corpus; the boundary adapter then fires on the rule's boundaries."""
    from factories import tiny_tokenizer

    from hf_efficient.recipes.train_chunkllm import boundary_label_table, main

    tokenizer = tiny_tokenizer()
    backbone = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    backbone.save_pretrained(tmp_path / "backbone")
    tokenizer.save_pretrained(tmp_path / "backbone")
    text = "The cache keeps chunks. Each chunk ends here!\nA new line starts? Yes.\n" * 40
    (tmp_path / "corpus.txt").write_text(text)
    main(
        [
            f"--backbone={tmp_path / 'backbone'}",
            f"--text-file={tmp_path / 'corpus.txt'}",
            f"--output-dir={tmp_path / 'out'}",
            "--max-steps=25",
            "--seq-len=48",
            "--batch-size=4",
            "--learning-rate=2e-2",
        ]
    )
    assert "ChunkLLM" in (tmp_path / "out" / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert isinstance(model, ChunkLLMForCausalLM)
    ids = tokenizer(text[:300], return_tensors="pt").input_ids
    labels = boundary_label_table(tokenizer, "sentence")[ids]
    fires = model.boundary_probabilities(ids) > model.config.boundary_threshold
    assert labels.any() and torch.equal(fires, labels.bool())


def _saved_backbone(path, arch: str = "qwen2", **overrides) -> str:
    """A tiny backbone written to `path` (adapter checkpoints name their backbone's folder)."""
    tiny_causal_lm(arch, **overrides).save_pretrained(path)
    return str(path)


def test_checkpoint_holds_the_adapters_only_and_reloads_exactly(tmp_path):
    """`save_pretrained` writes the adapters and `base_model_name_or_path`; `AutoModelForCausalLM.from_pretrained`
    loads that backbone and attaches them: the same logits, bit for bit; the file is the size of the adapters."""
    backbone = _saved_backbone(tmp_path / "backbone", hidden_size=64, intermediate_size=256, vocab_size=1000)
    model = _chunky(backbone, top_k_chunks=2, sink_tokens=2, adapter_dim=8)
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["base_model_name_or_path"] == backbone
    size = (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.adapter_state_dict().values())
    backbone_bytes = sum(p.numel() * p.element_size() for p in model.backbone.parameters())
    assert adapter_bytes <= size < adapter_bytes + 16_384  # the adapters plus the safetensors header
    assert size * 10 < backbone_bytes
    assert set(model.adapter_state_dict()) == {n for n, p in model.named_parameters() if p.requires_grad}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded, ChunkLLMForCausalLM) and not loaded.training and loaded.config.top_k_chunks == 2
    input_ids, attention_mask = _prompt(length=40, pad=3)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
        torch.testing.assert_close(loaded(input_ids, attention_mask=attention_mask).logits, expected, rtol=0, atol=0)
    assert loaded.kv_retention == model.kv_retention < 1.0
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(loaded.generate(input_ids, **kwargs), model.generate(input_ids, **kwargs))

    # config fields override the saved ones; `backbone=` attaches the adapters to a model already in memory
    wide = ChunkLLMForCausalLM.from_pretrained(tmp_path / "ckpt", top_k_chunks=64, backbone=model.backbone)
    assert (
        wide.config.top_k_chunks == 64
        and json.loads((tmp_path / "ckpt" / "config.json").read_text())["top_k_chunks"] == 2
    )
    with torch.no_grad():
        assert torch.equal(wide(input_ids).logits, model.backbone(input_ids).logits)  # every chunk selected


def test_bfloat16_checkpoint_reloads_exactly(tmp_path):
    """Adapters saved in bfloat16 come back in bfloat16 on the bfloat16 backbone: the same logits, bit for bit."""
    backbone = _saved_backbone(tmp_path / "backbone", "mistral", dtype=torch.bfloat16)
    model = _chunky(backbone, top_k_chunks=2, sink_tokens=2)
    model.qk_adapters.to(torch.bfloat16)
    model.boundary_adapter.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.backbone.dtype == loaded.qk_adapters[0].q_proj.weight.dtype == torch.bfloat16
    input_ids, _ = _prompt(length=40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_whole_model_checkpoint_stays_an_option(tmp_path):
    backbone = _saved_backbone(tmp_path / "backbone", "llama")
    model = _chunky(backbone, top_k_chunks=2, sink_tokens=2)
    model.save_pretrained(tmp_path / "full", adapters_only=False)
    full = (tmp_path / "full" / "model.safetensors").stat().st_size
    assert full > sum(p.numel() * p.element_size() for p in model.backbone.parameters())
    shutil.rmtree(tmp_path / "backbone")  # the checkpoint needs nothing else
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    input_ids, _ = _prompt(length=40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="holds its backbone"):
        ChunkLLMForCausalLM.from_pretrained(tmp_path / "full", backbone=model.backbone)


def test_adapter_checkpoint_errors_name_the_fix(tmp_path):
    model = _chunky(tiny_causal_lm("llama"), top_k_chunks=2)  # built in memory: no backbone path to record
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="pass `backbone=`"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    loaded = ChunkLLMForCausalLM.from_pretrained(tmp_path / "ckpt", backbone=tiny_causal_lm("llama"))
    input_ids, _ = _prompt(length=30)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    with pytest.raises(ValueError, match=r"num_hidden_layers=2, but .* has num_hidden_layers=1"):
        ChunkLLMForCausalLM.from_pretrained(tmp_path / "ckpt", backbone=tiny_causal_lm("llama", num_hidden_layers=1))


def test_configs_saved_with_the_old_field_name_still_load():
    config = ChunkLLMConfig.from_dict({"backbone_name_or_path": "some/backbone", "top_k_chunks": 3})
    assert config.base_model_name_or_path == "some/backbone" and "backbone_name_or_path" not in config.to_dict()


def test_remote_code_loads_without_hf_efficient(tmp_path):
    backbone = _saved_backbone(tmp_path / "backbone", "llama", tie_word_embeddings=True)
    model = _chunky(backbone, top_k_chunks=2, sink_tokens=2)
    model.save_pretrained(tmp_path / "ckpt")
    assert {"configuration_chunkllm.py", "modeling_chunkllm.py", "cache_chunkllm.py", "backbone_chunkllm.py"} <= {
        p.name for p in (tmp_path / "ckpt").iterdir()
    }
    input_ids, _ = _prompt(length=40)
    with torch.no_grad():
        expected = model.generate(input_ids, max_new_tokens=8, do_sample=False)
    torch.save(input_ids, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_efficient"] = None  # not importable in this process
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(model.backbone).__name__ == "LlamaForCausalLM"
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        torch.save(out, {str(tmp_path / "out.pt")!r})
        print("retention", model.kv_retention)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


@pytest.mark.slow
def test_four_bit_backbone_trains_adapters(tmp_path):
    from transformers import BitsAndBytesConfig

    tiny_causal_lm("llama", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = ChunkLLMForCausalLM.from_backbone(
        tmp_path, top_k_chunks=2, backbone_kwargs={"quantization_config": quantization}
    )
    assert type(model.backbone.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    input_ids, _ = _prompt(length=32)
    with pytest.raises(ValueError, match="quantized backbone"):
        model.save_pretrained(tmp_path / "whole", adapters_only=False)
    model.save_pretrained(tmp_path / "adapters")  # the adapters; the config names the full-precision backbone
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "adapters", quantization_config=quantization)
    assert type(loaded.backbone.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():  # (both before any training-mode call: bitsandbytes' CPU inference path packs the weights)
        torch.testing.assert_close(loaded(input_ids).logits, model.eval()(input_ids).logits, rtol=0, atol=0)
    model.train()
    model(input_ids, boundary_labels=(input_ids % 4 == 0).float()).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.boundary_adapter.up.weight.grad is not None
    assert model.generate(input_ids, max_new_tokens=4, do_sample=False).shape == (2, 36)
    assert model.kv_retention < 1.0


def test_backbones_without_rotary_attention_or_kv_cache_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel, ModernBertConfig, ModernBertForMaskedLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ValueError, match="rotary attention"):
        ChunkLLMForCausalLM.from_backbone(gpt2)
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    bert = ModernBertForMaskedLM(
        ModernBertConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, **special
        )
    )
    with pytest.raises(ValueError, match="KV cache"):
        ChunkLLMForCausalLM.from_backbone(bert)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_k_chunks", 0),
        ("sink_tokens", -1),
        ("local_chunks", -1),
        ("boundary_threshold", 1.0),
        ("adapter_dim", 0),
        ("distillation_target", "chunks"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        ChunkLLMConfig(**{field: value})


def test_cache_is_a_cache():
    cache = ChunkLLMCache(num_hidden_layers=2, top_k_chunks=4, sink_tokens=1)
    assert cache.get_seq_length() == 0 and cache.kv_retention == 1.0


@pytest.mark.parametrize(("layout", "ending"), [("inline", '= "'), ("question", '?\n"')])
def test_retrieval_probe_is_multiple_choice_and_deterministic(layout, ending):
    from factories import tiny_tokenizer

    from hf_efficient.bench.chunkllm import _retrieval, _retrieval_items

    tokenizer = tiny_tokenizer()
    filler = torch.randint(3, 200, (1, 120), generator=torch.Generator().manual_seed(0))
    items = _retrieval_items(tokenizer, filler, n=3, choices=4, layout=layout)
    again = _retrieval_items(tokenizer, filler, n=3, choices=4, layout=layout)
    for (prompt, choices, answer, needle), (prompt2, choices2, answer2, _) in zip(items, again):
        assert torch.equal(prompt, prompt2) and answer == answer2 and len(choices) == 4
        assert all(torch.equal(c, c2) for c, c2 in zip(choices, choices2))
        assert prompt.shape[1] == 120 and tokenizer.decode(prompt[0, -4:]).endswith(ending)
        value = tokenizer.decode(choices[answer][0]).rstrip('"')
        assert value in tokenizer.decode(prompt[0, needle])  # the needle covers the planted right value
        assert torch.equal(needle, torch.arange(int(needle[0]), int(needle[-1]) + 1))  # one contiguous span
    backbone = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    accuracy, needle_kept = _retrieval(backbone, lambda: None, items)
    # accuracy is the share of items whose right value has the highest log-likelihood, recomputed by hand here
    with torch.no_grad():
        right = 0
        for prompt, choices, answer, _ in items:
            scores = []
            for choice in choices:
                doc = torch.cat([prompt, choice], dim=1)
                logprobs = backbone(doc).logits[0, prompt.shape[1] - 1 : -1].log_softmax(-1)  # (n, V)
                scores.append(float(logprobs.gather(1, choice[0, :, None]).sum()))
            right += max(range(len(scores)), key=scores.__getitem__) == answer
    assert accuracy == right / len(items) and needle_kept == 1.0
    # ChunkLLM selecting every chunk reads what full attention reads: the same choices, the whole needle
    everything = _chunky(backbone, top_k_chunks=256, sink_tokens=1)  # more than the prompt has chunks
    assert _retrieval(everything, everything.new_cache, items) == (accuracy, 1.0)
    # selecting 2 chunks of many keeps the needle in fewer (layer, KV head) pairs
    few = _chunky(backbone, top_k_chunks=2, sink_tokens=1)
    assert _retrieval(few, few.new_cache, items)[1] < 1.0


def test_needle_kept_follows_what_each_cache_keeps():
    """StreamingLLM with a window shorter than the distance to the needle never keeps it; a window covering the
    whole prompt always does; ChunkLLM with top-k covering every chunk keeps it in every layer and head."""
    from factories import tiny_tokenizer

    from hf_efficient.bench.chunkllm import _retrieval, _retrieval_items
    from hf_efficient.cache import StreamingCache

    tokenizer = tiny_tokenizer()
    filler = torch.randint(3, 200, (1, 160), generator=torch.Generator().manual_seed(1))
    items = _retrieval_items(tokenizer, filler, n=2, choices=4)
    backbone = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    _, short = _retrieval(backbone, lambda: StreamingCache(config=backbone.config, sink_tokens=1, window=16), items)
    _, whole = _retrieval(backbone, lambda: StreamingCache(config=backbone.config, sink_tokens=1, window=200), items)
    model = _chunky(tiny_causal_lm("llama", vocab_size=len(tokenizer)), top_k_chunks=10**4, sink_tokens=1)
    assert short == 0.0 and whole == 1.0 and _retrieval(model, model.new_cache, items)[1] == 1.0


@pytest.mark.reference
@pytest.mark.slow
def test_benchmark_quick_run():
    from hf_efficient.bench import chunkllm

    report = chunkllm.run(quick=True)
    methods = [row["method"] for row in report.rows]
    chunk_rows = [row for row in report.rows if row["method"].startswith("ChunkLLM k=")]
    assert methods[0] == "full attention" and methods[-2:] == ["StreamingLLM", "SnapKV"]
    assert chunk_rows and all(0.0 < row["retrieval_kv_retention"] < 1.0 for row in chunk_rows)
    assert all(0.0 < row["kv_retention"] < 1.0 for row in chunk_rows if "kv_retention" in row)
    for row in report.rows[2:]:  # every method but full attention (and its StaticCache row) on both probe layouts
        assert all(
            0.0 <= row[f"{column}_{layout}"] <= 1.0
            for column in ("retrieval", "needle_kept")
            for layout in chunkllm.LAYOUTS
        )
    assert any(note.startswith("ChunkLLM k=") and "on the retrieval backbone" in note for note in report.notes)


def test_from_backbone_leaves_the_backbone_alone():
    """Wrapping neither switches the backbone's attention, freezes it, hooks it nor copies its weights; plain and
    speculative generation on it afterwards give what they gave before."""
    from hf_efficient.speculative import TokenRecycling

    backbone = tiny_causal_lm("llama")
    input_ids, attention_mask = _prompt(pad=5)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False)
    before = backbone.generate(**kwargs)
    model = _chunky(backbone, top_k_chunks=2)
    assert backbone.config._attn_implementation == "sdpa"
    assert all(parameter.requires_grad for parameter in backbone.parameters())
    assert not any(module._forward_pre_hooks for module in backbone.modules())
    shared = {p.data_ptr() for p in backbone.parameters()}
    assert {p.data_ptr() for p in model.backbone.parameters()} == shared  # one copy of the weights
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.generate(**kwargs)  # the wrapper runs its own chunk-selective attention
    assert model.backbone.config._attn_implementation == "chunkllm"
    assert torch.equal(backbone.generate(**kwargs), before)
    assert torch.equal(backbone.generate(**kwargs, custom_generate=TokenRecycling()), before)
