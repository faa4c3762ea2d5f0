"""Speculative drafters for `model.generate(custom_generate=...)`, all verified by one lossless engine.

```python
from hf_efficient.speculative import DraftModel, TokenRecycling

out = model.generate(**inputs, custom_generate=TokenRecycling(), max_new_tokens=64)
out = model.generate(**inputs, custom_generate=DraftModel(drafter), max_new_tokens=64, do_sample=True)
```
"""

from .acceptance_head import AcceptanceHead
from .draft_model import DraftModel
from .engine import DecodingState, SpeculativeDecoder, SpeculativeStats
from .token_recycling import TokenRecycling
from .tree import DraftTree
from .vocab_trim import load_drafter, token_counts, trim_drafter_vocab

__all__ = [
    "AcceptanceHead",
    "DecodingState",
    "DraftModel",
    "DraftTree",
    "SpeculativeDecoder",
    "SpeculativeStats",
    "TokenRecycling",
    "load_drafter",
    "token_counts",
    "trim_drafter_vocab",
]
