"""Speculative drafters for `model.generate(custom_generate=...)`, all verified by one lossless engine.

```python
from hf_efficient.speculative import DraftModel, HybridRecycling, TokenRecycling

out = model.generate(**inputs, custom_generate=TokenRecycling(), max_new_tokens=64)
out = model.generate(**inputs, custom_generate=HybridRecycling(), max_new_tokens=64)  # + retrieval from the context
out = model.generate(**inputs, custom_generate=DraftModel(drafter), max_new_tokens=64, do_sample=True)
```

Strategies keep what they learn across calls and save it like Hub models: `save_pretrained`, `push_to_hub`,
`SpeculativeDecoder.from_pretrained` (the class the folder names); `hf_efficient.hub.export_custom_generate` writes a
self-contained `custom_generate/` folder that runs without `hf_efficient`.
"""

from .acceptance_head import AcceptanceHead
from .cost_model import ForwardCostModel
from .draft_model import DraftModel
from .engine import DecodingState, SpeculativeDecoder, SpeculativeStats
from .hybrid_recycling import HybridRecycling
from .layer_drafter import drafter_from_target
from .suffix_index import SuffixIndex
from .token_recycling import TokenRecycling
from .tree import DraftTree
from .vocab_trim import load_drafter, token_counts, trim_drafter_vocab

__all__ = [
    "AcceptanceHead",
    "DecodingState",
    "DraftModel",
    "DraftTree",
    "ForwardCostModel",
    "HybridRecycling",
    "SpeculativeDecoder",
    "SpeculativeStats",
    "SuffixIndex",
    "TokenRecycling",
    "drafter_from_target",
    "load_drafter",
    "token_counts",
    "trim_drafter_vocab",
]
