"""Group dequantize: the reconstruction step of the group-wise quantized KV caches (GEAR, KIVI), bit-for-bit equal to
`hf_efficient.cache.quantization.QuantizedTensor.dequantize`.

Codes of `bits` bits are packed `8 // bits` per byte; each group of `group_size` consecutive elements along the
grouped axis has one step (`scale`) and one `minimum`, and an element is `code * scale + minimum`, rounded to the
cache dtype. The reference unpacks with shifts and masks broadcast over a trailing axis of 2 or 4 bytes, which
PyTorch's CPU loops vectorise poorly, then converts and computes out of place. This kernel writes each code slot
straight into one float buffer and applies the affine map in place, with the same two roundings (product, then
sum) as the reference, so its results are identical. A pure PyTorch (noarch) kernel.

```python
from kernels import get_local_kernel

dequantize = get_local_kernel(path).dequantize
x = dequantize(packed, scale, minimum, shape, bits, dim, dtype)  # the tensor `quantize` was given
```
"""

from __future__ import annotations

from . import layers
from .dequantize import dequantize

__all__ = ["dequantize", "layers"]
