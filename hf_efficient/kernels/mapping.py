"""Which kernel replaces which of our layers, per device type and mode.

Our layers are marked with `@use_kernel_forward_from_hub(NAME)` (the RMSNorms and SiLUs of the H-Net and HAT stacks,
H-Net's EMA scan, `GroupDequantize`). `KERNEL_MAPPING` maps each `NAME` to a kernel per device type (`"cpu"`,
`"cuda"`, `"rocm"`, ...) and per `kernels.Mode`:

- `HubKernel`: a layer of a `kernels-community` repository, pinned to one commit (never a moving branch or
  `version`), so a kernelized model runs the code that was reviewed here;
- `OwnKernel`: one of hf_efficient's own kernels (`hf_efficient/kernels/sources/<kernel>`, the Hub kernel layout),
  loaded from a local build through `kernels.LocalLayerRepository`.

A device type without an entry keeps the PyTorch forward (CPU for RMSNorm and SiLU: the pinned Hub repositories
are GPU kernels).
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any

__all__ = ["KERNEL_MAPPING", "HubKernel", "OwnKernel", "kernel_mapping"]


@dataclass(frozen=True)
class HubKernel:
    """A layer of a Hub kernel repository at one commit.

    Args:
        repo_id (`str`): the kernel repository, e.g. `"kernels-community/activation"`.
        layer_name (`str`): the class in the kernel's `layers` module.
        revision (`str`): the full 40-hex commit the layer is pinned to.
    """

    repo_id: str
    layer_name: str
    revision: str


@dataclass(frozen=True)
class OwnKernel:
    """A layer of one of hf_efficient's own kernels, built locally (see `hf_efficient.kernels.local_kernel`).

    Args:
        kernel (`str`): the kernel's name, a folder of `hf_efficient/kernels/sources`, e.g. `"ema-scan"`.
        layer_name (`str`): the class in the kernel's `layers` module.
    """

    kernel: str
    layer_name: str


# Liger's Triton RMSNorm (CUDA and ROCm builds, forward and backward), the layer transformers maps its RMSNorms to.
LIGER_RMSNORM = HubKernel(
    "kernels-community/liger-kernels", "LigerRMSNorm", revision="979ee9bbdc58b455063903e91602ac58ad66b047"
)
# vLLM's activation kernels (compiled CUDA builds per torch release; inference only, torch.compile-safe).
ACTIVATION_SILU = HubKernel(
    "kernels-community/activation", "Silu", revision="098599e666138ec83693b85b8a93a1bf65fa7c32"
)
EMA_SCAN = OwnKernel("ema-scan", "EMAScan")
GROUP_DEQUANTIZE = OwnKernel("group-dequantize", "GroupDequantize")

# layer name -> device type -> mode ("INFERENCE", "TRAINING", "INFERENCE|TORCH_COMPILE", ...) -> kernel
KERNEL_MAPPING: dict[str, dict[str, dict[str, HubKernel | OwnKernel]]] = {
    "RMSNorm": {
        "cuda": {"TRAINING": LIGER_RMSNORM, "INFERENCE": LIGER_RMSNORM},
        "rocm": {"TRAINING": LIGER_RMSNORM, "INFERENCE": LIGER_RMSNORM},
    },
    "SiLU": {"cuda": {"INFERENCE|TORCH_COMPILE": ACTIVATION_SILU}},
    "EMAScan": {
        "cpu": {"TRAINING": EMA_SCAN, "INFERENCE": EMA_SCAN},
        "cuda": {"TRAINING": EMA_SCAN, "INFERENCE": EMA_SCAN},
    },
    "GroupDequantize": {"cpu": {"INFERENCE": GROUP_DEQUANTIZE}, "cuda": {"INFERENCE": GROUP_DEQUANTIZE}},
}


def parse_mode(spec: str) -> Any:
    """`"INFERENCE|TORCH_COMPILE"` -> `kernels.Mode.INFERENCE | kernels.Mode.TORCH_COMPILE` (case-insensitive)."""
    from kernels import Mode

    names = [name.strip().upper() for name in spec.split("|")]
    unknown = [name for name in names if name not in Mode.__members__]
    if unknown:
        raise ValueError(
            f"unknown kernels.Mode {unknown} in {spec!r}; use INFERENCE or TRAINING, optionally |TORCH_COMPILE"
        )
    return functools.reduce(operator.or_, (Mode[name] for name in names))


def repository(kernel: HubKernel | OwnKernel) -> Any:
    """The `kernels` repository object of `kernel`: a pinned `LayerRepository` or a `LocalLayerRepository` of the
    local build (built on first use)."""
    from kernels import LayerRepository, LocalLayerRepository

    if isinstance(kernel, HubKernel):
        return LayerRepository(kernel.repo_id, layer_name=kernel.layer_name, revision=kernel.revision)
    from .local import local_kernel

    return LocalLayerRepository(local_kernel(kernel.kernel), layer_name=kernel.layer_name)


def kernel_mapping(device: str | None = None) -> dict[str, dict[str, dict[Any, Any]]]:
    """`KERNEL_MAPPING` as a `kernels` mapping, for `kernels.use_kernel_mapping` / `register_kernel_mapping`.

    Args:
        device (`str`, *optional*): keep only this device type (`"cpu"`, `"cuda"`, ...); all device types if `None`.
            Our own kernels are built locally the first time their device type is requested.

    Returns:
        `dict`: `{layer name: {device type: {kernels.Mode: repository}}}`.

    Example:

    ```python
    from kernels import Mode, kernelize, use_kernel_mapping

    with use_kernel_mapping(hf_efficient.kernels.kernel_mapping("cuda")):
        kernelize(model, mode=Mode.INFERENCE, device="cuda")  # what `hf_efficient.kernelize` does, minus fallback
    ```
    """
    mapping: dict[str, dict[str, dict[Any, Any]]] = {}
    for layer, devices in KERNEL_MAPPING.items():
        for device_type, modes in devices.items():
            if device is None or device_type == device:
                entry = {parse_mode(mode): repository(kernel) for mode, kernel in modes.items()}
                mapping.setdefault(layer, {})[device_type] = entry
    return mapping
