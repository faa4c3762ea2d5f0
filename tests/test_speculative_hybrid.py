"""Hybrid drafting (retrieval chain + Token Recycling) and the cost model that plans every step's draft.

The hybrid joins the shared case matrix of `test_speculative.py` (lossless greedy and sampling), then its own
behaviour: retrieval across calls, state round-trips, plain steps when drafting cannot pay, windowed models.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import test_speculative
import torch
from factories import ARCHITECTURES, tiny_causal_lm, tiny_hybrid_lm
from test_speculative import _prompts

from hf_efficient.reference import cache_dir
from hf_efficient.speculative import ForwardCostModel, HybridRecycling, SpeculativeDecoder, TokenRecycling
from hf_efficient.speculative import cost_model as cost_model_module
from hf_efficient.speculative.cost_model import cost_cache_file, forward_seconds, model_key, plan_draft

# forward times that make drafting pay (flat in tokens): plans do not depend on this machine's timings
CHEAP = ForwardCostModel(costs={1: 1.0, 64: 1.5})

# the hybrid's rows of the shared matrix (the shared greedy check reads its strategies from `DRAFTERS`)
test_speculative.DRAFTERS.update(
    {
        "hybrid": lambda target, arch: HybridRecycling(topk=4, tree=12),
        "hybrid-auto": lambda target, arch: HybridRecycling(cost_model=CHEAP),
    }
)


@pytest.mark.parametrize(
    "drafter, arch, dtype, batch",
    [
        *itertools.product(["hybrid"], ARCHITECTURES, [torch.float32, torch.bfloat16], [1, 3]),
        *itertools.product(["hybrid-auto"], ARCHITECTURES, [torch.float32], [1, 3]),
    ],
)
def test_hybrid_greedy_equals_plain_generate(drafter, arch, dtype, batch):
    test_speculative.test_greedy_equals_plain_generate(drafter, arch, dtype, batch)


def test_hybrid_sampling_is_lossless_chi_square():
    """Chain drafts are deterministic picks, verified by the same rejection sampling: outputs keep the target's
    distribution (the exact one is enumerated by `test_speculative._exact_distribution`)."""

    vocab, n, steps = 8, 3000, 3
    target = tiny_causal_lm("llama", vocab_size=vocab)
    target.generation_config.pad_token_id = 0
    strategy = HybridRecycling(topk=3, tree=4, warm_start=False, suffix_min_match=1)
    prompt = torch.tensor([[1, 5, 3, 7, 4]])
    torch.manual_seed(1)
    target.generate(prompt.repeat(64, 1), do_sample=True, max_new_tokens=8, custom_generate=strategy)  # a session
    out = target.generate(
        prompt.repeat(n, 1), do_sample=True, temperature=0.7, top_k=5, max_new_tokens=steps, custom_generate=strategy
    )
    assert strategy.stats.mean_accepted > 1.1 and strategy.stats.draft_tokens > 4 * n  # chains were drafted
    with torch.no_grad():
        exact = test_speculative._exact_distribution(target, prompt, steps, 0.7, 5, eos=2)
    test_speculative.assert_sampled_like(out[:, prompt.shape[1] :].tolist(), exact, steps)


def test_a_repeated_request_is_copied_from_the_session():
    """The session index holds the first call's prompt and output: asking again drafts the whole answer, so every
    forward accepts the full chain (16 tokens) plus the target's own token."""
    target = tiny_causal_lm("llama")
    inputs = _prompts(1)
    kwargs = dict(max_new_tokens=40, min_new_tokens=40, do_sample=False)
    expected = target.generate(**inputs, **kwargs)
    strategy = HybridRecycling(topk=4, tree=4, suffix_draft_tokens=16)
    assert torch.equal(target.generate(**inputs, **kwargs, custom_generate=strategy), expected)
    assert torch.equal(target.generate(**inputs, **kwargs, custom_generate=strategy), expected)
    assert strategy.stats.steps <= 1 + math.ceil(39 / 17)  # the prefill, then at least 17 tokens per forward
    alone = HybridRecycling(topk=4, tree=4, suffix_draft_tokens=16, suffix_session_tokens=0)
    target.generate(**inputs, **kwargs, custom_generate=alone)
    target.generate(**inputs, **kwargs, custom_generate=alone)
    assert alone.stats.steps > strategy.stats.steps  # without a session, only the row's own context is searched


def test_hybrid_state_save_pretrained_load_reset(tmp_path):
    target = tiny_causal_lm("qwen2")
    with torch.inference_mode():  # state made under inference mode keeps working outside it
        strategy = HybridRecycling(topk=4, tree="auto", cost_model=CHEAP, suffix_draft_tokens=12, suffix_min_match=3)
        target.generate(**_prompts(3, seed=0), max_new_tokens=24, custom_generate=strategy)
    target.generate(**_prompts(3, seed=1), max_new_tokens=24, custom_generate=strategy)
    strategy.save_pretrained(tmp_path)
    loaded = SpeculativeDecoder.from_pretrained(tmp_path)
    assert type(loaded) is HybridRecycling
    assert (loaded.suffix_draft_tokens, loaded.suffix_min_match, loaded.tree) == (12, 3, "auto")
    assert loaded.suffix.tokens == strategy.suffix.tokens and len(loaded.suffix.tokens) > 3 * 34  # both calls' rows
    assert torch.equal(loaded.chain_trials, strategy.chain_trials) and loaded.chain_acceptance != _prior_chain()
    assert torch.equal(loaded.adjacency, strategy.adjacency.cpu()) and torch.equal(loaded.seen, strategy.seen)
    assert loaded.rank_acceptance == strategy.rank_acceptance
    assert loaded.forward_costs == strategy.forward_costs
    # the same state decodes the same way: same drafts, same verification counts
    expected = target.generate(**_prompts(3, seed=2), max_new_tokens=24, custom_generate=strategy)
    assert torch.equal(target.generate(**_prompts(3, seed=2), max_new_tokens=24, custom_generate=loaded), expected)
    assert (loaded.stats.steps, loaded.stats.draft_tokens) == (strategy.stats.steps, strategy.stats.draft_tokens)
    assert strategy.stats.draft_seconds > 0

    strategy.save(tmp_path / "state.safetensors")
    again = HybridRecycling(suffix_draft_tokens=4).load(tmp_path / "state.safetensors")
    assert again.suffix.tokens == strategy.suffix.tokens and again.suffix_draft_tokens == 12
    again.reset()
    assert again.adjacency is None and again.suffix.tokens == [] and again.chain_acceptance == _prior_chain(12)

    recycling = TokenRecycling(topk=4, tree=8)  # a Token Recycling state warms a hybrid
    target.generate(**_prompts(1), max_new_tokens=8, custom_generate=recycling)
    recycling.save(tmp_path / "recycling.safetensors")
    warmed = HybridRecycling(tree=8).load(tmp_path / "recycling.safetensors")
    assert torch.equal(warmed.adjacency, recycling.adjacency) and warmed.suffix.tokens == [] and warmed.topk == 4
    expected = target.generate(**_prompts(1, seed=4), max_new_tokens=8)
    assert torch.equal(target.generate(**_prompts(1, seed=4), max_new_tokens=8, custom_generate=warmed), expected)


def _prior_chain(depth: int = 12) -> list[list[float]]:
    return HybridRecycling(suffix_draft_tokens=depth).chain_acceptance


@pytest.mark.parametrize("strategy", ["recycling", "hybrid"])
@pytest.mark.parametrize("batch", [1, 3])
def test_plain_steps_when_drafting_cannot_pay(strategy, batch):
    """With verification of more than one token per row made very expensive, the plan drafts nothing: exactly
    plain generate's forwards and output, while the acceptance statistics keep being measured."""
    target = tiny_causal_lm("llama")
    inputs = _prompts(batch)
    kwargs = dict(max_new_tokens=20, do_sample=False)
    forwards = []
    hook = target.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        expected = target.generate(**inputs, **kwargs)
        plain = len(forwards)
        cls = HybridRecycling if strategy == "hybrid" else TokenRecycling
        # a forward verifying more than one token per row takes a second: every step must be a plain one
        decoder = cls(cost_model=ForwardCostModel(costs={batch: 1e-3, batch + 1: 1.0}))
        trials = sum(decoder.rank_trials)
        forwards.clear()
        out = target.generate(**inputs, **kwargs, custom_generate=decoder)
    finally:
        hook.remove()
    assert torch.equal(out, expected)
    assert len(forwards) == plain == decoder.stats.steps and decoder.stats.draft_tokens == 0
    assert sum(decoder.rank_acceptance) and sum(decoder.rank_trials) > trials  # plain steps still score each rank
    if strategy == "hybrid":
        assert decoder.chain_trials.sum() > HybridRecycling().chain_trials.sum()


@pytest.mark.parametrize("tree", [8, "auto"])
def test_hybrid_on_a_sliding_window_model_past_its_window(tree, tmp_path, monkeypatch):
    """Gemma 3 (sliding window 8 and full layers): exact greedy output past the window; the forward timings are
    measured on a fresh full-history cache (no user cache involved), which works for windowed models too."""
    monkeypatch.setenv("HF_EFFICIENT_CACHE", str(tmp_path))
    target = tiny_hybrid_lm(sliding_window=8)
    inputs = _prompts(3)
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    expected = target.generate(**inputs, **kwargs)
    strategy = HybridRecycling(topk=4, tree=tree)
    assert torch.equal(target.generate(**inputs, **kwargs, custom_generate=strategy), expected)
    if tree == "auto":
        assert (tmp_path / "forward_costs.json").is_file() and set(strategy.forward_costs) >= {1, 64}


def test_forward_costs_measured_once_then_read_from_disk(tmp_path, monkeypatch):
    target = tiny_causal_lm("mistral", sliding_window=16)
    first = ForwardCostModel(cache_file=tmp_path / "costs.json").forward_costs(target)
    assert set(first) == set(cost_model_module.SIZES) and all(seconds > 0 for seconds in first.values())
    cost_model_module._MEASURED.clear()  # a new process: only the file remains

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(cost_model_module, "measure_forward_costs", refuse)
    assert ForwardCostModel(cache_file=tmp_path / "costs.json").forward_costs(target) == first
    fresh = TokenRecycling(cost_model=ForwardCostModel(cache_file=tmp_path / "costs.json"))
    target.generate(**_prompts(1), max_new_tokens=6, custom_generate=fresh)  # a fresh object times nothing
    assert fresh.forward_costs == first


def test_cost_model_helpers(tmp_path):
    costs = {1: 1.0, 4: 2.0, 8: 4.0}
    assert forward_seconds(costs, 1) == forward_seconds(costs, 0) == 1.0
    assert forward_seconds(costs, 2) == pytest.approx(4 / 3) and forward_seconds(costs, 12) == pytest.approx(6.0)
    seconds = [forward_seconds(costs, t) for t in range(17)]
    assert plan_draft(seconds, {1: 0.0, 4: 0.5}) == (1, 0)  # 1.5 tokens for 2 s: plain pays more
    assert plan_draft(seconds, {1: 0.0, 4: 2.5}) == (4, 0)  # 3.5 tokens for 2 s
    assert plan_draft(seconds, {1: 0.0, 4: 0.5}, [0.0, 0.9, 1.7, 2.4]) == (1, 3)  # a chain alone: 3.4 for 2 s
    with pytest.raises(ValueError, match="positive seconds"):
        ForwardCostModel(costs={1: 0.0})
    assert cost_cache_file().parent == cache_dir()  # the restated location rule agrees with the reference cache's
    model = tiny_causal_lm("llama")
    model.save_pretrained(tmp_path / "model")
    reloaded = type(model).from_pretrained(tmp_path / "model")
    assert model_key(reloaded) == model_key(model) != model_key(tiny_causal_lm("llama", dtype=torch.bfloat16))


def test_exported_hybrid_folder_runs_without_hf_efficient(tmp_path):
    """`export_custom_generate` copies the hybrid's modules (suffix index, cost model, recycling, engine) flat: the
    folder decodes exactly as plain greedy in a process where `hf_efficient` cannot be imported, and keeps learning."""
    from test_hub import _run_blocked

    from hf_efficient.hub import export_custom_generate

    target, inputs = tiny_causal_lm("llama"), _prompts(2)
    strategy = HybridRecycling(cost_model=CHEAP)
    target.generate(**_prompts(2, seed=3), max_new_tokens=8, custom_generate=strategy)  # warm state and timings
    target.save_pretrained(tmp_path / "hybrid")
    export_custom_generate(strategy, tmp_path / "hybrid")
    assert {"suffix_index.py", "cost_model.py", "token_recycling.py"} <= {
        p.name for p in (tmp_path / "hybrid" / "custom_generate").iterdir()
    }
    (tmp_path / "hybrid" / "prompts.json").write_text(json.dumps(inputs["input_ids"].tolist()))
    expected = target.generate(**inputs, max_new_tokens=20, do_sample=False).tolist()
    report = _run_blocked([tmp_path / "hybrid"], tmp_path)
    assert report.pop("hf_efficient_modules") == []
    result = report[str(tmp_path / "hybrid")]
    assert result["plain"] == expected and result["runs"] == [expected] * 3 and result["reused"]
    assert result["forward_costs"] == {str(k): v for k, v in strategy.forward_costs.items()}  # not re-timed
