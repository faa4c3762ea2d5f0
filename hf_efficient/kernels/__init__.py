"""Hub kernels for hf_efficient's layers, with the pure-PyTorch forward as the fallback.

Our layers that have kernel counterparts are marked with `kernels.use_kernel_forward_from_hub(NAME)`: the RMSNorms
and SiLUs of the H-Net and HAT stacks, H-Net's EMA scan (de-chunking smoother and recurrent blocks), and
`GroupDequantize` (the quantized caches' reconstruction). `KERNEL_MAPPING` maps each name to a `kernels-community`
layer pinned to a commit, or to one of our own kernels (`sources/`, in the Hub kernel layout, built locally), per
device type and mode. `kernelize` applies it through `kernels.kernelize`; a layer whose kernel cannot be loaded
(offline, no build for this torch or device, `kernels` not installed) keeps its PyTorch forward, with one warning.

transformers 5.2x turns its own kernels integration on only for `kernels>=0.18.2`; this module uses the `kernels`
package directly, so it works with the `kernels` releases transformers ignores.

```python
import hf_efficient as hfe

model = hfe.kernelize(model, mode="inference", device="cpu")
```
"""

from __future__ import annotations

import importlib
from typing import Any

from .kernelize import kernel_status, kernelize
from .local import OWN_KERNELS, build_kernel, kernel_source, kernels_cache_dir, local_kernel
from .mapping import KERNEL_MAPPING, HubKernel, OwnKernel, kernel_mapping

__all__ = [
    "KERNEL_MAPPING",
    "OWN_KERNELS",
    "GroupDequantize",
    "HubKernel",
    "OwnKernel",
    "build_kernel",
    "kernel_mapping",
    "kernel_source",
    "kernel_status",
    "kernelize",
    "kernels_cache_dir",
    "local_kernel",
]


def __getattr__(name: str) -> Any:
    if name == "GroupDequantize":  # imports the cache family; only when asked for
        return importlib.import_module(".layers", __name__).GroupDequantize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
