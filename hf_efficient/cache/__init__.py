"""Compressed KV caches: `Cache` subclasses passed to `generate(cache=...)` (`past_key_values=` before 5.24).

Quantised (whole history, real packed storage): `GEARCache`, `KIVICache`. Eviction (a scored subset per KV
head, through the `"hfe_kv"` attention registered on import): `StreamingCache`, `HeavyHitterCache`,
`SnapKVCache`. Every cache reports its true footprint with `.nbytes()`.

```python
>>> from hf_efficient.cache import GEARCache
>>> cache = GEARCache(config=model.config, bits=4, rank=4)
>>> model.generate(**inputs, cache=cache, max_new_tokens=32)
>>> cache.nbytes()
```
"""

from .base import CompressedKVCache
from .gear import GEARCache
from .heavy_hitter import HeavyHitterCache
from .kivi import KIVICache
from .scoring import ATTENTION_NAME
from .snapkv import SnapKVCache
from .streaming import StreamingCache

__all__ = [
    "ATTENTION_NAME",
    "CompressedKVCache",
    "GEARCache",
    "HeavyHitterCache",
    "KIVICache",
    "SnapKVCache",
    "StreamingCache",
]
