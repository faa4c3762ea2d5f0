"""hf_efficient: efficient-modelling research turned into Hugging Face components.

Importing the package only registers our model families with the ``Auto*`` classes; every other
submodule (``speculative``, ``cache``, ``tokenization``, ``prefill``, ``reference``, ``eval``, ``bench``,
``kernels``) is imported on first attribute access; ``hfe.kernelize`` is ``hfe.kernels.kernelize``.

Example:

```python
import hf_efficient as hfe

model, tokenizer = hfe.reference.reference_model("target")
```
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "bench",
    "cache",
    "cli",
    "eval",
    "hub",
    "kernels",
    "models",
    "prefill",
    "reference",
    "speculative",
    "tokenization",
)

__all__ = ["__version__", "kernelize", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    if name == "kernelize":  # hf_efficient.kernelize(model, mode=..., device=...): hub kernels, PyTorch fallback
        return importlib.import_module(".kernels", __name__).kernelize
    raise AttributeError(f"module 'hf_efficient' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


importlib.import_module(".models", __name__).register_auto_classes()
