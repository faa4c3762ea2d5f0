"""Benchmarks: one module per benchmark in this package, found by name (see CONTRIBUTING.md).

```python
from hf_efficient import bench

report = bench.run("baseline", device="cpu")   # also writes bench-results/baseline.{json,md,png}
```
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from .harness import BenchReport

__all__ = ["BenchReport", "available", "description", "run"]

_NOT_BENCHMARKS = {"chat_prompts", "harness", "prompts"}


def available() -> list[str]:
    """Names of the benchmarks in this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_BENCHMARKS)


def _module(name: str):
    names = available()
    if name not in names:
        raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(names)} (or 'all')")
    return importlib.import_module(f".{name}", __name__)


def description(name: str) -> str:
    """The benchmark's one-line `DESCRIPTION`."""
    return _module(name).DESCRIPTION


def run(
    name: str,
    device: str = "cpu",
    *,
    quick: bool = False,
    out_dir: str | Path = "bench-results",
    record: str | Path | None = None,
) -> BenchReport:
    """Run benchmark `name` on `device`, save JSON/Markdown/PNG into `out_dir`, optionally record it.

    Args:
        name (`str`): one of `available()`.
        device (`str`, *optional*, defaults to `"cpu"`): `"cpu"` or `"cuda"`.
        quick (`bool`, *optional*, defaults to `False`): a seconds-long smoke run (tests use it).
        out_dir (`str | Path`, *optional*, defaults to `"bench-results"`): where the files go.
        record (`str | Path`, *optional*): a BENCHMARKS.md whose section for this benchmark is replaced.
    """
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} requested but torch.cuda.is_available() is False")
    report = _module(name).run(device=device, quick=quick)
    report.save(out_dir)
    if record is not None:
        report.record(record)
    return report
