"""EMA scan: the inclusive linear recurrence `h_t = a_t * h_{t-1} + b_t` of H-Net's de-chunking smoother and
gated recurrent blocks, bit-for-bit equal to the reference Hillis-Steele scan (`linear_scan` in H-Net's
`layers_hnet.py`).

The reference composes element `t` with element `t - s` for `s = 1, 2, 4, ...` and concatenates fresh tensors at
every step. This kernel performs the same floating-point operations in the same order, so its results are
identical, but writes them into two ping-pong buffers instead of allocating two concatenations per step, and skips
the decay composition of the last step (nothing reads it). A pure PyTorch (noarch) kernel: it runs wherever
PyTorch does; under autograd it takes the reference path, whose steps record a graph.

```python
from kernels import get_local_kernel

ema_scan = get_local_kernel(path).ema_scan
h = ema_scan(a, b, h0)  # a (B, L, C) or (B, L, 1), b (B, L, C), h0 (B, C) -> h (B, L, C)
```
"""

from __future__ import annotations

from . import layers
from .scan import ema_scan

__all__ = ["ema_scan", "layers"]
