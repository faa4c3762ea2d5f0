"""Save and restore a speculative strategy (settings, learned state, drafter) as a folder.

Used by `hf_efficient.hub.export_custom_generate` for Hub `custom_generate/` folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from .acceptance_head import AcceptanceHead
from .draft_model import DraftModel
from .engine import SpeculativeDecoder
from .token_recycling import TokenRecycling
from .vocab_trim import load_drafter

__all__ = ["load_strategy", "save_strategy"]

_SPEC = "strategy.json"


def save_strategy(strategy: SpeculativeDecoder, folder: str | os.PathLike) -> Path:
    """Write `strategy.json` (class and settings) and the strategy's state files into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(strategy, TokenRecycling):
        spec = {"tree": strategy.tree, "topk": strategy.topk, "warm_start": strategy.warm_start}
        if strategy.adjacency is not None:
            strategy.save(folder / "recycling.safetensors")
    elif isinstance(strategy, DraftModel):
        spec = {
            "tree_size": strategy.tree_size,
            "topk": strategy.topk,
            "max_depth": strategy.max_depth,
            "chain": strategy.chain,
            "stop_threshold": strategy.stop_threshold,
        }
        strategy.drafter.save_pretrained(folder / "drafter")
        calibration = {"hits": strategy.calibration_hits, "trials": strategy.calibration_trials}
        save_file(calibration, os.fspath(folder / "calibration.safetensors"))
        if strategy.acceptance_head is not None:
            strategy.acceptance_head.save(folder / "acceptance_head.safetensors")
    else:
        raise ValueError(f"cannot export {type(strategy).__name__}; exportable: TokenRecycling, DraftModel")
    (folder / _SPEC).write_text(json.dumps({"class": type(strategy).__name__, "kwargs": spec}, indent=2))
    return folder


def load_strategy(folder: str | os.PathLike, device=None) -> SpeculativeDecoder:
    """Rebuild a strategy written by `save_strategy` (drafter moved to `device` when given)."""
    folder = Path(folder)
    spec = json.loads((folder / _SPEC).read_text())
    kwargs = spec["kwargs"]
    if spec["class"] == "TokenRecycling":
        strategy = TokenRecycling(**kwargs)
        if (folder / "recycling.safetensors").exists():
            strategy.load(folder / "recycling.safetensors")
        return strategy
    if spec["class"] == "DraftModel":
        drafter = load_drafter(folder / "drafter")  # trimmed-vocabulary drafters too
        if device is not None:
            drafter = drafter.to(device)
        head_file = folder / "acceptance_head.safetensors"
        head = AcceptanceHead.load(head_file).to(drafter.device) if head_file.exists() else None
        strategy = DraftModel(drafter, acceptance_head=head, **kwargs)
        if (folder / "calibration.safetensors").exists():
            calibration = load_file(os.fspath(folder / "calibration.safetensors"))
            strategy.calibration_hits, strategy.calibration_trials = calibration["hits"], calibration["trials"]
        return strategy
    raise ValueError(f"{folder / _SPEC} names an unknown strategy class {spec['class']!r}")
