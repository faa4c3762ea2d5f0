"""The compatibility seam: the cache argument under the installed release's name, both spellings accepted."""

import pytest
import torch
import transformers
from factories import tiny_causal_lm
from packaging.version import Version
from transformers.modeling_outputs import CausalLMOutputWithPast

from hf_efficient.compat import (
    CACHE_ARG,
    DynamicCache,
    accepts_cache,
    cache_kwarg,
    either_cache,
    generate_streamer,
    output_cache,
)
from hf_efficient.models import ByteTokenizer, HNetConfig, HNetForCausalLM


def test_cache_argument_follows_the_installed_release():
    renamed = Version(transformers.__version__) >= Version("5.24.0")
    assert ("cache" if renamed else "past_key_values") == CACHE_ARG
    cache = DynamicCache()
    assert output_cache(CausalLMOutputWithPast(**cache_kwarg(cache))) is cache
    assert output_cache(CausalLMOutputWithPast()) is None


def test_either_cache():
    first, second = DynamicCache(), DynamicCache()
    assert either_cache(first, None) is first and either_cache(None, first) is first
    assert either_cache(first, first) is first and either_cache() is None
    with pytest.raises(ValueError, match="once"):
        either_cache(first, second)


def test_model_forwards_take_both_spellings():
    model = tiny_causal_lm("llama")
    assert accepts_cache(model)
    torch.manual_seed(0)
    config = HNetConfig(hidden_size=[32, 48], intermediate_size=[0, 96], num_attention_heads=[2, 2])
    hnet = HNetForCausalLM(config).eval()
    ids = ByteTokenizer()(["hello"], return_tensors="pt").input_ids
    assert accepts_cache(hnet)
    with torch.no_grad():
        new = hnet(ids, use_cache=True, cache=None)
        old = hnet(ids, use_cache=True, past_key_values=None)
        torch.testing.assert_close(new.logits, old.logits)
        step = torch.tensor([[ord("!")]])
        after_new = hnet(step, use_cache=True, cache=output_cache(new)).logits
        after_old = hnet(step, use_cache=True, past_key_values=output_cache(old)).logits
    torch.testing.assert_close(after_new, after_old)


def test_generate_streamer_outside_generate_is_none():
    assert generate_streamer(object()) is None
