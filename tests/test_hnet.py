"""H-Net: routing/STE/ratio loss, cached == uncached generation, batched rows == alone, training, remote code."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_efficient.compat import cache_kwarg
from hf_efficient.models import ByteTokenizer, HNetConfig, HNetForCausalLM
from hf_efficient.models.hnet.dynamic_chunking_hnet import ratio_loss
from hf_efficient.models.hnet.layers_hnet import linear_scan

TOK = ByteTokenizer()


# case matrix: the default 1-stage layout (recurrent outer stage) and a 2-stage one with windowed attention
# in the encoders/decoders and a wider inner stage (pad_dimension)
CASES = {
    "1stage": dict(
        hidden_size=[64, 96], intermediate_size=[0, 192], num_attention_heads=[2, 4], sliding_window=[8, None]
    ),
    "2stage": dict(
        arch_layout=["m1T1", ["T1m1", ["T2"], "m1T1"], "T1m1"],
        hidden_size=[48, 64, 96],
        intermediate_size=[96, 128, 192],
        num_attention_heads=[2, 2, 4],
        sliding_window=[6, 4, None],
        compression_ratio=[3.0, 3.0],
    ),
}
PROMPTS = ["def add(a, b):\n    return", "Hallo wörld, 世界", "x"]


def tiny_hnet(case: str, **overrides) -> HNetForCausalLM:
    torch.manual_seed(0)
    return HNetForCausalLM(HNetConfig(**{**CASES[case], **overrides})).eval()


def greedy(model, texts, n=24, **kwargs) -> torch.Tensor:
    batch = TOK(texts, padding=True, padding_side="left", return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=TOK.pad_token_id, **kwargs)
    return out[:, batch.input_ids.shape[1] :]


def test_linear_scan_matches_loop():
    a, b, h0 = torch.rand(2, 37, 5), torch.randn(2, 37, 5), torch.randn(2, 5)
    h, expected = h0, []
    for t in range(37):
        h = a[:, t] * h + b[:, t]
        expected.append(h)
    torch.testing.assert_close(linear_scan(a, b, h0), torch.stack(expected, 1))


def test_ratio_loss_is_minimal_at_target():
    target = 6.0
    fractions = torch.linspace(0.02, 0.98, 49)
    losses = []
    for f in fractions:  # a router whose boundary fraction F equals its mean probability G
        n = 600
        k = round(float(f) * n)
        boundary = torch.arange(n)[None] < k
        prob = torch.full((1, n), k / n)
        losses.append(ratio_loss(prob, boundary, torch.ones(1, n, dtype=torch.bool), target))
    best = fractions[int(torch.stack(losses).argmin())]
    assert abs(float(best) - 1 / target) < 0.021
    assert torch.stack(losses).min() == pytest.approx(1.0, abs=1e-3)


def test_ste_gradients_reach_the_router():
    model = tiny_hnet("2stage", ratio_loss_weight=0.0).train()
    batch = TOK(PROMPTS, padding=True, return_tensors="pt")
    out = model(**batch, labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100))
    assert out.ratio_loss is not None and out.lm_loss is not None
    out.loss.backward()
    for name, param in model.named_parameters():
        if "routing_module" in name:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", list(CASES))
def test_cached_generation_equals_uncached(case):
    model = tiny_hnet(case)
    torch.testing.assert_close(greedy(model, PROMPTS), greedy(model, PROMPTS, use_cache=False), rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_batched_rows_equal_alone_with_ragged_chunking(case):
    model = tiny_hnet(case)
    inner_batches: list[int] = []
    hook = model.model.backbone.inner.register_forward_pre_hook(lambda m, args: inner_batches.append(args[0].shape[0]))
    batched = greedy(model, PROMPTS)
    hook.remove()
    # the inner network ran on a strict subset of the rows at some steps: rows closed chunks at different bytes
    assert any(0 < b < len(PROMPTS) for b in inner_batches[1:])
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(batched[i], greedy(model, [prompt])[0], rtol=0, atol=0)


def assert_slots_compact_like_alone(model, new_cache, slot_sets) -> None:
    """Generate `PROMPTS` as a batch and each alone: for every `(KVSlots, count)` of `slot_sets(cache)`, row i's n_i
    items sit in slots 0..n_i-1 and equal the alone run's, however the rows' steps interleaved."""
    batched = new_cache()
    greedy(model, PROMPTS, **cache_kwarg(batched))
    for i, prompt in enumerate(PROMPTS):
        alone = new_cache()
        greedy(model, [prompt], **cache_kwarg(alone))
        for (slots, count), (ref_slots, ref_count) in zip(slot_sets(batched), slot_sets(alone), strict=True):
            n = int(ref_count[0])
            assert int(count[i]) >= n and slots.capacity <= 2 * (int(count.max()) + 1)
            for store, ref_store in zip(slots.keys + slots.values, ref_slots.keys + ref_slots.values, strict=True):
                torch.testing.assert_close(store[i, :, :n], ref_store[0, :, :n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_main_network_cache_is_compact_per_row(case):
    from hf_efficient.models.hnet import HNetCache

    def main_network(cache: HNetCache):
        node = cache.root
        while hasattr(node, "inner"):
            node = node.inner
        return [(node.kv, node.count)]

    assert_slots_compact_like_alone(tiny_hnet(case), HNetCache, main_network)


def test_outputs_boundaries_and_compression():
    model = tiny_hnet("2stage")
    batch = TOK(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    out = model(**batch, output_boundaries=True)
    assert len(out.boundaries) == 2 and len(out.compression) == 2
    outer = out.boundaries[0]
    assert outer.shape == batch.input_ids.shape
    assert not outer[batch.attention_mask == 0].any()
    first = batch.attention_mask.argmax(1)
    assert outer[torch.arange(3), first].all()  # the first byte of every row opens a chunk
    chunks = model.chunk_text("hello world", TOK)
    assert "".join(chunks[0]) == "hello world" and "".join(chunks[1]) == "hello world"


def test_generate_sampling_processors_stop_strings_and_beams():
    model = tiny_hnet("1stage")
    batch = TOK(["ab"], return_tensors="pt")
    torch.manual_seed(1)
    out = model.generate(**batch, max_new_tokens=12, do_sample=True, top_k=20, temperature=0.9, repetition_penalty=1.2)
    assert out.shape[1] <= batch.input_ids.shape[1] + 12
    text = TOK.decode(greedy(model, ["ab"], n=12)[0])
    stop = text[2:4] if len(text) >= 4 else text
    stopped = model.generate(**batch, max_new_tokens=12, stop_strings=[stop], tokenizer=TOK, do_sample=False)
    assert stopped.shape[1] <= batch.input_ids.shape[1] + 12
    beams = model.generate(**batch, max_new_tokens=6, num_beams=2, do_sample=False)
    assert beams.shape == (1, batch.input_ids.shape[1] + 6)


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="hidden_size"):
        HNetConfig(hidden_size=[128])
    with pytest.raises(ValueError, match="compression_ratio"):
        HNetConfig(compression_ratio=[1.0])
    with pytest.raises(ValueError, match="Tx3"):
        HNetConfig(arch_layout=["Tx3", ["T1"], "m1"])
    assert HNetConfig.from_preset("hnet_2stage_L").num_stages == 2


def test_optimizer_param_groups_scale_lr_per_stage():
    model = tiny_hnet("2stage", lr_multiplier=[3.0, 1.7, 0.9])
    groups = model.optimizer_param_groups(lr=1e-3, weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert sorted({round(g["lr"], 6) for g in groups}) == [0.0009, 0.0017, 0.003]


def check_trainer_lowers_loss(model, tmp_path, steps: int = 25) -> None:
    """A few `Trainer` steps on a tiny repetitive corpus lower the LM loss by a clear margin."""
    model.train()
    text = ("the quick brown fox jumps over the lazy dog. " * 40).encode()
    data = [{"input_ids": torch.tensor(list(text[i : i + 64])), "labels": torch.tensor(list(text[i : i + 64]))}
            for i in range(0, 64 * 16, 64)]  # fmt: skip

    def lm_loss() -> float:
        with torch.no_grad():
            ids = torch.stack([d["input_ids"] for d in data[:4]])
            out = model(input_ids=ids, labels=ids)
            return float(getattr(out, "lm_loss", None) or out.loss)

    before = lm_loss()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
        report_to=[], logging_steps=100, save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    assert lm_loss() < before - 0.5


def test_trainer_steps_lower_the_loss(tmp_path):
    check_trainer_lowers_loss(tiny_hnet("1stage"), tmp_path)


def remote_round_trip(cases: list[tuple], tmp_path) -> None:
    """Save each `(model, tokenizer, prompts)` with its tokenizer, reload all of them in ONE process where
    `hf_efficient` cannot be imported (`trust_remote_code=True`, offline), and compare greedy generations."""
    folders, expected = [], []
    for i, (model, tokenizer, prompts) in enumerate(cases):
        folder = tmp_path / f"saved{i}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
        folders.append((str(folder), prompts))
        expected.append(model.generate(**batch, max_new_tokens=8, do_sample=False).tolist())
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["hf_efficient"] = None  # any `import hf_efficient` now raises ImportError
        from transformers import AutoModelForCausalLM, AutoTokenizer
        results = []
        for folder, prompts in {folders!r}:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
            batch = tok(prompts, padding=True, padding_side="left", return_tensors="pt")
            ids = model.generate(**batch, max_new_tokens=8, do_sample=False).tolist()
            results.append({{"ids": ids, "model": type(model).__module__, "tok": type(tok).__module__}})
        leaked = sorted(m for m in sys.modules if m.startswith("hf_efficient") and sys.modules[m] is not None)
        print(json.dumps({{"results": results, "leaked": leaked}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    env["TRANSFORMERS_VERBOSITY"] = "error"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["leaked"] == []
    for result, ids in zip(out["results"], expected):
        assert result["model"].startswith("transformers_modules.") and result["tok"].startswith(
            "transformers_modules."
        )
        assert result["ids"] == ids


@pytest.mark.parametrize("family", ["hnet", "hat"])
def test_model_card_renders(family):
    from hf_efficient.hub import render_model_card

    card = str(render_model_card(family, model_id="me/tiny-byte-lm", parameters="3.9M", bits_per_byte="2.10"))
    assert "me/tiny-byte-lm" in card and "3.9M" in card and "trust_remote_code=True" in card and family in card


@pytest.mark.slow
def test_byte_benchmark_quick_run():
    from hf_efficient.bench.byte import add_noise, context_pairs, run

    assert add_noise("Hello world", rate=0.0) == "Hello world" and add_noise("Hello world", rate=1.0) != "Hello world"
    assert context_pairs(["abcdefghij"], span=2) == [("ab", "cd"), ("ef", "gh")]
    report = run(quick=True)
    assert [row["model"] for row in report.rows] == ["bpe", "hnet", "hnet2", "hat"]
    assert all(row["gen_bytes_per_s_b8"] > 0 and row["bpb_prose"] > 0 for row in report.rows)
    assert all(math.isfinite(row["bpb_ctx_noise_rise"]) for row in report.rows)


def test_streaming_generation_and_chunk_rendering(tmp_path):
    from transformers import TextStreamer

    from hf_efficient.models.byte_demo import render_chunks

    class Collect(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            pieces.append(text)

    pieces: list[str] = []
    model = tiny_hnet("1stage")
    batch = TOK(["Hallo wörld"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=16, do_sample=False, streamer=Collect(TOK, skip_prompt=True))
    assert "".join(pieces) == TOK.decode(out[0, batch.input_ids.shape[1] :])
    chunks = model.chunk_text("hello world", TOK)
    text = render_chunks(chunks, path=tmp_path / "chunks.png", color=False)
    assert text.startswith("stage 0") and "|" in text and (tmp_path / "chunks.png").stat().st_size > 0
