"""Compressed KV caches: quantisation bounds, degenerate equality, positions after eviction, padding, crop."""

import copy

import pytest
import torch
from factories import ARCHITECTURES, tiny_causal_lm
from transformers import DynamicCache

from hf_efficient.cache import GEARCache, HeavyHitterCache, KIVICache, SnapKVCache, StreamingCache
from hf_efficient.cache.gear import gear_compress
from hf_efficient.cache.quantization import pack_bits, quantize, unpack_bits
from hf_efficient.cache.scoring import ATTENTION_NAME
from hf_efficient.compat import ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS, cache_kwarg

# name -> factory(config, length): a cache that would compress/evict below `length`, and one that never does
COMPRESSING = {
    "gear": lambda c: GEARCache(c, bits=4, rank=2, group_size=8, residual_length=16),
    "kivi": lambda c: KIVICache(c, bits=2, group_size=8, residual_length=16),
    "streaming": lambda c: StreamingCache(c, sink_tokens=2, window=10),
    "h2o": lambda c: HeavyHitterCache(c, budget=12, recent=4),
    "keyformer": lambda c: HeavyHitterCache(c, budget=12, recent=4, score="keyformer"),
    "snapkv": lambda c: SnapKVCache(c, budget=12, window=4, kernel=3),
}
DEGENERATE = {
    "gear": lambda c: GEARCache(c, bits=2, group_size=8, residual_length=256),
    "kivi": lambda c: KIVICache(c, bits=2, group_size=8, residual_length=256),
    "streaming": lambda c: StreamingCache(c, sink_tokens=4, window=256),
    "h2o": lambda c: HeavyHitterCache(c, budget=256),
    "keyformer": lambda c: HeavyHitterCache(c, budget=256, score="keyformer"),
    "snapkv": lambda c: SnapKVCache(c, budget=256, window=8),
}
EVICTING = ("streaming", "h2o", "keyformer", "snapkv")


def _padded_batch(lengths=(14, 9), seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, 96, (n,), generator=generator)
        mask[row, width - n :] = 1
    return ids, mask


def _generate(model, ids, mask, cache, new_tokens=12):
    return model.generate(
        input_ids=ids, attention_mask=mask, **cache_kwarg(cache), max_new_tokens=new_tokens, do_sample=False
    )


# -- quantisation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bit_packing_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 2, 16, 8), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == codes.numel() * bits // 8
    assert torch.equal(unpack_bits(packed, bits, codes.shape), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim, group", [(-2, 16), (-1, 8)])
def test_quantization_error_bound(bits, dim, group, dtype):
    x = (torch.randn(2, 2, 32, 16) * 3 + 1).to(dtype)
    q = quantize(x, bits, group, dim)
    error = (q.dequantize().float() - x.float()).abs().max()
    assert q.dequantize().dtype == dtype and error <= q.max_error()
    assert q.nbytes() < x.numel() * x.element_size()
    assert torch.equal(q.select(torch.tensor([1, 0])).dequantize(), q.dequantize()[[1, 0]])


def test_gear_corrections_reduce_quantization_error():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 64, 32) + torch.randn(1, 2, 64, 1) * torch.randn(1, 2, 1, 32)  # low-rank structure
    x[0, 0, 3, 5] = 40.0  # an outlier
    plain = gear_compress(x, 4, 64, -2, rank=0, outlier_ratio=0.0)
    gear = gear_compress(x, 4, 64, -2, rank=4, outlier_ratio=0.02)
    assert gear.left.shape == (1, 64, 4) and gear.right.shape == (1, 2 * 32, 4)  # one fit across both heads
    assert (gear.dequantize() - x).norm() < 0.75 * (plain.dequantize() - x).norm()
    assert torch.equal(gear.dequantize(), gear_compress(x, 4, 64, -2, rank=4, outlier_ratio=0.02).dequantize())


@pytest.mark.parametrize("name", ["gear", "kivi"])
def test_8bit_history_within_error_bound(name):
    """8-bit caches return the history within the quantisation bound of what was stored."""
    config = tiny_causal_lm("llama").config
    factory = {
        "gear": lambda: GEARCache(config, bits=8, group_size=8, residual_length=16),
        "kivi": lambda: KIVICache(config, bits=8, group_size=8, residual_length=16),
    }[name]
    layer = factory().layers[0]
    keys, values = torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    for start in range(0, 40, 10):
        got_keys, got_values = layer.update(keys[..., start : start + 10, :], values[..., start : start + 10, :])
    assert layer.get_seq_length() == 40 and layer.keys.shape[-2] == 40 - 32  # two blocks of 16 compressed
    for got, expected in ((got_keys, keys), (got_values, values)):
        error = (got - expected).abs().max()
        assert 0 < error < 0.02 * expected.abs().max()  # 8 bits: half a step of a (max - min) / 255 range


# -- degenerate settings, padding, dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_degenerate_settings_equal_dynamic_cache(arch):
    """Nothing to compress or evict: identical greedy output to DynamicCache, with left padding (batch 2)."""
    model = tiny_causal_lm(arch)
    ids, mask = _padded_batch()
    expected = _generate(model, ids, mask, DynamicCache(config=model.config))
    for name, factory in DEGENERATE.items():
        assert torch.equal(_generate(model, ids, mask, factory(model.config)), expected), name


@pytest.mark.parametrize("name", EVICTING)
def test_left_padding_matches_unpadded_rows(name):
    """Padding is never kept or attended; each row generates what it generates alone (Keyformer's Gumbel noise is
    drawn per batch shape, so only the first property holds for it)."""
    model = tiny_causal_lm("qwen2")
    ids, mask = _padded_batch((20, 13))
    cache = COMPRESSING[name](model.config)
    batched = _generate(model, ids, mask, cache, new_tokens=16)
    padding = (mask == 0).sum(dim=1)[:, None, None]  # (B, 1, 1)
    assert (cache.layers[0].positions >= padding).all()  # both rows have more real tokens than the budget
    for row in range(2 if name != "keyformer" else 0):
        real = mask[row].bool()
        alone = _generate(
            model, ids[row : row + 1, real], mask[row : row + 1, real], COMPRESSING[name](model.config), 16
        )
        new = alone[0, real.sum() :]  # stops at end-of-sequence; the batch row continues with padding
        assert torch.equal(batched[row, ids.shape[1] : ids.shape[1] + new.numel()], new), (name, row)


@pytest.mark.parametrize("name", list(COMPRESSING))
def test_padding_content_never_changes_a_token(name):
    """Every generated token of a left-padded batch is the same whatever the padding holds: padded columns never
    shape a quantised block (ranges, low-rank, outliers) nor an eviction score. The first token comes from the
    full-precision prefill; the later ones read compressed blocks that cover the padding."""
    model = tiny_causal_lm("llama")
    ids, mask = _padded_batch((40, 23))
    cache = COMPRESSING[name](model.config)
    out = _generate(model, ids, mask, cache, new_tokens=16)
    for filler in (7, 77):
        other = _generate(model, ids.masked_fill(mask == 0, filler), mask, COMPRESSING[name](model.config), 16)
        assert torch.equal(other[:, ids.shape[1] :], out[:, ids.shape[1] :]), (name, filler)
    if name in ("gear", "kivi"):
        assert cache.get_seq_length() == ids.shape[1] + 15 and cache.layers[0].key_store is not None


@pytest.mark.parametrize("name", list(COMPRESSING))
def test_bf16_and_footprint(name):
    model = tiny_causal_lm("mistral", dtype=torch.bfloat16)
    ids, mask = _padded_batch((30, 22))
    cache = COMPRESSING[name](model.config)
    out = _generate(model, ids, mask, cache, new_tokens=10)
    dynamic = DynamicCache(config=model.config)
    _generate(model, ids, mask, dynamic, new_tokens=10)
    full = sum(layer.keys.numel() * 2 * layer.keys.element_size() for layer in dynamic.layers)
    assert out.shape == (2, ids.shape[1] + 10)
    assert 0 < cache.nbytes() < full


@torch.no_grad()
def test_quantized_footprint_targets():
    """Real packed storage: 2-bit KIVI and 4-bit GEAR are a fraction of fp32 bytes once blocks are compressed."""
    model = tiny_causal_lm("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2)  # head_dim 32
    ids = torch.randint(3, 96, (1, 256))
    full = 2 * 2 * ids.shape[1] * 2 * 32 * 4  # layers * (K, V) * L * H_kv * D * fp32
    for cache, limit in ((KIVICache(model.config, bits=2), 0.15), (GEARCache(model.config, bits=4, rank=2), 0.3)):
        model(ids, **cache_kwarg(cache), use_cache=True)
        assert cache.nbytes() < limit * full, (type(cache).__name__, cache.nbytes() / full)


# -- positions after eviction --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("name", EVICTING)
@torch.no_grad()
def test_long_generation_keeps_positions(arch, name):
    """After >= 3x budget tokens, a decode step equals an explicit recomputation over the kept tokens.

    With one layer, keys and values depend only on token and position, so recomputing the whole sequence with a
    4-D mask that lets the last query see exactly the kept slots of its KV head must give the same logits.
    """
    model = tiny_causal_lm(arch, num_hidden_layers=1)
    cache = COMPRESSING[name](model.config)
    prompt = torch.randint(3, 96, (1, 30 if name == "snapkv" else 8))
    out = model.generate(prompt, **cache_kwarg(cache), max_new_tokens=36, min_new_tokens=36, do_sample=False)
    assert out.shape[1] - prompt.shape[1] >= 3 * 12
    step = torch.tensor([[5]])  # fed instead of the last generated token, which the cache has not seen yet
    kept = cache.layers[0].positions[0].clone()  # (H_kv, budget)
    logits = model(step, **cache_kwarg(cache), use_cache=True).logits[0, -1]

    sequence = torch.cat([out[:, :-1], step], dim=1)
    n, heads = sequence.shape[1], model.config.num_attention_heads
    visible = torch.ones(n, n, dtype=torch.bool).tril().expand(heads, n, n).clone()  # (H, n, n)
    groups = heads // model.config.num_key_value_heads
    last = torch.zeros(heads, n, dtype=torch.bool)
    last.scatter_(1, kept.long().repeat_interleave(groups, dim=0), True)
    last[:, -1] = True
    visible[:, -1] = last
    recomputed = model(sequence, attention_mask=visible[None], position_ids=torch.arange(n)[None]).logits[0, -1]
    assert cache.get_seq_length() == n and kept.shape[-1] < n - 1 - 12  # evicted (SnapKV: the prompt only)
    torch.testing.assert_close(logits, recomputed, atol=1e-4, rtol=1e-4)


# -- crop ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("name", ["gear", "kivi", "streaming", "snapkv"])
def test_crop_rolls_back_exactly(name):
    model = tiny_causal_lm("llama")
    cache = COMPRESSING[name](model.config)
    ids = torch.randint(3, 96, (1, 20))
    model(ids, **cache_kwarg(cache), use_cache=True)
    for token in (7, 8):
        model(torch.tensor([[token]]), **cache_kwarg(cache), use_cache=True)
    before = copy.deepcopy(cache)
    assert cache.is_croppable
    cache.activate_past_recording()
    model(torch.randint(3, 96, (1, 5)), **cache_kwarg(cache), use_cache=True)  # a draft of 5 tokens
    cache.crop(-5)
    assert cache.get_seq_length() == before.get_seq_length() == 22
    logits = model(torch.tensor([[9]]), **cache_kwarg(cache), use_cache=True).logits
    expected = model(torch.tensor([[9]]), **cache_kwarg(before), use_cache=True).logits
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)


@torch.no_grad()
def test_crop_refused_where_it_cannot_be_exact():
    model = tiny_causal_lm("llama")
    h2o = COMPRESSING["h2o"](model.config)
    model(torch.randint(3, 96, (1, 20)), **cache_kwarg(h2o), use_cache=True)
    assert not h2o.is_croppable
    with pytest.raises(ValueError, match="is_croppable"):
        h2o.crop(-1)
    with pytest.raises(ValueError, match="is_croppable"):
        h2o.activate_past_recording()  # what assisted decoding calls first
    kivi = KIVICache(model.config, bits=2, group_size=8, residual_length=8)
    model(torch.randint(3, 96, (1, 20)), **cache_kwarg(kivi), use_cache=True)  # 16 compressed, 4 in the residual
    with pytest.raises(ValueError, match="uncompressed"):
        kivi.crop(-6)


# -- settings and wiring -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda c: GEARCache(c, bits=3), "bits"),
        (lambda c: GEARCache(c, rank=100), "rank"),
        (lambda c: GEARCache(c, outlier_ratio=1.5), "outlier_ratio"),
        (lambda c: KIVICache(c, group_size=32, residual_length=48), "residual_length"),
        (lambda c: KIVICache(c, group_size=6, residual_length=12), "head_dim"),
        (lambda c: StreamingCache(c, sink_tokens=4, window=0), "window"),
        (lambda c: HeavyHitterCache(c, budget=8, recent=8), "recent"),
        (lambda c: HeavyHitterCache(c, score="tova"), "score"),
        (lambda c: SnapKVCache(c, budget=32, window=32), "budget"),
        (lambda c: SnapKVCache(c, kernel=4), "kernel"),
        (lambda c: KIVICache(None), "config"),
    ],
)
def test_invalid_settings_raise(factory, match):
    with pytest.raises(ValueError, match=match):
        factory(tiny_causal_lm("llama").config)


def test_attention_registered_and_required():
    assert ATTENTION_NAME in ALL_ATTENTION_FUNCTIONS and ATTENTION_NAME in ALL_MASK_ATTENTION_FUNCTIONS
    model = tiny_causal_lm("llama")
    cache = StreamingCache(copy.deepcopy(model.config), sink_tokens=2, window=4)  # not the model's config object
    with pytest.raises(RuntimeError, match=r"config=model\.config"):
        model.generate(torch.randint(3, 96, (1, 8)), **cache_kwarg(cache), max_new_tokens=3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", EVICTING)
def test_eviction_caches_leave_the_model_alone(name, attn):
    """Building and filling an eviction cache never changes the model's attention setting; plain and speculative
    generation on the same model afterwards give what they gave before."""
    from hf_efficient.speculative import TokenRecycling

    model = tiny_causal_lm("llama", attn_implementation=attn)
    ids, mask = _padded_batch((20, 13))
    plain_before = _generate(model, ids, mask, None)
    cache = COMPRESSING[name](model.config)
    assert model.config._attn_implementation == attn
    compressed = _generate(model, ids, mask, cache, new_tokens=16)
    assert model.config._attn_implementation == attn
    assert cache.layers[0].keys.shape[-2] < 20 + 16  # it did evict
    assert torch.equal(_generate(model, ids, mask, None), plain_before)
    speculative = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=12, custom_generate=TokenRecycling()
    )
    assert torch.equal(speculative, plain_before)
    assert compressed.shape[1] == ids.shape[1] + 16


def test_opting_in_to_the_scoring_attention_is_kept():
    model = tiny_causal_lm("llama")
    ids, mask = _padded_batch()
    expected = _generate(model, ids, mask, StreamingCache(model.config, sink_tokens=2, window=6))
    model.set_attn_implementation(ATTENTION_NAME)  # documented opt-in: SDPA for every other cache
    assert torch.equal(_generate(model, ids, mask, StreamingCache(model.config, sink_tokens=2, window=6)), expected)
    assert model.config._attn_implementation == ATTENTION_NAME
    assert torch.equal(_generate(model, ids, mask, None), _generate(tiny_causal_lm("llama"), ids, mask, None))


@pytest.mark.parametrize("rows", [1, 2])
def test_snapkv_under_speculative_decoding_equals_plain_snapkv(rows):
    """SnapKV evicts the prompt once, at prefill; decoding appends. Speculative greedy decoding over it (tree masks
    read per kept slot, ragged acceptance holes in batches) gives exactly plain greedy decoding over it."""
    from hf_efficient.speculative import DraftModel, TokenRecycling

    model = tiny_causal_lm("llama")
    ids, mask = _padded_batch((30, 21)[:rows])
    expected = _generate(model, ids, mask, SnapKVCache(model.config, budget=12, window=4), new_tokens=20)
    for strategy in (TokenRecycling(tree=6), DraftModel(model, max_depth=3, stop_threshold=None)):
        cache = SnapKVCache(model.config, budget=12, window=4)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=20, custom_generate=strategy, **cache_kwarg(cache)
        )
        assert torch.equal(out, expected), type(strategy).__name__
        assert strategy.stats.mean_accepted > 1.0  # drafts were verified over the compressed cache
        decoded = cache.get_seq_length() - ids.shape[1]  # columns since the prompt (with holes in a batch)
        assert cache.layers[0].keys.shape[-2] == 12 + decoded  # the compressed prompt and every decoded column


def test_streaming_under_speculative_decoding_stays_in_budget():
    """StreamingLLM rolls back rejected drafts exactly (eviction waits for the crop) and keeps its budget; until the
    window first fills, its output is plain greedy decoding."""
    from hf_efficient.speculative import DraftModel

    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    strategy = DraftModel(model, max_depth=3, stop_threshold=None)
    cache = StreamingCache(model.config, sink_tokens=2, window=10)
    out = model.generate(ids, max_new_tokens=30, do_sample=False, custom_generate=strategy, **cache_kwarg(cache))
    assert out.shape[1] == 6 + 30 and strategy.stats.mean_accepted > 1.0
    assert cache.layers[0].keys.shape[-2] == 12 and cache.get_seq_length() == 6 + 30 - 1
    early = model.generate(ids, max_new_tokens=5, do_sample=False)  # 6 + 5 tokens fit in 2 sinks + 10
    assert torch.equal(out[:, : early.shape[1]], early)


def test_heavy_hitter_refused_by_speculative_decoding_for_the_right_reason():
    from hf_efficient.speculative import TokenRecycling

    model = tiny_causal_lm("llama")
    cache = HeavyHitterCache(model.config, budget=12, recent=4)
    with pytest.raises(ValueError, match="is_croppable=False"):
        model.generate(
            torch.randint(3, 96, (1, 8)), max_new_tokens=4, custom_generate=TokenRecycling(), **cache_kwarg(cache)
        )
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["gear", "kivi", "streaming", "snapkv"])
def test_croppable_caches_under_hf_assisted_decoding(name):
    """HF's own assisted decoding (prompt lookup) records the past and crops (5.25 passes `recurrent_states_to_keep`
    to every layer's `activate_past_recording`); the croppable caches take it and keep their budgets."""
    model = tiny_causal_lm("llama")
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(2)).repeat(1, 2)  # repeats to look up
    cache = COMPRESSING[name](model.config)
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=3)
    out = model.generate(ids, **kwargs, **cache_kwarg(cache))
    assert out.shape == (1, 24 + 20) and model.config._attn_implementation == "sdpa"
    assert cache.get_seq_length() == 24 + 20 - 1
    if name == "streaming":
        assert cache.layers[0].keys.shape[-2] <= 12 + 3  # 2 sinks + 10 recent, plus at most the last draft


def test_kivi_key_bits_quantize_keys_and_values_apart():
    model = tiny_causal_lm("llama")
    cache = KIVICache(model.config, bits=2, key_bits=4, group_size=8, residual_length=16)
    _generate(model, *_padded_batch(), cache, new_tokens=12)
    layer = cache.layers[0]
    assert layer.key_store.bits == 4 and layer.value_store.bits == 2
    both_2bit = KIVICache(model.config, bits=2, group_size=8, residual_length=16)
    _generate(model, *_padded_batch(), both_2bit, new_tokens=12)
    assert both_2bit.nbytes() < cache.nbytes()
    with pytest.raises(ValueError, match="key_bits=3"):
        KIVICache(model.config, key_bits=3)
