"""Speculative drafters: lossless greedy and sampling, batching, stopping, state, clear errors.

Every drafter runs through one verification engine; the case matrix is drafter x architecture x dtype x batch.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from factories import ARCHITECTURES, tiny_causal_lm
from scipy.stats import chisquare
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList, TextStreamer
from transformers.generation.streamers import BaseStreamer

from hf_efficient.compat import DynamicCache, cache_kwarg
from hf_efficient.hub import export_custom_generate
from hf_efficient.speculative import (
    AcceptanceHead,
    DecodingState,
    DraftModel,
    TokenRecycling,
    load_drafter,
    trim_drafter_vocab,
)
from hf_efficient.speculative.tree import DraftTree, expected_accepted, tree_template

# Mistral's sliding window (16) is shorter than the matrix's sequences (10 prompt + 24 new tokens): sliding layers
# are reached, in the target and in the drafters
WINDOW = {"mistral": {"sliding_window": 16}}


def _small(target, arch, **overrides):
    """A one-layer drafter of `arch` in the target's dtype (and sliding window)."""
    return tiny_causal_lm(arch, seed=1, num_hidden_layers=1, dtype=target.dtype, **WINDOW.get(arch, {}), **overrides)


DRAFTERS = {
    "recycling": lambda target, arch: TokenRecycling(topk=4, tree=12),
    "draft-tree": lambda target, arch: DraftModel(_small(target, arch)),
    "draft-chain": lambda target, arch: DraftModel(_small(target, arch), chain=True, stop_threshold=None),
    "self-draft": lambda target, arch: DraftModel(target, max_depth=4, stop_threshold=None),
    "self-chain": lambda target, arch: DraftModel(target, chain=True, max_depth=4, stop_threshold=None),
    "head": lambda target, arch: DraftModel(
        _small(target, arch), acceptance_head=AcceptanceHead(32, num_layers=1).to(target.dtype), stop_threshold=0.5
    ),
    "trimmed": lambda target, arch: DraftModel(trim_drafter_vocab(_small(target, arch), torch.arange(96), 48)),
}


def _prompts(batch: int, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random prompts, left padded by 0, 3, 5 tokens for rows 0, 1, 2."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 96, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, pad in zip(range(batch), (0, 3, 5)):
        attention_mask[row, :pad] = 0
        input_ids[row, :pad] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize(
    "drafter, arch, dtype, batch",
    [
        *itertools.product(["recycling", "draft-tree"], ARCHITECTURES, [torch.float32, torch.bfloat16], [1, 3]),
        *[(d, "llama", torch.float32, 3) for d in ("draft-chain", "self-draft", "self-chain", "head", "trimmed")],
        *[(d, "qwen2", torch.bfloat16, 1) for d in ("draft-chain", "self-draft", "self-chain", "head", "trimmed")],
        *[(d, "mistral", torch.float32, 3) for d in ("draft-chain", "self-draft", "self-chain", "head", "trimmed")],
    ],
)
def test_greedy_equals_plain_generate(drafter, arch, dtype, batch):
    """fp32: identical token for token. bf16: identical up to the first exact near-tie of plain decoding.

    In bf16 one tree forward and step-by-step decoding reduce attention over different key lengths (masked
    columns vs a shorter cache), so a logit can move by one bf16 ulp; the argmax then flips only where plain
    decoding's two best logits are within that ulp. This test asserts exactly that: equality everywhere, or
    equality up to a position where plain decoding had such a tie (and our token is one of the tied ones).
    """
    target = tiny_causal_lm(arch, dtype=dtype, **WINDOW.get(arch, {}))
    strategy = DRAFTERS[drafter](target, arch)
    inputs = _prompts(batch)
    prompt_len = inputs["input_ids"].shape[1]
    for max_new_tokens in (24, 3):
        expected = target.generate(
            **inputs, max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_logits=True
        )
        out = target.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, custom_generate=strategy)
        assert out.shape == expected.sequences.shape
        assert strategy.stats.draft_tokens > 0  # drafts were verified: this is not plain decoding
        if drafter == "self-chain" and dtype == torch.float32 and max_new_tokens == 24:
            # the target drafting its own argmax chain must have every draft accepted: 1 token from the prefill,
            # then max_depth + 1 = 5 per forward, so every row finishes in 1 + ceil(23 / 5) = 6 forwards
            finished_early = (expected.sequences[:, prompt_len:] == target.config.eos_token_id).any()
            assert strategy.stats.steps == 6 or (finished_early and strategy.stats.steps < 6), strategy.stats
        if dtype == torch.float32 or torch.equal(out, expected.sequences):
            assert torch.equal(out, expected.sequences), f"{drafter} {arch} batch={batch}:\n{out}\n{expected}"
            continue
        for row in range(batch):
            differ = (out[row, prompt_len:] != expected.sequences[row, prompt_len:]).nonzero()
            if len(differ):
                step = int(differ[0])
                logits = expected.logits[step][row].float()
                ulp = 2.0 ** (torch.floor(torch.log2(logits.abs().max())) - 7)  # bf16 spacing at this magnitude
                margin = logits.max() - logits[out[row, prompt_len + step]]
                assert margin <= ulp, f"row {row} step {step}: margin {margin} > one bf16 ulp {ulp}"
    assert strategy.stats.new_tokens == batch * 3 and strategy.stats.steps >= 1


def test_eager_attention_and_tied_embeddings():
    target = tiny_causal_lm("llama", attn_implementation="eager", tie_word_embeddings=True)
    inputs = _prompts(3)
    expected = target.generate(**inputs, max_new_tokens=20, do_sample=False)
    for strategy in (TokenRecycling(tree=10), DraftModel(target, max_depth=3)):
        assert torch.equal(target.generate(**inputs, max_new_tokens=20, custom_generate=strategy), expected)


def test_prefix_and_length_processors_match_plain_generate():
    """Processors reading each node's prefix (repetition penalty, n-gram ban) or only its length (min new
    tokens, the EOS ban) act at every tree node exactly as plain generate applies them token by token."""
    target = tiny_causal_lm("llama")
    inputs = _prompts(3)
    plain = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    eos = int(plain[1, inputs["input_ids"].shape[1] + 2])  # an early token of row 1: banned until 8 new tokens
    kwargs = dict(
        max_new_tokens=20,
        min_new_tokens=8,
        eos_token_id=eos,
        pad_token_id=0,
        repetition_penalty=1.3,
        no_repeat_ngram_size=3,
        do_sample=False,
    )
    expected = target.generate(**inputs, **kwargs)
    for strategy in (TokenRecycling(topk=4, tree=12), DraftModel(target, max_depth=4, stop_threshold=None)):
        assert torch.equal(target.generate(**inputs, custom_generate=strategy, **kwargs), expected)


@pytest.mark.parametrize("batch", [1, 3])
def test_eos_mid_draft_and_exact_length(batch):
    target = tiny_causal_lm("llama")
    inputs = _prompts(batch)
    plain = target.generate(**inputs, max_new_tokens=16, do_sample=False)
    eos = int(plain[0, inputs["input_ids"].shape[1] + 5])  # row 0's 6th new token ends it mid-draft
    expected = target.generate(**inputs, max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=0)
    # self-drafting chains are accepted whole, so the EOS is always inside an accepted draft
    strategy = DraftModel(target, chain=True, max_depth=6, stop_threshold=None)
    out = target.generate(**inputs, max_new_tokens=16, eos_token_id=eos, pad_token_id=0, custom_generate=strategy)
    assert torch.equal(out, expected)
    for max_new_tokens in (1, 2, 5):  # never overshoot, even when the draft is deeper than the budget
        out = target.generate(**inputs, max_new_tokens=max_new_tokens, custom_generate=strategy)
        assert out.shape[1] == inputs["input_ids"].shape[1] + max_new_tokens


def test_custom_stopping_criterion_mid_draft():
    """A user stopping criterion ends each row at the same token as plain generate, inside accepted drafts."""
    target = tiny_causal_lm("llama")
    inputs = _prompts(3)
    plain = target.generate(**inputs, max_new_tokens=16, do_sample=False)
    stop_token = int(plain[1, inputs["input_ids"].shape[1] + 4])

    class StopAt(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == stop_token

    kwargs = dict(
        max_new_tokens=16, do_sample=False, pad_token_id=0, stopping_criteria=StoppingCriteriaList([StopAt()])
    )
    expected = target.generate(**inputs, **kwargs)
    strategy = DraftModel(target, chain=True, max_depth=6, stop_threshold=None)
    assert torch.equal(target.generate(**inputs, custom_generate=strategy, **kwargs), expected)


def test_stats_hand_checked():
    target = tiny_causal_lm("llama")
    strategy = DraftModel(target, chain=True, max_depth=3, stop_threshold=None)
    target.generate(**_prompts(1), max_new_tokens=9, custom_generate=strategy)
    # prefill -> 1 token, then two steps of 3 accepted drafts + 1 target token each
    assert (strategy.stats.steps, strategy.stats.new_tokens, strategy.stats.draft_tokens) == (3, 9, 6)
    assert strategy.stats.mean_accepted == 3.0


def test_scores_streamer_and_return_dict():
    target = tiny_causal_lm("qwen2")
    inputs = _prompts(1)
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True)

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens += value.flatten().tolist()

        def end(self):
            self.ended = True

    plain = Collect()
    expected = target.generate(**inputs, **kwargs, output_logits=True, streamer=plain)
    streamer = Collect()
    out = target.generate(
        **inputs, **kwargs, output_logits=True, custom_generate=TokenRecycling(tree=8), streamer=streamer
    )
    assert torch.equal(out.sequences, expected.sequences)
    assert len(out.scores) == len(expected.scores) == 12
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(expected.scores), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4)
    assert streamer.ended and streamer.tokens == plain.tokens == out.sequences[0].tolist()  # prompt, then new tokens


class _Printed(TextStreamer):
    """A stock `TextStreamer` that records what it would print."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.printed = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.printed += text + ("<end>" if stream_end else "")


@pytest.mark.parametrize("kind", ["recycling", "draft", "exported"])
def test_text_streamer_prints_what_plain_generate_prints(tmp_path, kind):
    from factories import tiny_tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    target = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    inputs = tokenizer(["def parse(text):"], return_tensors="pt")
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    plain = _Printed(tokenizer)
    expected = target.generate(**inputs, **kwargs, streamer=plain)
    drafter = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1, num_hidden_layers=1)
    strategy = DraftModel(drafter, max_depth=3) if kind == "draft" else TokenRecycling(tree=6)
    streamer = _Printed(tokenizer)
    if kind == "exported":
        target.save_pretrained(tmp_path)
        export_custom_generate(strategy, tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        out = reloaded.generate(
            **inputs, **kwargs, streamer=streamer, custom_generate=str(tmp_path), trust_remote_code=True
        )
    else:
        out = target.generate(**inputs, **kwargs, streamer=streamer, custom_generate=strategy)
    assert torch.equal(out, expected)
    assert plain.printed.endswith("<end>") and len(plain.printed) > len("<end>")
    assert streamer.printed == plain.printed


def _exact_distribution(model, prompt, steps, temperature, top_k, eos):
    """Exact probability of every outcome (token tuple, EOS-terminated tuples padded with -1) of `steps` tokens."""
    outcomes = {(): 1.0}
    for _ in range(steps):
        grown = {}
        for prefix, prob in outcomes.items():
            if prefix and prefix[-1] in (eos, -1):
                grown[(*prefix, -1)] = prob
                continue
            ids = torch.cat([prompt, torch.tensor([list(prefix)], dtype=torch.long)], 1)
            logits = model(ids).logits[0, -1].double() / temperature
            logits[logits < logits.topk(top_k).values[-1]] = -float("inf")
            for token, p in enumerate(torch.softmax(logits, -1).tolist()):
                if p > 0:
                    grown[(*prefix, token)] = prob * p
        outcomes = grown
    return outcomes


@pytest.mark.parametrize("drafter", ["recycling", "draft-tree", "draft-chain"])
def test_sampling_is_lossless_chi_square(drafter):
    vocab, n, steps = 8, 3000, 3
    target = tiny_causal_lm("llama", vocab_size=vocab)
    target.generation_config.pad_token_id = 0
    draft = copy.deepcopy(target)  # a close but different drafter: q != p, most drafts accepted, some rejected
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(0.3 * param.std() * torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
    strategy = {
        "recycling": TokenRecycling(topk=3, tree=6, warm_start=False),
        "draft-tree": DraftModel(draft, tree_size=6, topk=3, stop_threshold=None, max_depth=3),
        "draft-chain": DraftModel(draft, chain=True, stop_threshold=None, max_depth=3),
    }[drafter]
    prompt = torch.tensor([[1, 5, 3, 7, 4]])
    torch.manual_seed(1)
    target.generate(prompt.repeat(64, 1), do_sample=True, max_new_tokens=8, custom_generate=strategy)  # warm state
    out = target.generate(
        prompt.repeat(n, 1), do_sample=True, temperature=0.7, top_k=5, max_new_tokens=steps, custom_generate=strategy
    )
    assert strategy.stats.mean_accepted > 1.1  # drafts were really exercised (at most 1.5 here)
    with torch.no_grad():
        exact = _exact_distribution(target, prompt, steps, 0.7, 5, eos=2)
    assert_sampled_like(out[:, prompt.shape[1] :].tolist(), exact, steps)


def assert_sampled_like(generated: list[list[int]], exact: dict, steps: int, eos: int = 2) -> None:
    """Chi-square test of sampled continuations (everything after the first `eos` masked) against `exact`."""
    n, seen = len(generated), {}
    for row in generated:
        row = row + [0] * (steps - len(row))
        key = tuple(t if i == 0 or eos not in row[:i] else -1 for i, t in enumerate(row))
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) <= set(exact), "sampled an outcome of probability zero"
    big = [k for k, p in exact.items() if p * n >= 5]
    observed = [seen.get(k, 0) for k in big] + [n - sum(seen.get(k, 0) for k in big)]
    expected = [exact[k] * n for k in big] + [n - sum(exact[k] * n for k in big)]
    assert chisquare(observed, expected).pvalue > 1e-3


def test_recycling_state_save_load_reset(tmp_path):
    target = tiny_causal_lm("mistral")
    strategy = TokenRecycling(topk=4, tree=8)
    prompt = _prompts(1)
    with torch.inference_mode():  # state made under inference mode keeps working outside it
        target.generate(**prompt, max_new_tokens=16, custom_generate=strategy)
    assert strategy.seen[prompt["input_ids"]].all()  # warm start wrote every prompt token's row
    first = strategy.adjacency.clone()
    target.generate(**_prompts(1, seed=1), max_new_tokens=16, custom_generate=strategy)
    assert not torch.equal(first, strategy.adjacency)  # state persists and keeps learning across calls
    assert strategy.seen.sum() < len(strategy.seen)
    strategy.save(tmp_path / "recycling.safetensors")
    loaded = TokenRecycling(topk=2).load(tmp_path / "recycling.safetensors")
    assert loaded.topk == 4 and torch.equal(loaded.adjacency, strategy.adjacency)
    assert torch.equal(loaded.seen, strategy.seen) and torch.equal(loaded.pair_next, strategy.pair_next)
    assert loaded.pair_buckets == strategy.pair_buckets and (loaded.pair_keys >= 0).any()
    assert loaded.rank_acceptance == strategy.rank_acceptance
    loaded.reset()
    assert loaded.adjacency is None


def test_recycling_prefers_the_successors_of_a_seen_token_pair():
    """Token 5 was followed by 7 after 3, and later by 8 after 4: a draft after (3, 5) proposes 7, after an
    unseen pair the adjacency matrix's latest successor 8; without the pair table always 8."""
    target = tiny_causal_lm("llama")
    for pair_buckets, after_3 in ((101, 7), (0, 8)):
        strategy = TokenRecycling(topk=2, tree=[[0]], pair_buckets=pair_buckets, warm_start=False)
        target.generate(torch.tensor([[1, 2]]), max_new_tokens=2, custom_generate=strategy)  # builds the state
        strategy._recycle(torch.tensor([3]), torch.tensor([5]), torch.tensor([[7, 9]]))
        strategy._recycle(torch.tensor([4]), torch.tensor([5]), torch.tensor([[8, 9]]))
        for previous, expected in ((3, after_3), (6, 8)):
            state = DecodingState(
                sequences=torch.tensor([[previous, 5]]),
                lengths=torch.tensor([2]),
                unfinished=torch.tensor([True]),
                max_drafts=torch.tensor([4]),
                generation_config=target.generation_config,
                logits_processor=LogitsProcessorList(),
            )
            assert strategy.draft(target, state).tokens.tolist() == [[5, expected]]


def test_recycling_auto_tree_and_paths():
    target = tiny_causal_lm("llama")
    inputs = _prompts(1)
    expected = target.generate(**inputs, max_new_tokens=12)
    auto = TokenRecycling(tree="auto")
    assert torch.equal(target.generate(**inputs, max_new_tokens=12, custom_generate=auto), expected)
    assert set(auto.forward_costs) >= {1, 8, 64} and set(auto._templates) >= {1, 8, 64}  # planned sizes, plain too
    paths = TokenRecycling(tree=[[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    assert torch.equal(target.generate(**inputs, max_new_tokens=12, custom_generate=paths), expected)
    assert paths.stats.draft_tokens == 5 * (paths.stats.steps - 1)


def test_tree_structures():
    parents, ranks = tree_template(6, [0.5, 0.2])
    assert parents.tolist()[0] == -1 and all(p < i for i, p in enumerate(parents.tolist()))
    assert expected_accepted(parents, ranks, [0.5, 0.2]) == pytest.approx(0.5 + 0.25 + 0.2 + 0.125 + 0.1)
    tree = DraftTree(torch.tensor([[9, 8, 7, 6]]), torch.tensor([-1, 0, 0, 1]))
    assert tree.depth.tolist() == [[0, 1, 1, 2]]
    assert tree.ancestors()[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    assert tree.path_tokens()[0, 3].tolist() == [9, 8, 6]


class _EvictingCache(DynamicCache):
    @property
    def is_croppable(self) -> bool:
        return False


def test_clear_errors():
    target = tiny_causal_lm("llama")
    inputs = _prompts(1)
    with pytest.raises(ValueError, match="num_beams=2"):
        target.generate(**inputs, num_beams=2, max_new_tokens=4, custom_generate=TokenRecycling())
    with pytest.raises(ValueError, match="is_croppable=False"):
        cache = _EvictingCache(config=target.config)
        target.generate(**inputs, **cache_kwarg(cache), max_new_tokens=4, custom_generate=TokenRecycling())
    with pytest.raises(ValueError, match="KV cache"):
        target.generate(**inputs, use_cache=False, max_new_tokens=4, custom_generate=TokenRecycling())
    with pytest.raises(ValueError, match="prefix_allowed_tokens_fn"):
        allowed = lambda batch_id, ids: [5, 6]  # noqa: E731
        target.generate(**inputs, prefix_allowed_tokens_fn=allowed, max_new_tokens=4, custom_generate=TokenRecycling())
    with pytest.raises(ValueError, match="universal assisted generation"):
        other = tiny_causal_lm("llama", vocab_size=128)
        target.generate(**inputs, max_new_tokens=4, custom_generate=DraftModel(other))
    with pytest.raises(ValueError, match="vocabulary of 96"):
        strategy = TokenRecycling(tree=4)
        target.generate(**inputs, max_new_tokens=4, custom_generate=strategy)
        tiny_causal_lm("llama", vocab_size=64).generate(
            input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=4, custom_generate=strategy
        )


@pytest.mark.parametrize("kind", ["recycling", "draft", "trimmed"])
def test_export_custom_generate_folder(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    target = tiny_causal_lm("llama")
    inputs = _prompts(1)
    if kind == "recycling":
        strategy = TokenRecycling(tree=6)
        target.generate(**inputs, max_new_tokens=8, custom_generate=strategy)  # learned state travels too
    elif kind == "trimmed":
        drafter = trim_drafter_vocab(tiny_causal_lm("llama", seed=1, num_hidden_layers=1), torch.arange(96), 48)
        strategy = DraftModel(drafter)
    else:
        strategy = DraftModel(tiny_causal_lm("llama", seed=1, num_hidden_layers=1), acceptance_head=AcceptanceHead(32))
    target.save_pretrained(tmp_path)
    folder = export_custom_generate(strategy, tmp_path)
    assert {"generate.py", "requirements.txt", "config.json", "README.md"} <= {p.name for p in folder.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    out = reloaded.generate(**inputs, max_new_tokens=10, custom_generate=str(tmp_path), trust_remote_code=True)
    assert torch.equal(out, target.generate(**inputs, max_new_tokens=10))


@pytest.mark.slow  # ~25 s: reads the reference corpus and starts a Trainer
def test_acceptance_head_recipe(tmp_path):
    from factories import tiny_tokenizer

    from hf_efficient.recipes import train_acceptance_head

    tokenizer = tiny_tokenizer()
    for name, overrides in (("target", {}), ("drafter", {"seed": 1, "num_hidden_layers": 1})):
        tiny_causal_lm("llama", vocab_size=len(tokenizer), **overrides).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    out = tmp_path / "head"
    train_acceptance_head.main(
        [
            *(f"--target={tmp_path / 'target'}", f"--drafter={tmp_path / 'drafter'}", f"--output-dir={out}"),
            *("--num-prompts=2", "--response-tokens=8", "--max-steps=4", "--batch-size=8"),
        ]
    )
    head = AcceptanceHead.load(out / "acceptance_head.safetensors")
    assert head(torch.zeros(3, 32)).shape == (3,)


@pytest.mark.slow  # starts TRL's DistillationTrainer
def test_distill_drafter_recipe(tmp_path):
    from factories import tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from hf_efficient.recipes import distill_drafter

    tokenizer = tiny_tokenizer()
    for name, overrides in (("target", {}), ("drafter", {"seed": 1, "num_hidden_layers": 1})):
        tiny_causal_lm("llama", vocab_size=len(tokenizer), **overrides).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    out = tmp_path / "distilled"
    distill_drafter.main(
        [
            *(f"--teacher={tmp_path / 'target'}", f"--student={tmp_path / 'drafter'}", f"--output-dir={out}"),
            *("--num-prompts=8", "--max-steps=2", "--batch-size=4", "--completion-tokens=4", "--prompt-tokens=8"),
        ]
    )
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(tokenizer)


@pytest.mark.real
@pytest.mark.slow  # about a minute: SmolLM2 in two dtypes, every setting once
def test_bench_quick():
    from hf_efficient.bench import speculative

    report = speculative.run(quick=True)
    settings = {row["setting"] for row in report.rows}
    assert settings == {"bf16 greedy", "bf16 sample T=0.8", "fp32 greedy", "fp32 sample T=0.8", "bf16 greedy, batch 4"}
    assert {row["method"] for row in report.rows} == {"plain generate", "HF prompt lookup", "TokenRecycling"}
    assert all(row["mean_accepted"] >= 1.0 for row in report.rows if "batch" not in row["setting"])
    fp32_greedy = [row for row in report.rows if row["setting"] == "fp32 greedy"]
    assert all(row["identical"] == f"{row['prompts']}/{row['prompts']}" for row in fp32_greedy)  # lossless


def test_trim_drafter_vocab_keeps_frequent_and_special_tokens():
    drafter = tiny_causal_lm("llama", tie_word_embeddings=True)
    counts = {50: 9, 60: 7, 70: 5, 80: 1}
    trimmed = trim_drafter_vocab(drafter, counts, size=5)
    assert trimmed.config.draft_vocab_ids == [0, 1, 2, 50, 60]  # pad, bos, eos always kept, then the most frequent
    assert trimmed.get_output_embeddings().weight.shape == (5, 32)
    assert trimmed.get_input_embeddings().num_embeddings == 96  # the drafter still reads every target token
    with pytest.raises(ValueError, match="already trimmed"):
        trim_drafter_vocab(trimmed, counts, size=4)


def test_adaptive_depth_calibrates_an_underconfident_drafter():
    target = tiny_causal_lm("llama")
    drafter = copy.deepcopy(target)  # always right, but flattened: its confidence says stop at depth 1
    with torch.no_grad():
        drafter.lm_head.weight.mul_(0.05)
    strategy = DraftModel(drafter, stop_threshold=0.5)
    inputs = _prompts(1)
    expected = target.generate(**inputs, max_new_tokens=24)
    accepted = []
    for _ in range(3):
        assert torch.equal(target.generate(**inputs, max_new_tokens=24, custom_generate=strategy), expected)
        accepted.append(strategy.stats.mean_accepted)
    assert accepted[-1] > accepted[0] + 1.0, accepted  # learned that its low confidence still means accepted
    strategy.reset()
    assert strategy.calibrated(torch.tensor([0.05, 0.05])).tolist() == pytest.approx([0.05, 0.05])  # prior again


def test_trimmed_drafter_survives_save_and_load(tmp_path):
    target = tiny_causal_lm("llama")
    drafter = trim_drafter_vocab(tiny_causal_lm("llama", seed=1, num_hidden_layers=1), torch.arange(96), 40)
    drafter.save_pretrained(tmp_path)
    reloaded = load_drafter(tmp_path)
    assert reloaded.config.draft_vocab_ids == drafter.config.draft_vocab_ids
    assert reloaded.get_output_embeddings().weight.shape == (40, 32)
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    inputs = _prompts(1)
    first, second = DraftModel(drafter, max_depth=3), DraftModel(reloaded, max_depth=3)
    out = target.generate(**inputs, max_new_tokens=12, custom_generate=first)
    assert torch.equal(target.generate(**inputs, max_new_tokens=12, custom_generate=second), out)
    assert first.stats.draft_tokens == second.stats.draft_tokens  # the same drafts, not just the same output
    untrimmed = tiny_causal_lm("llama", seed=2, num_hidden_layers=1)
    untrimmed.save_pretrained(tmp_path / "plain")
    assert load_drafter(tmp_path / "plain").get_output_embeddings().weight.shape[0] == untrimmed.config.vocab_size


class _LayerWithoutKV:
    """What transformers' `DummyLayer` is (5.2x+: a layer that shares another layer's cache) on releases without it."""

    is_initialized, is_croppable, keys, values = True, True, None, None

    def crop(self, tokens_to_remove: int) -> None:
        pass


def test_compaction_skips_layers_without_kv():
    """Caches may hold layers without KV (`DummyLayer` in transformers 5.2x): compaction leaves them alone."""
    import transformers.cache_utils

    from hf_efficient.speculative.kv import compact_cache

    dummy = getattr(transformers.cache_utils, "DummyLayer", _LayerWithoutKV)

    cache = DynamicCache()
    keys = torch.randn(2, 2, 7, 4)
    cache.update(keys, keys.clone(), 0)
    cache.layers.append(dummy())
    compact_cache(cache, num_new=3, keep=torch.tensor([[0, 2], [1, 2]]))  # rows keep different tree nodes
    assert cache.layers[0].keys.shape[-2] == 6 and cache.layers[1].keys is None
    assert torch.equal(cache.layers[0].keys[0, :, 4:], keys[0, :, [4, 6]])
    assert torch.equal(cache.layers[0].keys[1, :, 4:], keys[1, :, [5, 6]])


@pytest.mark.parametrize("strategy", ["recycling", "self-chain"])
def test_hybrid_sliding_model_past_its_window(strategy):
    """Gemma 3 mixes sliding (window 8) and full layers: one mask per layer type; 34-token rows, left padding."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    sliding, full = "sliding_attention", "full_attention"
    config = Gemma3TextConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=8,
        layer_types=[sliding, sliding, sliding, full],
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    target = Gemma3ForCausalLM(config).eval()
    inputs = _prompts(3)
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    expected = target.generate(**inputs, **kwargs)
    drafter = TokenRecycling(tree=8) if strategy == "recycling" else DRAFTERS["self-chain"](target, "gemma3")
    assert torch.equal(target.generate(**inputs, **kwargs, custom_generate=drafter), expected)
    if strategy == "self-chain":
        assert drafter.stats.steps == 6  # every draft accepted: 1 + ceil(23 / 5) forwards
