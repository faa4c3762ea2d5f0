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

__all__ = ["model_card_template", "render_model_card"]

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
