"""Prefill efficiency: prepacking prompts of mixed lengths into one padding-free forward.

```python
>>> from hf_efficient.prefill import prepacked_generate
>>> outputs = prepacked_generate(model, prompts, tokenizer, max_new_tokens=32)
```
"""

from .prepacking import first_fit_decreasing, pack_prompts, prepacked_generate, prepacked_prefill

__all__ = ["first_fit_decreasing", "pack_prompts", "prepacked_generate", "prepacked_prefill"]
