"""Hub-facing helpers: model cards rendered from the packaged templates, and self-contained `custom_generate`
folders for speculative strategies.

```python
from hf_efficient.hub import export_custom_generate, render_model_card

card = render_model_card("hnet", model_id="me/hnet-small", parameters="6.2M", bits_per_byte="1.62")
card.save("out/README.md")

model.save_pretrained("out")
export_custom_generate(TokenRecycling(), "out")  # out/custom_generate/: code, state, requirements, README
model.generate(**inputs, custom_generate="out", trust_remote_code=True)  # or the Hub repo once pushed
```

Models and strategies push with their own `push_to_hub` (transformers' `PushToHubMixin`, huggingface_hub's
`ModelHubMixin`); a folder written here is pushed with `huggingface_hub.upload_folder`.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from . import __version__

__all__ = ["MODEL_CARDS_DIR", "export_custom_generate", "model_card_template", "render_model_card"]

MODEL_CARDS_DIR = Path(__file__).resolve().parent / "model_cards"  # package data: the wheel carries it

_CUSTOM_GENERATE = "custom_generate"
_CUSTOM_GENERATE_TAGS = ["custom_generate", "hf_efficient", "speculative-decoding"]
# what each strategy's state files hold, for the README's table (files absent from the folder are left out)
_STATE_FILES = {
    "config.json": "the strategy class and its settings"
    + ' (and, for `tree="auto"`, the measured verification cost per tree size and the device they were timed on)',
    "recycling.safetensors": "Token Recycling's successor matrix, token-pair table and per-rank acceptance counts",
    "drafter": "the drafter model (`save_pretrained` folder; a trimmed LM head lists its `draft_vocab_ids`)",
    "calibration.safetensors": "the drafter's online confidence-to-acceptance calibration",
    "acceptance_head": "the SpecDec++ acceptance-prediction head (`PyTorchModelHubMixin` folder)",
}
_LEARNING = {
    "TokenRecycling": " (the successor matrix grows with every verified token)",
    "DraftModel": " (the drafter's confidence calibration is refined by every verification)",
}


def model_card_template(family: str) -> Path:
    """Path of the packaged template `model_cards/{family}.md`; `ValueError` naming the available ones if absent."""
    path = MODEL_CARDS_DIR / f"{family}.md"
    if not path.is_file():
        available = sorted(p.stem for p in MODEL_CARDS_DIR.glob("*.md"))
        raise ValueError(f"no model-card template for family={family!r}; available: {available}")
    return path


def render_model_card(
    family: str,
    *,
    license: str = "apache-2.0",
    tags: list[str] | None = None,
    **fields: str,
) -> ModelCard:
    """Render `model_cards/{family}.md` (a Jinja template) into a `huggingface_hub.ModelCard`.

    Args:
        family (`str`): template name, e.g. `"hnet"`, `"hat"`, `"chunkllm"`, `"hypernet"`, `"custom_generate"`.
        license (`str`, *optional*, defaults to `"apache-2.0"`): card metadata license.
        tags (`list[str]`, *optional*): extra metadata tags; `"hf_efficient"` and the family are always added.
        **fields: values for the template's `{{ placeholders }}`.
    """
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=list(dict.fromkeys(["hf_efficient", family, *(tags or [])])),
    )
    return ModelCard.from_template(card_data, template_path=str(model_card_template(family)), **fields)


def export_custom_generate(strategy, path: str | Path, *, repo_id: str | None = None) -> Path:
    """Write a self-contained Hub `custom_generate/` folder for `strategy` into the model repository folder `path`.

    The folder holds the strategy's own code (its modules copied flat, relative imports only: it runs where
    `hf_efficient` is not installed), `generate.py` (loads the strategy once per process and keeps it learning),
    the strategy's `save_pretrained` files (settings, learned state, drafter), a `requirements.txt` pinned to the
    versions exported with, and a `README.md` with the Hub's `custom_generate` front matter. The repository's own
    `README.md` gets the `custom_generate` tag (a new card when there is none), so the Hub lists the method.

    Save the target model into the same folder (`model.save_pretrained(path)`) for a model-plus-method repository,
    then run `model.generate(**inputs, custom_generate=path, trust_remote_code=True)`, or push `path` with
    `huggingface_hub.upload_folder` and pass the repository id instead.

    Args:
        strategy (`SpeculativeDecoder`): e.g. a `TokenRecycling` or `DraftModel`, with its learned state. Run one
            `generate` call first to ship a warm state (and, for `tree="auto"`, this device's timings).
        path (`str` or `Path`): the model repository folder; `path/custom_generate` is replaced.
        repo_id (`str`, *optional*): the Hub repository the folder is meant for, used in the README's example.

    Returns:
        `Path`: the `custom_generate/` folder.
    """
    from .speculative.export import copy_strategy_code, entry_point_source, pinned_requirements

    path = Path(path)
    folder = path / _CUSTOM_GENERATE
    if folder.exists():
        shutil.rmtree(folder)  # a stale module from an earlier export would be imported too
    strategy.save_pretrained(folder)
    copy_strategy_code(strategy, folder)
    (folder / "generate.py").write_text(entry_point_source(strategy))
    requirements = pinned_requirements(folder)
    (folder / "requirements.txt").write_text("\n".join(requirements) + "\n")
    card = _custom_generate_card(strategy, folder, requirements, repo_id or str(path))
    card.save(folder / "README.md")
    _tag_repository_card(path / "README.md", card)
    return folder


def _custom_generate_card(strategy, folder: Path, requirements: list[str], repo_id: str) -> ModelCard:
    """The `custom_generate` README of an exported `folder`."""
    cls = type(strategy)
    config = json.loads((folder / "config.json").read_text())
    settings = [(name, _setting(name, value)) for name, value in sorted(config.items()) if name != "strategy"]
    doc = inspect.getdoc(cls) or ""
    paper = next((p for p in doc.split("\n\n") if p.startswith("Paper:")), "")
    drafter = getattr(strategy, "drafter", None)
    base_model = getattr(getattr(drafter, "config", None), "_name_or_path", None)
    return render_model_card(
        "custom_generate",
        tags=_CUSTOM_GENERATE_TAGS,
        strategy=cls.__name__,
        summary=doc.split("\n\n")[0],
        version=__version__,
        paper=" ".join(paper.split()),
        base_model_text=(
            "Any decoder-only model whose tokenizer the strategy was built for: the model saved beside this folder"
            " (the repository's `config.json` and weights), or another one passed the same `custom_generate=`."
            + (f" The drafter in `custom_generate/drafter` was saved from `{base_model}`." if base_model else "")
        ),
        compatibility=(
            "- The same tokenizer (vocabulary) as the one the state was learned with."
            if cls.__name__ == "TokenRecycling"
            else "- A target with the drafter's tokenizer (the same input vocabulary)."
        ),
        settings=settings,
        learning=_LEARNING.get(cls.__name__, ""),
        state_files=[(name, text) for name, text in _STATE_FILES.items() if (folder / name).exists()],
        requirements=requirements,
        repo_id=repo_id,
    )


def _setting(name: str, value) -> str:
    """A `config.json` value as the README shows it (timings in milliseconds per tree size)."""
    if name == "forward_costs" and value:
        return ", ".join(f"{size}: {seconds * 1e3:.2f} ms" for size, seconds in sorted(value.items(), key=_size))
    return json.dumps(value)


def _size(item: tuple[str, float]) -> int:
    return int(item[0])


def _tag_repository_card(readme: Path, card: ModelCard) -> None:
    """Give the repository's `README.md` the `custom_generate` tag (the Hub lists methods by it), or write `card`."""
    if not readme.is_file():
        card.save(readme)
        return
    existing = ModelCard.load(readme)
    tags = list(existing.data.tags or [])
    if "custom_generate" not in tags:
        existing.data.tags = [*tags, "custom_generate"]
        existing.save(readme)
