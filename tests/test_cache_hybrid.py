"""Compressed caches on hybrid models (`config.layer_types` mixing sliding-window and full-attention layers, as in
Gemma 3) and on Mistral-style all-sliding configs: layers follow the layer types, sliding layers hold only their
window, degenerate settings equal `DynamicCache`, rollback is exact, unsupported layer types are refused by name."""

import copy

import pytest
import torch
from factories import tiny_causal_lm, tiny_hybrid_lm
from test_cache import COMPRESSING, DEGENERATE, _generate, _padded_batch
from transformers import DynamicCache

from hf_efficient.cache import GEARCache, HeavyHitterCache, KIVICache, StreamingCache
from hf_efficient.cache.base import SlidingWindowLayer
from hf_efficient.cache.compressed import ResidualCompressedLayer
from hf_efficient.compat import cache_kwarg
from hf_efficient.speculative import TokenRecycling

WINDOW = 8


def _held(layer) -> int:
    """Tokens a layer holds (compressed blocks included)."""
    if isinstance(layer, ResidualCompressedLayer):
        return layer.stored_tokens + layer.keys.shape[-2]
    return layer.keys.shape[-2]


@pytest.mark.parametrize("name", list(DEGENERATE))
def test_degenerate_settings_equal_dynamic_cache_on_a_hybrid_model(name):
    """Nothing to compress or evict on the full layers, the window on the sliding ones: identical greedy output to
    DynamicCache (which keeps the same windows), left-padded batch of 2, past the window."""
    model = tiny_hybrid_lm(WINDOW)
    ids, mask = _padded_batch()
    expected = _generate(model, ids, mask, DynamicCache(config=model.config), new_tokens=20)
    cache = DEGENERATE[name](model.config)
    assert torch.equal(_generate(model, ids, mask, cache, new_tokens=20), expected)
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert [layer.is_sliding for layer in cache.layers] == [True, True, False, True], kinds
    for layer in cache.layers:
        if layer.is_sliding:
            assert _held(layer) <= WINDOW, (name, kinds)


@pytest.mark.parametrize("name", list(COMPRESSING))
@torch.no_grad()
def test_sliding_layers_hold_at_most_their_window(name):
    model = tiny_hybrid_lm(WINDOW)
    ids, mask = _padded_batch()
    cache = COMPRESSING[name](model.config)
    _generate(model, ids, mask, cache, new_tokens=30)
    full, sliding = cache.layers[2], [cache.layers[i] for i in (0, 1, 3)]
    for layer in sliding:
        residual = getattr(layer, "residual_length", 0)
        assert _held(layer) <= WINDOW + residual, type(layer).__name__
    assert _held(full) > WINDOW + getattr(full, "residual_length", 0) or name not in ("gear", "kivi")


@pytest.mark.parametrize("sliding_layers", ["compressed", "window"])
def test_compressed_window_attends_like_the_full_precision_window(sliding_layers):
    """8-bit KIVI with blocks dropped out of the window: teacher-forced logits stay within the quantisation error
    of DynamicCache's (a wrong mask offset or a dropped visible block would change them by far more)."""
    model = tiny_hybrid_lm(16)
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (1, 72))
    kivi = KIVICache(model.config, bits=8, group_size=8, residual_length=8, sliding_layers=sliding_layers)
    dynamic = DynamicCache(config=model.config)
    with torch.no_grad():
        expected = torch.cat([model(ids[:, i : i + 8], **cache_kwarg(dynamic)).logits for i in range(0, 72, 8)], 1)
        logits = torch.cat([model(ids[:, i : i + 8], **cache_kwarg(kivi)).logits for i in range(0, 72, 8)], 1)
    error = (logits - expected).abs().max() / expected.abs().max()
    assert error < 0.02, float(error)
    window_layer = kivi.layers[0]
    assert isinstance(window_layer, ResidualCompressedLayer if sliding_layers == "compressed" else SlidingWindowLayer)
    if sliding_layers == "compressed":
        assert window_layer.stored_tokens > 0 and _held(window_layer) <= 16 + 8
        assert window_layer.get_mask_sizes(1) == (_held(window_layer) + 1, 72 - _held(window_layer))
    assert kivi.nbytes() < sum(layer.keys.numel() * 2 * layer.keys.element_size() for layer in dynamic.layers)


@torch.no_grad()
def test_crop_rolls_back_exactly_on_a_hybrid_model():
    model = tiny_hybrid_lm(WINDOW)
    cache = KIVICache(model.config, bits=4, group_size=8, residual_length=8)
    model(torch.randint(3, 96, (1, 20)), **cache_kwarg(cache), use_cache=True)
    before = copy.deepcopy(cache)
    cache.activate_past_recording()
    model(torch.randint(3, 96, (1, 5)), **cache_kwarg(cache), use_cache=True)  # a draft of 5 tokens
    cache.crop(-5)
    assert cache.get_seq_length() == before.get_seq_length() == 20
    logits = model(torch.tensor([[9]]), **cache_kwarg(cache), use_cache=True).logits
    expected = model(torch.tensor([[9]]), **cache_kwarg(before), use_cache=True).logits
    torch.testing.assert_close(logits, expected)


def test_mistral_style_sliding_window_compresses_every_layer():
    """Every layer sliding (Mistral's `sliding_window`, no `layer_types`): the quantised caches still compress
    (`sliding_layers="compressed"`, the default); `"window"` keeps full-precision windows."""
    model = tiny_causal_lm("mistral", sliding_window=24)
    ids, mask = _padded_batch()
    for sliding_layers, layer_type in (("compressed", ResidualCompressedLayer), ("window", SlidingWindowLayer)):
        cache = GEARCache(model.config, bits=4, group_size=8, residual_length=8, sliding_layers=sliding_layers)
        _generate(model, ids, mask, cache, new_tokens=30)
        assert all(isinstance(layer, layer_type) and layer.is_sliding for layer in cache.layers)
        assert all(_held(layer) <= 24 + 8 for layer in cache.layers)


def test_eviction_keeps_the_smaller_of_window_and_budget():
    model = tiny_hybrid_lm(WINDOW)
    small, large = StreamingCache(model.config, sink_tokens=2, window=4), HeavyHitterCache(model.config, budget=32)
    assert not isinstance(small.layers[0], SlidingWindowLayer)  # budget 6 < window 8: the policy
    assert isinstance(large.layers[0], SlidingWindowLayer) and not isinstance(large.layers[2], SlidingWindowLayer)


def test_unsupported_layer_types_are_refused_by_name():
    model = tiny_causal_lm("llama", num_hidden_layers=2)
    config = copy.deepcopy(model.config)
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match=r"layer 1 .*'linear_attention'.*DynamicCache"):
        KIVICache(config)
    with pytest.raises(ValueError, match="sliding_layers='fp8' is not one of"):
        KIVICache(model.config, sliding_layers="fp8")


@pytest.mark.parametrize(
    "factory",
    [
        lambda c, s: KIVICache(c, bits=8, group_size=8, residual_length=8, sliding_layers=s),
        lambda c, s: StreamingCache(c, sink_tokens=2, window=60, sliding_layers=s),
    ],
    ids=["kivi", "streaming"],
)
def test_speculative_decoding_past_the_window_needs_full_history_layers(factory):
    """Tree verification addresses every column it wrote: windowed layers refuse to go past the window with a clear
    error, and `sliding_layers="full"` keeps the whole history (window in the mask), equal to plain `generate`."""
    model = tiny_hybrid_lm(WINDOW)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    strategy = TokenRecycling()
    with pytest.raises(ValueError, match="sliding window"):
        model.generate(
            ids, **cache_kwarg(factory(model.config, "window")), max_new_tokens=24, custom_generate=strategy
        )
    plain = model.generate(ids, **cache_kwarg(factory(model.config, "full")), max_new_tokens=24, do_sample=False)
    spec = model.generate(
        ids, **cache_kwarg(factory(model.config, "full")), max_new_tokens=24, custom_generate=strategy
    )
    assert torch.equal(spec, plain)
