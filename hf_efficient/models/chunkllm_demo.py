"""`hf-efficient demo` section for ChunkLLM: wrap a frozen decoder, check exactness, decode chunk-selectively, then
save the adapters alone and load them back onto the backbone."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

__all__ = ["demo"]


def _backbone():
    """The reference target when it is already built, else a small random Llama (the demo never trains)."""
    from hf_efficient.reference import reference_model

    try:
        model, tokenizer = reference_model("target", build=False)
        return model, tokenizer, "reference target"
    except FileNotFoundError:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval(), None, "random 2-layer Llama (reference target not built)"


def demo() -> None:
    """Print exactness with selection off, then chunk boundaries, KV retention and speed with selection on, then the
    size of an adapter checkpoint and whether the reloaded model decodes the same tokens."""
    from hf_efficient.models import ChunkLLMForCausalLM

    backbone, tokenizer, name = _backbone()
    if tokenizer is not None:
        text = "def read(path):\n    with open(path) as f:\n        return f.read()\n\n" * 8
        input_ids = tokenizer(text, return_tensors="pt").input_ids
    else:
        input_ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    print(f"ChunkLLM on {name}: prompt of {input_ids.shape[1]} tokens")
    kwargs = dict(max_new_tokens=16, do_sample=False)

    exact = ChunkLLMForCausalLM.from_backbone(backbone, top_k_chunks=10_000)
    same = torch.equal(exact.generate(input_ids, **kwargs), backbone.generate(input_ids, **kwargs))
    print(f"  top_k_chunks covering every chunk -> identical to the backbone: {same}")

    model = ChunkLLMForCausalLM.from_backbone(backbone, top_k_chunks=4, sink_tokens=4)
    with torch.no_grad():  # untrained adapters: shift the boundary logits so ~1 token in 8 closes a chunk
        logits = model.boundary_adapter(backbone.get_input_embeddings()(input_ids))
        model.boundary_adapter.out.bias.sub_(logits.quantile(0.875))
    fires = model.boundary_probabilities(input_ids)[0] > model.config.boundary_threshold
    print(f"  boundary adapter closes {int(fires.sum())} chunks (untrained adapters, for illustration)")
    start = time.perf_counter()
    out = model.generate(input_ids, **kwargs)
    seconds = time.perf_counter() - start
    print(f"  top_k_chunks=4, sink_tokens=4: kv_retention={model.kv_retention:.2f}, {16 / seconds:.1f} tokens/s")
    if tokenizer is not None:
        print("  continuation:", repr(tokenizer.decode(out[0, input_ids.shape[1] :])))
    _adapter_checkpoint(model, backbone, input_ids, out, kwargs)
    print("  train adapters with `hf-efficient train train_chunkllm -- --output-dir runs/chunkllm`")


def _adapter_checkpoint(model, backbone, input_ids, expected, generate_kwargs: dict) -> None:
    """Save the adapters (not the backbone) and load them back onto it: the checkpoint's size and the same tokens."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        if model.config.base_model_name_or_path is None:  # the random backbone, built in memory: saved first
            backbone.save_pretrained(Path(folder) / "backbone")
            model.config.base_model_name_or_path = str(Path(folder) / "backbone")
        model.save_pretrained(Path(folder) / "adapters")  # adapters + config naming the backbone
        size = (Path(folder) / "adapters" / "model.safetensors").stat().st_size
        reloaded = AutoModelForCausalLM.from_pretrained(Path(folder) / "adapters")  # loads the backbone it names
        same = torch.equal(reloaded.generate(input_ids, **generate_kwargs), expected)
    backbone_bytes = sum(p.numel() * p.element_size() for p in backbone.parameters())
    print(
        f"  adapter checkpoint: {size / 1e6:.2f} MB beside a {backbone_bytes / 1e6:.1f} MB backbone it does not "
        f"contain; reloaded onto the backbone -> same tokens: {same}"
    )


if __name__ == "__main__":
    demo()
