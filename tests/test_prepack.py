"""Prepacking: first-fit-decreasing packing, block-diagonal masks, and equality with per-prompt generation."""

import pytest
import torch
from factories import ARCHITECTURES, tiny_causal_lm, tiny_tokenizer

from hf_efficient.compat import output_cache
from hf_efficient.prefill import first_fit_decreasing, pack_prompts, prepacked_generate, prepacked_prefill


def _prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=generator).tolist() for n in lengths]


def _alone(model, prompt, **kwargs):
    ids = torch.tensor([prompt])
    return model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **kwargs)[0]


@pytest.mark.parametrize("lengths", [[5, 17, 1, 9, 30, 12, 3], [8] * 5, [1, 1, 1], [30, 29, 2, 1, 1, 15, 15]])
def test_first_fit_decreasing(lengths):
    capacity = max(lengths)
    bins = first_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert len(bins) <= 2 * -(-sum(lengths) // capacity)  # FFD uses at most ~11/9 OPT + 1 bins; OPT >= ceil(sum/C)
    with pytest.raises(ValueError, match="capacity"):
        first_fit_decreasing([4, 9], 8)


def test_packed_mask_is_block_diagonal_causal():
    packed = pack_prompts([[11, 12, 13], [21, 22], [31]], pad_token_id=0, dtype=torch.float32)
    assert packed.input_ids.shape == (2, 3)  # [[11, 12, 13], [21, 22, 31]]
    assert packed.position_ids.tolist() == [[0, 1, 2], [0, 1, 0]]
    visible = packed.attention_mask[1, 0] == 0
    assert visible.tolist() == [[True, False, False], [True, True, False], [False, False, True]]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prepacked_generate_equals_per_prompt_generate(arch):
    model = tiny_causal_lm(arch)
    prompts = _prompts([5, 17, 1, 9, 30, 12, 3])
    outputs = prepacked_generate(model, prompts, max_new_tokens=10, do_sample=False)
    for prompt, output in zip(prompts, outputs):
        assert torch.equal(output, _alone(model, prompt, max_new_tokens=10, do_sample=False))


def test_prepacked_prefill_matches_per_prompt_cache():
    model = tiny_causal_lm("qwen2")
    prompts = _prompts([6, 11, 3])
    cache = prepacked_prefill(model, prompts)
    for i, prompt in enumerate(prompts):
        alone = output_cache(model(torch.tensor([prompt]), use_cache=True))
        for layer, expected in zip(cache.layers, alone.layers):
            torch.testing.assert_close(layer.keys[i, :, -len(prompt) :], expected.keys[0], atol=1e-5, rtol=1e-5)
            assert not layer.values[i, :, : 11 - len(prompt)].any()  # left padding


def test_text_prompts_with_tokenizer_and_eager():
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), attn_implementation="eager")
    texts = ["Return a new list.", "The JSON encoder turns Python objects into text and back again.", "x"]
    outputs = prepacked_generate(model, texts, tokenizer, max_new_tokens=6, do_sample=False)
    for text, output in zip(texts, outputs):
        assert torch.equal(output, _alone(model, tokenizer(text)["input_ids"], max_new_tokens=6, do_sample=False))
    with pytest.raises(ValueError, match="tokenizer"):
        prepacked_generate(model, texts)
    for name in ("cache", "past_key_values"):  # either spelling of the cache argument
        with pytest.raises(ValueError, match="builds the cache itself"):
            prepacked_generate(model, texts, tokenizer, **{name: None})


@pytest.mark.real
def test_benchmark_quick_run():
    from hf_efficient.bench import prepack

    report = prepack.run(quick=True)
    padded, packed = report.rows
    assert padded["speedup"] == 1.0 and packed["token_slots"] < padded["token_slots"]
    assert packed["speedup"] > 0 and packed["prefill_s"] > 0
    assert "SmolLM2-135M" in report.setup and "test split" in report.setup
