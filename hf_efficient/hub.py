"""Hub-facing helpers: model cards rendered from `model_cards/` templates.

```python
from hf_efficient.hub import render_model_card

card = render_model_card("hnet", model_id="me/hnet-small", parameters="6.2M", bits_per_byte="1.62")
card.save("out/README.md")
```
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

__all__ = ["export_custom_generate", "model_card_template", "render_model_card"]

MODEL_CARDS_DIR = Path(__file__).resolve().parent / "model_cards"  # symlink to the repo's model_cards/


def model_card_template(family: str) -> Path:
    """Path of the template `model_cards/{family}.md`; `ValueError` naming the available families if absent."""
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
        family (`str`): template name, e.g. `"hnet"`, `"hat"`, `"chunkllm"`, `"hypernet"`.
        license (`str`, *optional*, defaults to `"apache-2.0"`): card metadata license.
        tags (`list[str]`, *optional*): extra metadata tags; `"hf_efficient"` and the family are always added.
        **fields: values for the template's `{{ placeholders }}`.
    """
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=["hf_efficient", family, *(tags or [])],
    )
    return ModelCard.from_template(card_data, template_path=str(model_card_template(family)), **fields)


_CUSTOM_GENERATE_PY = '''"""`generate(custom_generate=REPO, trust_remote_code=True)` entry point (by hf_efficient).

The strategy (settings, learned state, drafter) lives in this `custom_generate/` folder of the model repo.
"""

import os

from hf_efficient.speculative.export import load_strategy


def _strategy_folder(model):
    local = os.path.join(str(model.name_or_path), "custom_generate")
    if os.path.isdir(local):
        return local
    from huggingface_hub import snapshot_download

    return os.path.join(snapshot_download(model.name_or_path, allow_patterns=["custom_generate/*"]), "custom_generate")


def generate(model, **kwargs):
    strategy = load_strategy(_strategy_folder(model), device=model.device)
    return model.generate(custom_generate=strategy, **kwargs)
'''


def export_custom_generate(strategy, path: str | Path) -> Path:
    """Write a Hub `custom_generate/` folder (`generate.py`, `requirements.txt`, the strategy's state) into the
    model repository folder `path`, so `model.generate(custom_generate=path, trust_remote_code=True)` (or the Hub
    repo once pushed) runs `strategy`. Save the target model into the same folder (`save_pretrained(path)`):
    the entry point finds the strategy through `model.name_or_path`.

    Args:
        strategy (`TokenRecycling` or `DraftModel`): the strategy, with its learned state and drafter.
        path (`str` or `Path`): the model repository folder.
    """
    from hf_efficient.speculative.export import save_strategy

    folder = save_strategy(strategy, Path(path) / "custom_generate")
    (folder / "generate.py").write_text(_CUSTOM_GENERATE_PY)
    (folder / "requirements.txt").write_text("hf-efficient\n")
    return folder
