"""Dynamic tokenization: batch merges with an embedding hypernetwork, transplant, exact byte-level probabilities.

```python
from hf_efficient.tokenization import ByteLevelSampler, DynamicBPE, RetrofittedModel, transplant_tokenizer
```

Submodules load on first use, so importing this package does not import torch models or tokenizers.
"""

import importlib
from typing import Any

_EXPORTS = {
    "DynamicBPE": ".dynamic_bpe",
    "DynamicBatch": ".dynamic_bpe",
    "RetrofittedModel": ".retrofit",
    "transplant_tokenizer": ".transplant",
    "ByteLevelSampler": ".byte_probabilities",
    "ByteLevelEnsemble": ".byte_probabilities",
}

__all__ = [
    "ByteLevelEnsemble",
    "ByteLevelSampler",
    "DynamicBPE",
    "DynamicBatch",
    "RetrofittedModel",
    "transplant_tokenizer",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_efficient.tokenization' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
