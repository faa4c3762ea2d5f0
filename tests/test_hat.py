"""HAT: word splitting, cached == uncached generation, batched rows == alone, training, remote code."""

from __future__ import annotations

import pytest
import torch
from test_hnet import (
    PROMPTS,
    TOK,
    assert_slots_compact_like_alone,
    check_trainer_lowers_loss,
    greedy,
    remote_round_trip,
    tiny_hnet,
)

from hf_efficient.models import HATConfig, HATForCausalLM
from hf_efficient.models.hat import HATCache
from hf_efficient.models.hat.splitter_hat import WordSplitState, word_starts

CASES = {
    "default": dict(hidden_size=64, intermediate_size=128, backbone_hidden_size=96, backbone_intermediate_size=192),
    "gqa_short_words": dict(
        hidden_size=48,
        intermediate_size=96,
        num_attention_heads=2,
        backbone_hidden_size=64,
        backbone_intermediate_size=128,
        backbone_num_key_value_heads=2,
        sliding_window=5,
        max_word_bytes=3,
        decoder_word_window=1,
    ),
}


def tiny_hat(case: str, **overrides) -> HATForCausalLM:
    torch.manual_seed(0)
    return HATForCausalLM(HATConfig(**{**CASES[case], **overrides})).eval()


def split(text: str, max_word_bytes: int = 16) -> list[str]:
    data = text.encode()
    ids = torch.tensor([list(data)])
    starts = word_starts(ids, torch.ones_like(ids, dtype=torch.bool), max_word_bytes)[0].nonzero().flatten().tolist()
    return [data[a:b].decode() for a, b in zip(starts, [*starts[1:], len(data)])]


def test_word_splitting_rules():
    assert split("Hello, wörld!  foo_bar(x) 世界 ok🙂") == [
        "Hello", ",", " wörld", "!", "  foo_bar", "(", "x", ")", " ", "世", "界", " ok", "🙂",
    ]  # fmt: skip
    assert split(" " + "a" * 40, max_word_bytes=16) == [" " + "a" * 15, "a" * 16, "a" * 9]


def test_word_splitting_is_causal():
    text = "naïve  café, x_1 = 世界!🙂 " + "b" * 30
    ids = torch.tensor([list(text.encode())])
    full = word_starts(ids, torch.ones_like(ids, dtype=torch.bool), 8)
    state = WordSplitState(1, ids.device)
    pieces = [ids[:, i : i + 3] for i in range(0, ids.shape[1], 3)]
    steps = [word_starts(p, torch.ones_like(p, dtype=torch.bool), 8, state) for p in pieces]
    assert torch.equal(full, torch.cat(steps, dim=1))


@pytest.mark.parametrize("case", list(CASES))
def test_cached_generation_equals_uncached(case):
    model = tiny_hat(case)
    torch.testing.assert_close(greedy(model, PROMPTS), greedy(model, PROMPTS, use_cache=False), rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_batched_rows_equal_alone(case):
    model = tiny_hat(case)
    backbone_batches: list[int] = []
    hook = model.backbone.register_forward_pre_hook(lambda m, args: backbone_batches.append(args[0].shape[0]))
    batched = greedy(model, PROMPTS)
    hook.remove()
    assert any(0 < b < len(PROMPTS) for b in backbone_batches[1:])  # rows closed words at different bytes
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(batched[i], greedy(model, [prompt])[0], rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_backbone_cache_and_word_memory_are_compact_per_row(case):
    def word_level(cache: HATCache):
        return [(cache.state.backbone.kv, cache.state.backbone.count), (cache.state.memory, cache.state.memory_count)]

    assert_slots_compact_like_alone(tiny_hat(case), HATCache, word_level)


def test_outputs_word_starts():
    model = tiny_hat("default")
    batch = TOK(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    out = model(**batch, output_boundaries=True)
    assert out.word_starts.shape == batch.input_ids.shape and not out.word_starts[batch.attention_mask == 0].any()
    assert out.compression[0] > 1


def test_trainer_steps_lower_the_loss(tmp_path):
    check_trainer_lowers_loss(tiny_hat("default"), tmp_path)


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="hidden_size=100"):
        HATConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="unknown HAT preset"):
        HATConfig.from_preset("nope")
    assert HATConfig.from_preset("hat_llama3_8b").backbone_layers == 32


def test_remote_code_round_trip_in_clean_process(tmp_path):
    """Both families (H-Net 2-stage with its tokenizer, HAT) load from their saved folders without hf_efficient."""
    remote_round_trip(
        [
            (tiny_hnet("2stage"), TOK, ["héllo", "def f("]),
            (tiny_hat("gqa_short_words"), TOK, ["héllo wörld", "def f("]),
        ],
        tmp_path,
    )


@pytest.mark.parametrize("family", ["hnet", "hat"])
def test_attention_implementation_switch_reaches_every_stack(family):
    model = tiny_hnet("2stage") if family == "hnet" else tiny_hat("default")
    reference = greedy(model, PROMPTS, n=8)
    model.set_attn_implementation("eager")
    assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {"eager"}
    torch.testing.assert_close(greedy(model, PROMPTS, n=8), reference, rtol=0, atol=0)
