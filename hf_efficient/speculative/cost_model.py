"""Never slower than plain: the target's forward time against the number of tokens it verifies, measured once per
model, dtype, device and thread count and kept on disk, and the planner that sizes every step's draft from it.

A step that verifies `t` tokens costs `seconds[t]` and yields `1 + E[accepted]` tokens; the planner picks the draft
maximising tokens per second, and a draft of no tokens (one root-only forward: plain decoding) whenever drafting
would not pay.

```python
from hf_efficient.speculative.cost_model import ForwardCostModel, plan_draft

costs = ForwardCostModel().forward_costs(model)  # {tokens verified: seconds}, timed at most once per machine
```

This module is copied into exported `custom_generate/` folders: it imports nothing of `hf_efficient` but siblings.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..compat import DynamicCache, cache_kwarg
from .kv import KVLayout, tree_attention_mask

__all__ = [
    "ForwardCostModel",
    "cost_cache_file",
    "device_name",
    "forward_seconds",
    "measure_forward_costs",
    "model_key",
    "plan_draft",
]

SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)  # tokens per timed forward
_CONTEXT = 256  # cached tokens the timed forwards attend to (a typical chat prompt)
_REPEATS = 3  # timed runs per size after one warm-up; the fastest counts (other processes only ever add time)
_COST_FILE = "forward_costs.json"
_SHAPE_FIELDS = (  # what forward time depends on, besides class, dtype and attention implementation
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
    "layer_types",
    "tie_word_embeddings",
)
_MEASURED: dict[tuple[Path, str], dict[int, float]] = {}  # this process's lookups: (file, `ForwardCostModel.key`)


class ForwardCostModel:
    """Seconds of one target forward by the number of tokens it verifies.

    `forward_costs(model)` returns the timings of this model, dtype, device and torch thread count: from this
    process, else from the JSON file `cache_file` (shared by every strategy and process), else measured now (15
    sizes, 4 forwards each, on a fresh cache of 256 random tokens: the user's cache is never touched) and written
    there. Passing `costs` pins them instead (nothing is measured), e.g. to replay another machine's timings or to
    test the planner.

    Args:
        costs (`dict[int, float]`, *optional*): fixed seconds per forward by tokens verified.
        cache_file (`str` or `os.PathLike`, *optional*): the timings file; defaults to `cost_cache_file()`.
    """

    def __init__(self, costs: Mapping[int, float] | None = None, cache_file: str | os.PathLike | None = None):
        if costs is not None and (not costs or min(costs) < 1 or min(costs.values()) <= 0):
            raise ValueError(f"costs={dict(costs)} must map token counts >= 1 to positive seconds")
        self.costs = None if costs is None else {int(size): float(s) for size, s in costs.items()}
        self.cache_file = cache_file

    def key(self, model: PreTrainedModel) -> str:
        """What the timings depend on: the model (`model_key`), its device and, on CPU, torch's thread count."""
        device = device_name(model.device)
        threads = f"/threads={torch.get_num_threads()}" if model.device.type == "cpu" else ""
        return f"{model_key(model)}/{device}{threads}"

    def forward_costs(self, model: PreTrainedModel) -> dict[int, float]:
        """`{tokens verified: seconds}` for `model` on its device (see the class docstring)."""
        if self.costs is not None:
            return dict(self.costs)
        path = Path(self.cache_file) if self.cache_file is not None else cost_cache_file()
        key = self.key(model)
        if (path, key) not in _MEASURED:
            stored = _read(path).get(key)
            costs = {int(s): float(t) for s, t in stored.items()} if stored else measure_forward_costs(model)
            if not stored:
                _write(path, key, costs)
            _MEASURED[path, key] = costs
        return dict(_MEASURED[path, key])


def cost_cache_file() -> Path:
    """`forward_costs.json` in hf_efficient's cache: `$HF_EFFICIENT_CACHE`, else `$XDG_CACHE_HOME/hf_efficient/
    reference`, else `~/.cache/hf_efficient/reference` (`hf_efficient.reference.cache_dir()`'s rule, restated here
    because exported `custom_generate/` folders run this module without `hf_efficient`)."""
    if os.environ.get("HF_EFFICIENT_CACHE"):
        return Path(os.environ["HF_EFFICIENT_CACHE"]).expanduser() / _COST_FILE
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hf_efficient" / "reference" / _COST_FILE


def model_key(model: PreTrainedModel) -> str:
    """The model's class, dtype, attention implementation and a hash of the configuration fields that shape its
    forward (`_SHAPE_FIELDS`; names, paths and saved-file details aside, so a reloaded model keeps its key)."""
    config = model.config.get_text_config(decoder=True)
    shape = {name: getattr(config, name, None) for name in _SHAPE_FIELDS}
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    return f"{type(model).__name__}/{digest}/{str(model.dtype).removeprefix('torch.')}/{attn}"


@torch.no_grad()
def measure_forward_costs(model: PreTrainedModel, sizes: Sequence[int] = SIZES) -> dict[int, float]:
    """Time one forward of `size` chained tokens for every size, over a fresh cache of random context.

    The cache is a `DynamicCache` of full layers and sliding windows go into the masks, exactly as verification
    runs (`full_history_cache`, `tree_attention_mask`), so windowed and hybrid models are timed as they decode.
    Each size keeps its fastest run, and no size more than a larger one (timing noise only ever adds time).
    """
    device = model.device
    config = model.config.get_text_config(decoder=True)
    context = min(_CONTEXT, (getattr(config, "max_position_embeddings", None) or 4096) - max(sizes))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (1, max(context, max(sizes))), generator=generator).to(device)
    cache = DynamicCache()
    model(input_ids=ids[:, :context], use_cache=True, **cache_kwarg(cache))
    layout = KVLayout.from_prompt(None, ids[:, :context])
    costs = {}
    for size in sizes:
        ancestors = torch.ones(size, size, dtype=torch.bool, device=device).tril()[None]  # (1, size, size): a chain
        positions = layout.next_positions()[:, None] + torch.arange(size, device=device)  # (1, size)
        mask = tree_attention_mask(model.config, layout, ancestors, positions, model.dtype)
        times = []
        for _ in range(_REPEATS + 1):
            _synchronize(device)
            start = time.perf_counter()
            model(input_ids=ids[:, :size], attention_mask=mask, position_ids=positions, **cache_kwarg(cache))
            _synchronize(device)
            times.append(time.perf_counter() - start)
            cache.crop(-size)
        costs[size] = min(times[1:])
    for smaller, larger in zip(sorted(sizes)[-2::-1], sorted(sizes)[::-1]):  # more tokens never run faster: a
        costs[smaller] = min(costs[smaller], costs[larger])  # smaller size timed slower was disturbed
    return costs


def forward_seconds(costs: Mapping[int, float], tokens: int) -> float:
    """Seconds of a forward over `tokens` tokens: linear between the timed sizes, the smallest's below them and the
    last two's slope above them."""
    sizes = sorted(costs)
    if tokens <= sizes[0]:
        return costs[sizes[0]]
    if len(sizes) == 1:
        return costs[sizes[0]] * tokens / sizes[0]
    i = min(bisect.bisect_left(sizes, tokens), len(sizes) - 1)
    lo, hi = sizes[i - 1], sizes[i]
    return costs[lo] + (costs[hi] - costs[lo]) * (tokens - lo) / (hi - lo)


def plan_draft(
    seconds: Sequence[float],
    template_gains: Mapping[int, float],
    chain_gains: Sequence[float] = (0.0,),
) -> tuple[int, int]:
    """The draft that maximises expected tokens per second: a template of `n` nodes (root included) plus a chain of
    `c` tokens, scored `(1 + template_gains[n] + chain_gains[c]) / seconds[n + c]`.

    Args:
        seconds (`Sequence[float]`): `seconds[t]`: one verification forward of `t` nodes per row (index 0 unused).
        template_gains (`Mapping[int, float]`): expected accepted tokens by template size; must hold `1: 0.0`, the
            root-only (plain) step.
        chain_gains (`Sequence[float]`, *optional*): expected accepted tokens of a chain of `c` tokens (0 at 0).

    Returns:
        `(n, c)`; `(1, 0)` is a plain decoding step. Ties go to the smaller draft.
    """
    best, best_rate = (1, 0), 1.0 / seconds[1]
    for n, gain in sorted(template_gains.items()):
        for c in range(min(len(chain_gains), len(seconds) - n)):
            rate = (1.0 + gain + chain_gains[c]) / seconds[n + c]
            if rate > best_rate:
                best, best_rate = (n, c), rate
    return best


def device_name(device: torch.device) -> str:
    """What forward timings depend on: `"cpu"`, or the accelerator's type and name (`"cuda:NVIDIA H200"`)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing or half-written by a killed process: measure again
        return {}


def _write(path: Path, key: str, costs: dict[int, float]) -> None:
    """Add `key`'s timings to the file (written to a temporary file first: concurrent readers never see half)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = _read(path) | {key: {str(size): seconds for size, seconds in costs.items()}}
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(table, indent=1, sort_keys=True))
        temporary.replace(path)
    except OSError:  # a read-only cache: keep the timings for this process only
        pass
