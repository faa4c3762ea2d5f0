"""A same-tokenizer drafter cut from the target itself: a few of its decoder layers, its embeddings and LM head.

No separately trained small model shares SmolLM2's (or most chat models') exact tokenizer *and* its chat behaviour;
the target's own first layers and its output head are the closest start. The cut model is then distilled towards
the target on its own outputs (`recipes/distill_drafter.py --student-layers`, DistillSpec) and its LM head trimmed
to the tokens the target generates (`trim_drafter_vocab`, VocabTrim), which is where most of a small drafter's
cost goes: on SmolLM2-135M the tied `(49152, 576)` head weighs as much as eight of its 30 layers.

Papers: Zhou et al., "DistillSpec", ICLR 2024, arXiv:2310.08461 (on-policy distillation of the drafter);
Elhoushi et al., "LayerSkip", ACL 2024, arXiv:2404.16710 (early layers + the shared LM head as the draft model);
Goel et al., "VocabTrim", arXiv:2506.22694.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

__all__ = ["drafter_from_target", "layer_selection"]


def layer_selection(num_layers: int, keep: int) -> list[int]:
    """The target layers a `keep`-layer drafter starts from: the first `keep - 1` and the last.

    The early layers turn embeddings into the features the later ones read; the last layer writes what the final
    norm and LM head expect. (Evenly spaced layers break the residual stream at every gap; on SmolLM2 they start
    from a worse top-1 agreement with the target.)
    """
    if not 1 <= keep <= num_layers:
        raise ValueError(f"keep={keep} must be between 1 and the target's {num_layers} layers")
    return [*range(keep - 1), num_layers - 1]


@torch.no_grad()
def drafter_from_target(target: PreTrainedModel, layers: int | Sequence[int]) -> PreTrainedModel:
    """A new causal LM of the target's class holding copies of `layers` of the target's decoder layers, its input
    embeddings, final norm and LM head (tied again if the target ties them). The target is not modified.

    Args:
        target (`PreTrainedModel`): a decoder-only causal LM whose layers live in `target.model.layers`
            (Llama, Mistral, Qwen2, Gemma 3 and most HF decoders).
        layers (`int` or `Sequence[int]`): how many layers to keep (`layer_selection`), or which ones, in order.

    Example:

    ```python
    >>> drafter = drafter_from_target(target, 4)          # layers 0, 1, 2 and the last
    >>> strategy = DraftModel(drafter)                     # lossless, whatever its acceptance
    ```
    """
    source_layers = getattr(target.base_model, "layers", None)
    if source_layers is None:
        raise ValueError(
            f"{type(target).__name__} keeps no `layers` list on its base model; cut a drafter from a decoder-only "
            "model like Llama, Mistral, Qwen2 or Gemma 3, or pass a small pretrained model to `DraftModel`"
        )
    count = len(source_layers)
    chosen = layer_selection(count, layers) if isinstance(layers, int) else [int(i) for i in layers]
    if not chosen or any(not 0 <= i < count for i in chosen):
        raise ValueError(f"layers={list(chosen)} must be a non-empty list of indices below {count}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(chosen)
    if getattr(config, "layer_types", None) is not None:  # sliding/full hybrids keep each kept layer's kind
        config.layer_types = [config.layer_types[i] for i in chosen]
    drafter = AutoModelForCausalLM.from_config(config, dtype=target.dtype)
    state = {}
    for name, tensor in target.state_dict().items():
        prefix, _, rest = name.partition("layers.")
        if rest and prefix.endswith(("model.", "language_model.")) and rest.split(".", 1)[0].isdigit():
            index, tail = rest.split(".", 1)
            if int(index) in chosen:
                state[f"{prefix}layers.{chosen.index(int(index))}.{tail}"] = tensor.clone()
        else:
            state[name] = tensor.clone()
    missing, unexpected = drafter.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.endswith("lm_head.weight")]  # tied: filled by tie_weights
    if missing or unexpected:
        raise ValueError(f"could not map the target's weights onto the drafter: missing {missing}, extra {unexpected}")
    drafter.tie_weights()
    drafter.generation_config = copy.deepcopy(target.generation_config)
    return drafter.to(target.device).eval()
