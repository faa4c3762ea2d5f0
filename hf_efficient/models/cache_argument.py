"""The cache argument's name on the installed transformers: the shim each remote-code model folder carries.

transformers 5.24 renamed `past_key_values` to `cache` (forward and `generate` kwargs, the field of model outputs,
`prepare_inputs_for_generation`); the old spelling keeps working with a `FutureWarning` until 5.40 (forward) and
6.0 (`generate`). Model code passes `**cache_kwarg(cache)`, reads `output_cache(out)` and builds outputs with
`**cache_kwarg(...)`, so it never triggers that warning on any release; forwards accept both spellings from their
callers through `either_cache`.

Each model folder links to this file (remote code is a flat folder: `save_pretrained` writes the link as a plain
file), so it imports nothing of `hf_efficient`; `hf_efficient.compat` re-exports it for the rest of the package.
"""

from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["CACHE_ARG", "CACHE_ARG_SPELLINGS", "LEGACY_CACHE_ARG", "cache_kwarg", "either_cache", "output_cache"]

LEGACY_CACHE_ARG = "past_key_values"
CACHE_ARG_SPELLINGS = ("cache", LEGACY_CACHE_ARG)  # what callers may pass, whatever the installed release
# the name this release's forwards, `generate` and model outputs use
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else LEGACY_CACHE_ARG


def cache_kwarg(cache: Any) -> dict[str, Any]:
    """`{name: cache}` under the name the installed release expects (for a forward call or a model output)."""
    return {CACHE_ARG: cache}


def output_cache(output: Any) -> Any:
    """The cache held by a model output (`out.cache` from 5.24, `out.past_key_values` before), or `None`."""
    return output.get(CACHE_ARG) if hasattr(output, "get") else getattr(output, CACHE_ARG, None)


def either_cache(cache: Any = None, past_key_values: Any = None) -> Any:
    """The cache a caller passed under either spelling; both at once must be the same object.

    Raises:
        `ValueError`: when `cache` and `past_key_values` are two different objects.
    """
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once: as `cache` (transformers >= 5.24) or `past_key_values`, not both")
    return cache if cache is not None else past_key_values
