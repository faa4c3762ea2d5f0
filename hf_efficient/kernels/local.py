"""hf_efficient's own kernels, kept in the Hub kernel layout and built into loadable local repositories.

Each kernel is a folder of `hf_efficient/kernels/sources/` laid out like a `kernel-builder` source repository:

```
ema-scan/
  build.toml                      # [general] name, version, license, backends; [torch-noarch]: Python only
  torch-ext/ema_scan/__init__.py  # the ops (`ema_scan`) and `from . import layers`
  torch-ext/ema_scan/layers.py    # `EMAScan`: a stateless `nn.Module` whose `forward` replaces ours
```

The kernels are pure PyTorch (noarch), so "building" one is what `kernel-builder` does for such a kernel: copy the
package into one `build/torch-<backend>/` variant per backend of `build.toml`, next to a `metadata.json`. The built
folder is a complete Hub kernel repository (sources and builds), ready to publish: `kernels.LocalLayerRepository(path,
...)`, `kernels.get_local_kernel(path)` and `LOCAL_KERNELS=<repo id>=<path>` load it offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["OWN_KERNELS", "SOURCES", "build_kernel", "kernel_source", "kernels_cache_dir", "local_kernel"]

SOURCES = Path(__file__).parent / "sources"
OWN_KERNELS = ("ema-scan", "group-dequantize")


def kernel_source(name: str) -> Path:
    """Source folder of own kernel `name` (one of `OWN_KERNELS`)."""
    if name not in OWN_KERNELS:
        raise ValueError(f"unknown kernel {name!r}; hf_efficient's kernels are {', '.join(OWN_KERNELS)}")
    return SOURCES / name


def _read_build_toml(source: Path) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # `kernels` depends on `tomli` below Python 3.11
        import tomli as tomllib
    return tomllib.loads((source / "build.toml").read_text())


def _source_files(source: Path) -> list[Path]:
    """`build.toml` and the Python files of `torch-ext/`, in a stable order (bytecode caches excluded)."""
    files = [source / "build.toml", *sorted((source / "torch-ext").rglob("*.py"))]
    return [f for f in files if "__pycache__" not in f.parts]


def source_digest(name: str) -> str:
    """SHA-256 over the paths and contents of kernel `name`'s sources: the cache key of its build."""
    source = kernel_source(name)
    digest = hashlib.sha256()
    for file in _source_files(source):
        digest.update(file.relative_to(source).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def build_kernel(name: str, out_dir: str | os.PathLike) -> Path:
    """Write own kernel `name` as a Hub kernel repository into `out_dir`: its sources plus one
    `build/torch-<backend>/` variant (the Python package and `metadata.json`) per backend of its `build.toml`.

    Args:
        name (`str`): one of `OWN_KERNELS`.
        out_dir (`str | os.PathLike`): an empty or missing folder.

    Returns:
        `Path`: `out_dir`, loadable with `kernels.LocalLayerRepository(out_dir, layer_name=...)`.
    """
    source, out = kernel_source(name), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out_dir={str(out)!r} is not empty; pass a new folder")
    general = _read_build_toml(source)["general"]
    package = general["name"].replace("-", "_")
    digest = source_digest(name)
    for file in _source_files(source):
        target = out / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
    for backend in general["backends"]:
        variant = out / "build" / f"torch-{backend}"
        shutil.copytree(source / "torch-ext" / package, variant, ignore=shutil.ignore_patterns("__pycache__"))
        metadata = {
            "name": general["name"],
            # the import name of the loaded module: unique per backend and source version
            "id": f"_{package}_{backend}_{digest[:7]}",
            "version": general["version"],
            "python-depends": general.get("python-depends", []),
            "backend": {"type": backend},
        }
        if "license" in general:
            metadata["license"] = general["license"]
        (variant / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return out


def kernels_cache_dir() -> Path:
    """Where `local_kernel` keeps built kernels: `$XDG_CACHE_HOME/hf_efficient/kernels`, else
    `~/.cache/hf_efficient/kernels`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hf_efficient" / "kernels"


def local_kernel(name: str) -> Path:
    """Built repository of own kernel `name`, built on first use into `kernels_cache_dir()` (keyed by a hash of its
    sources, so an edited kernel gets a new build) and reused afterwards.

    Example:

    ```python
    from kernels import LocalLayerRepository

    repo = LocalLayerRepository(hf_efficient.kernels.local_kernel("ema-scan"), layer_name="EMAScan")
    ```
    """
    final = kernels_cache_dir() / f"{name}-{source_digest(name)[:12]}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build_kernel(name, work / "repo")
        try:
            os.replace(work / "repo", final)
        except OSError:  # another process finished the same build first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
