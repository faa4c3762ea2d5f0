"""`save_pretrained` / `from_pretrained` / `push_to_hub` for speculative strategies, on huggingface_hub's
`ModelHubMixin`.

A saved strategy is a folder (or a Hub repository): `config.json` names the strategy class and holds its settings
and learned scalars; the strategy writes its tensors (recycling matrix, drafter, calibration) beside it.

```python
from hf_efficient.speculative import SpeculativeDecoder, TokenRecycling

TokenRecycling().save_pretrained("recycling")          # or .push_to_hub("me/recycling")
strategy = SpeculativeDecoder.from_pretrained("recycling")  # the class named in config.json
```

This module imports nothing of `hf_efficient`: it is copied into exported `custom_generate/` folders.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelHubMixin, snapshot_download

__all__ = ["StrategyHubMixin"]

CONFIG_NAME = "config.json"  # the name `ModelHubMixin.from_pretrained` reads

_STRATEGY_CARD = """---
{{ card_data }}
---

# {{ strategy }} speculative-decoding strategy

A lossless speculative-decoding strategy saved by `hf_efficient`: `config.json` holds its class and settings, the
other files its learned state. Greedy output equals plain greedy `generate`; sampling keeps the target distribution.

```python
from hf_efficient.speculative import {{ strategy }}

strategy = {{ strategy }}.from_pretrained("{{ repo_id | default("REPO_OR_FOLDER", true) }}")
out = model.generate(**inputs, custom_generate=strategy, max_new_tokens=64)
```
"""


class StrategyHubMixin(
    ModelHubMixin,
    library_name="hf_efficient",
    tags=["speculative-decoding"],
    model_card_template=_STRATEGY_CARD,
):
    """Hub persistence of a strategy: subclasses implement `_save_state` and `_load_state`.

    `save_pretrained(folder)` writes `config.json` (`{"strategy": class name, **settings}`) and the state files;
    `push_to_hub(repo_id)` uploads the same folder; `from_pretrained(folder_or_repo, device=...)` rebuilds the
    strategy, and called on the base class (`SpeculativeDecoder.from_pretrained`) it returns the class that
    `config.json` names.
    """

    def _save_state(self, folder: Path) -> dict[str, Any]:
        """Write the state files into `folder`; return the JSON-serialisable settings for `config.json`."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define `_save_state(folder)`, so it cannot be saved or pushed; "
            "implement it (and `_load_state`) to write its settings and learned state."
        )

    @classmethod
    def _load_state(cls, folder: Path, config: dict[str, Any], device=None, **init_kwargs) -> StrategyHubMixin:
        """Rebuild the strategy from `folder`; `init_kwargs` are the `__init__` arguments found in `config`."""
        raise NotImplementedError(
            f"{cls.__name__} does not define `_load_state(folder, config)`, so it cannot be loaded; implement it "
            "next to `_save_state`."
        )

    def _save_pretrained(self, save_directory: Path) -> None:
        settings = self._save_state(Path(save_directory))
        config = {"strategy": type(self).__name__, **settings}
        (Path(save_directory) / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict[str, Any] | None = None,
        device=None,
        **init_kwargs,
    ) -> StrategyHubMixin:
        hub = dict(revision=revision, cache_dir=cache_dir, force_download=force_download, token=token)
        name = (config or {}).get("strategy")
        if name is None:
            raise ValueError(f"{model_id} has no {CONFIG_NAME} naming a strategy; save one with `save_pretrained`")
        if inspect.isabstract(cls):  # `SpeculativeDecoder.from_pretrained`: dispatch to the class the folder names
            subclass = _subclass_named(cls, name)
            return subclass.from_pretrained(model_id, local_files_only=local_files_only, device=device, **hub)
        if name != cls.__name__:
            raise ValueError(
                f"{model_id} holds a {name} strategy, not a {cls.__name__}; load it with {name}.from_pretrained "
                "(or SpeculativeDecoder.from_pretrained, which picks the class)."
            )
        if os.path.isdir(model_id):
            folder = Path(model_id)
        else:
            folder = Path(snapshot_download(repo_id=model_id, local_files_only=local_files_only, **hub))
        return cls._load_state(folder, config, device=device, **init_kwargs)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        return super().generate_model_card(*args, strategy=type(self).__name__, **kwargs)


def _subclass_named(base: type, name: str) -> type:
    """The concrete subclass of `base` called `name` (among the imported ones)."""
    pending, found = list(base.__subclasses__()), {}
    while pending:
        subclass = pending.pop()
        found[subclass.__name__] = subclass
        pending.extend(subclass.__subclasses__())
    if name not in found or inspect.isabstract(found[name]):
        known = sorted(n for n, c in found.items() if not inspect.isabstract(c))
        raise ValueError(f"config.json names an unknown strategy class {name!r}; known: {known}")
    return found[name]
