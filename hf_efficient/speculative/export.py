"""What goes into a self-contained Hub `custom_generate/` folder, besides the strategy's state.

transformers loads `custom_generate/generate.py` as remote code: a flat set of sibling files joined by
`from .module import Name`, with no access to an installed `hf_efficient`. `copy_strategy_code` therefore copies
the modules the strategy needs (its class module and, transitively, every module it imports relatively, e.g.
`engine.py`, `tree.py`, `compat.py`) flat into the folder and rewrites their relative imports to siblings.
`entry_point_source` is the `generate.py` that loads the strategy once per process, and `pinned_requirements` the
`requirements.txt`: every third-party package the copied code imports (torch, transformers, huggingface_hub,
safetensors), from the version exported with up to the next major release. `hf_efficient.hub.export_custom_generate`
assembles the folder.

`save_strategy` / `load_strategy` are the strategies' `save_pretrained` / `SpeculativeDecoder.from_pretrained`.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
from importlib.metadata import packages_distributions, version
from pathlib import Path

from packaging.version import Version

from .. import __version__
from .engine import SpeculativeDecoder

__all__ = ["copy_strategy_code", "entry_point_source", "load_strategy", "pinned_requirements", "save_strategy"]

_PACKAGE = __name__.split(".")[0]  # "hf_efficient": no copied file may import it
_RELATIVE_IMPORT = re.compile(r"from\s+\.+[\w.]*\s+import")

_ENTRY_POINT = '''"""Entry point of `model.generate(custom_generate=REPO_OR_FOLDER, trust_remote_code=True)`,
written by hf_efficient {version}. Self-contained: the `{cls}` strategy's code, settings and learned state are in
this folder.

The strategy is loaded once per process and folder, and kept: it goes on learning across calls (Token Recycling's
successor matrix, a drafter's confidence calibration), and `tree="auto"` timings are measured at most once.
"""

import os
import sys

from .{module} import {cls}

_STRATEGIES = {{}}  # realpath of a custom_generate/ folder -> (its config.json's mtime, its strategy)


def _requested_repo(model):
    """The `custom_generate=` string of the `generate` call running this function (transformers does not pass it
    on); `None` when `generate` was replaced by this function (`from_pretrained(..., trust_remote_code=True)`)."""
    frame = sys._getframe(1)
    while frame is not None:
        repo = frame.f_locals.get("custom_generate")
        if frame.f_code.co_name == "generate" and frame.f_locals.get("self") is model and isinstance(repo, str):
            return repo
        frame = frame.f_back
    return None


def _strategy_folder(repo):
    """The local `custom_generate/` folder of a model folder or Hub repository `repo`."""
    local = os.path.join(repo, "custom_generate")
    if os.path.isdir(local):
        return os.path.realpath(local)
    from huggingface_hub import snapshot_download

    return os.path.join(snapshot_download(repo, allow_patterns=["custom_generate/*"]), "custom_generate")


def generate(model, *args, **kwargs):
    """`model.generate(*args, **kwargs)` decoded by this folder's `{cls}` (greedy output equals plain greedy)."""
    folder = _strategy_folder(_requested_repo(model) or str(model.name_or_path))
    stamp = os.stat(os.path.join(folder, "config.json")).st_mtime_ns  # a folder exported anew is read anew
    if _STRATEGIES.get(folder, (None,))[0] != stamp:
        _STRATEGIES[folder] = (stamp, {cls}.from_pretrained(folder, device=model.device))
    strategy = _STRATEGIES[folder][1]
    # the class's own `generate`: loading with trust_remote_code=True replaces the instance's with this function
    return type(model).generate(model, *args, custom_generate=strategy, **kwargs)
'''


def save_strategy(strategy: SpeculativeDecoder, folder: str | os.PathLike) -> Path:
    """`strategy.save_pretrained(folder)`; returns the folder."""
    strategy.save_pretrained(folder)
    return Path(folder)


def load_strategy(folder: str | os.PathLike, device=None) -> SpeculativeDecoder:
    """`SpeculativeDecoder.from_pretrained(folder, device=device)`: the strategy class its `config.json` names."""
    return SpeculativeDecoder.from_pretrained(folder, device=device)


def copy_strategy_code(strategy: SpeculativeDecoder, folder: str | os.PathLike) -> list[Path]:
    """Copy the modules `type(strategy)` needs into `folder` as flat siblings with rewritten relative imports.

    Starting from the strategy's class module, every `from .x import` / `from ..x import` is followed (to any depth),
    its target copied as `folder/x.py`, and the statement rewritten to `from .x import`.

    Raises:
        `ValueError`: when a needed module imports `hf_efficient` absolutely (it could not run without it), uses
            `from . import x`, or two needed modules share a file name.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pending, copied = [type(strategy).__module__], {}  # flat name -> module name
    written = []
    while pending:
        name = pending.pop()
        flat = name.rpartition(".")[2]
        if copied.get(flat) == name:
            continue
        if flat in copied:
            raise ValueError(f"{name} and {copied[flat]} would both be copied as {flat}.py; rename one of them")
        copied[flat] = name
        source, imported = _flattened_source(name)
        pending.extend(imported)
        (folder / f"{flat}.py").write_text(source)
        written.append(folder / f"{flat}.py")
    return written


def entry_point_source(strategy: SpeculativeDecoder) -> str:
    """The `generate.py` of a `custom_generate/` folder holding `strategy` (see `copy_strategy_code`)."""
    cls = type(strategy)
    return _ENTRY_POINT.format(version=__version__, cls=cls.__name__, module=cls.__module__.rpartition(".")[2])


def pinned_requirements(folder: str | os.PathLike) -> list[str]:
    """`requirements.txt` lines for the code in `folder`: each third-party distribution its files import, from the
    installed version (local build tag dropped) up to the next major release, e.g. `transformers>=5.24.0,<6`.

    transformers checks the first bound of each line before running the folder; pip honours both.
    """
    modules = set()
    for file in Path(folder).glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    distributions = packages_distributions()
    names = sorted({distributions[m][0] for m in modules - set(sys.stdlib_module_names) if m in distributions})
    lines = []
    for name in names:
        installed = Version(version(name))
        lines.append(f"{name}>={installed.base_version},<{installed.major + 1}")
    return lines


def _flattened_source(name: str) -> tuple[str, list[str]]:
    """Source of module `name` with relative imports pointing at flat siblings, and the modules they name."""
    spec = importlib.util.find_spec(name)
    path = Path(spec.origin)
    source = path.read_text()
    package = name if spec.submodule_search_locations else name.rpartition(".")[0]
    lines, imported = source.splitlines(keepends=True), []
    for node in ast.walk(ast.parse(source)):
        where = f"{path}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            if node.module is None:
                raise ValueError(f"{where}: `from . import x` cannot be flattened; write `from .x import Name`")
            target = importlib.util.resolve_name("." * node.level + node.module, package)
            line = lines[node.lineno - 1]
            lines[node.lineno - 1] = _RELATIVE_IMPORT.sub(f"from .{target.rpartition('.')[2]} import", line, count=1)
            imported.append(target)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
            if any(module.split(".")[0] == _PACKAGE for module in modules):
                raise ValueError(f"{where} imports {_PACKAGE}: a custom_generate folder must run without it")
    return "".join(lines), imported
