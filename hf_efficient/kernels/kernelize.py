"""`kernelize(model)`: `kernels.kernelize` with our mapping, where a kernel that does not load leaves the layer on
its pure-PyTorch forward instead of failing.

`kernels.kernelize` falls back by itself when a mapping has no entry for a layer, device or mode, and (with
`KernelizeFallback.ALL`) when a kernel's files are missing; any other loading failure (no build variant for this
torch, a network error, an import error inside the kernel, a forward signature that does not match) raises, and a
raise half-way leaves the model half-kernelized. So every candidate repository is loaded first, per layer name; only
the ones that load go into the mapping handed to `kernels.kernelize`, and the layers left on PyTorch are named in one
warning.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .mapping import KERNEL_MAPPING, HubKernel, OwnKernel, parse_mode, repository

__all__ = ["kernel_status", "kernelize"]

logger = logging.getLogger(__name__)

_DEVICE_TYPES = ("cpu", "cuda", "mps", "neuron", "npu", "rocm", "tpu", "xpu")  # the device types `kernels` knows

# The mapping entries that serve a requested mode, best first: the order `kernels` selects in (`kernels.layer.repos`).
_MODE_PRIORITY = {
    "INFERENCE": ("INFERENCE", "INFERENCE|TORCH_COMPILE", "TRAINING", "TRAINING|TORCH_COMPILE", "FALLBACK"),
    "TRAINING": ("TRAINING", "TRAINING|TORCH_COMPILE", "FALLBACK"),
    "INFERENCE|TORCH_COMPILE": ("INFERENCE|TORCH_COMPILE", "TRAINING|TORCH_COMPILE", "FALLBACK"),
    "TRAINING|TORCH_COMPILE": ("TRAINING|TORCH_COMPILE", "FALLBACK"),
}


def kernelize(
    model: nn.Module,
    *,
    mode: Any = None,
    device: str | torch.device | None = None,
    mapping: dict[str, dict[Any, Any]] | None = None,
) -> nn.Module:
    """Replace the `forward` of the model's hub-kernel-marked layers with kernels, keeping PyTorch where none loads.

    Layers marked with `@use_kernel_forward_from_hub(NAME)` (H-Net's and HAT's RMSNorms and SiLUs, H-Net's EMA scan,
    `GroupDequantize`, and transformers' own marked layers when its kernels integration is active) get the kernel
    that `KERNEL_MAPPING` (plus `mapping`) names for the device type and mode. A layer whose kernel is not in the
    mapping, or does not load (offline and not cached, no build for this torch or CPU, `kernels` not installed),
    keeps its pure-PyTorch forward, so outputs stay exactly those of the un-kernelized model; one warning names
    these layers and why. Nothing raises for a kernel that cannot be used.

    Like `kernels.kernelize`, this swaps `forward` on the module instances in place and returns the same model;
    parameters, buffers and the config are untouched. Call it again (e.g. with another `mode`) to re-select.

    Args:
        model (`nn.Module`): any model; only its marked layers change.
        mode (`kernels.Mode` or `str`, *optional*): `Mode.INFERENCE` or `Mode.TRAINING`, optionally
            `| Mode.TORCH_COMPILE`, or the same as a string (`"inference"`, `"training|torch_compile"`). Defaults to
            `TRAINING` if `model.training` else `INFERENCE`.
        device (`str` or `torch.device`, *optional*): the device type to select kernels for (`"cpu"`, `"cuda"`,
            `"rocm"`, ...). Defaults to the device of the model's first parameter.
        mapping (`dict`, *optional*): extra entries in the `kernels` format (`{layer name: {device: repository or
            {Mode: repository}}}`), e.g. a `kernels.LocalLayerRepository` of your own build; they replace ours for
            the same layer and device. Mappings registered globally with `kernels.register_kernel_mapping` are not
            consulted: pass them here.

    Returns:
        `nn.Module`: `model` itself.

    Example:

    ```python
    import hf_efficient as hfe

    model = hfe.kernelize(model, mode="inference")  # on CPU: H-Net's EMA scan kernel; RMSNorm/SiLU stay PyTorch
    ```
    """
    marked = _marked_modules(model)
    if not marked:
        return model
    try:
        import kernels
    except ImportError:
        _notice(
            f"hf_efficient.kernelize: `kernels` is not installed (pip install 'hf-efficient[kernels]'); "
            f"{', '.join(sorted(marked))} keep the PyTorch forward"
        )
        return model
    mode_name = _mode_name(mode, model)
    device_type = _device_type(model, device)
    effective, reasons = _loadable(marked, _candidates(device_type, mapping, kernels), mode_name, device_type)
    try:
        with kernels.use_kernel_mapping(effective, inherit_mapping=False), _quiet_logger("kernels"):
            kernels.kernelize(
                model, mode=parse_mode(mode_name), device=device_type, use_fallback=kernels.KernelizeFallback.ALL
            )
    except Exception as error:  # a layer failed after loading: restore every layer
        for modules in marked.values():
            for module in modules:
                module.__dict__.pop("forward", None)
        _notice(
            f"hf_efficient.kernelize: kernels.kernelize failed ({_one_line(error)}); "
            f"{', '.join(sorted(marked))} keep the PyTorch forward"
        )
        return model

    kept: dict[str, list[str]] = {}  # reason -> layer names still on PyTorch
    for name, uses_kernel in kernel_status(model).items():
        if not uses_kernel:
            kept.setdefault(reasons.get(name, "not selected by kernels.kernelize"), []).append(name)
    if kept:
        details = "; ".join(f"{', '.join(names)} ({reason})" for reason, names in kept.items())
        _notice(f"hf_efficient.kernelize: PyTorch forward kept for {details}")
    return model


def _marked_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Modules whose class is marked with `use_kernel_forward_from_hub`, by layer name (in model order)."""
    marked: dict[str, list[nn.Module]] = {}
    for module in model.modules():
        name = getattr(type(module), "kernel_layer_name", None)
        if name is not None:
            marked.setdefault(str(name), []).append(module)
    return marked


def kernel_status(model: nn.Module) -> dict[str, bool]:
    """For each layer name marked in `model`, whether all its modules run a kernel (`False`: PyTorch forward).

    Example:

    ```python
    hf_efficient.kernelize(model, device="cpu")
    kernel_status(model)  # {"EMAScan": True, "RMSNorm": False, "SiLU": False}
    ```
    """
    return {name: all(map(_uses_kernel, modules)) for name, modules in sorted(_marked_modules(model).items())}


def _loadable(
    marked: dict[str, list[nn.Module]], candidates: dict[str, dict[str, Any]], mode_name: str, device_type: str
) -> tuple[dict[str, dict[str, dict[Any, Any]]], dict[str, str]]:
    """Per marked layer name, the best candidate for the mode (in `kernels`' order) whose layer loads and fits.

    Returns:
        `tuple`: the mapping to hand to `kernels.kernelize` (`{name: {device: {Mode: repository}}}`) and, for the
        names left out, why.
    """
    effective: dict[str, dict[str, dict[Any, Any]]] = {}
    reasons: dict[str, str] = {}
    loaded: dict[Any, Any] = {}  # candidate -> its repository, or the error that stopped it
    for name, modules in marked.items():
        for key in _MODE_PRIORITY[mode_name]:
            candidate = candidates.get(name, {}).get(key)
            if candidate is None:
                continue
            if candidate not in loaded:
                loaded[candidate] = _load(candidate, {type(module) for module in modules})
            if isinstance(loaded[candidate], Exception):
                reasons.setdefault(name, f"{_describe(candidate)} did not load: {_one_line(loaded[candidate])}")
                continue
            effective[name] = {device_type: {parse_mode(key): loaded[candidate]}}
            break
        else:
            reasons.setdefault(name, f"no {device_type} kernel for {mode_name}")
    return effective, reasons


def _mode_name(mode: Any, model: nn.Module) -> str:
    """Canonical name (`"INFERENCE"`, `"TRAINING|TORCH_COMPILE"`, ...) of `mode`; `ValueError` if unsupported."""
    if mode is None:
        return "TRAINING" if model.training else "INFERENCE"
    flag = parse_mode(mode) if isinstance(mode, str) else mode
    names = [n for n in ("INFERENCE", "TRAINING", "TORCH_COMPILE") if getattr(type(flag), n) in flag]
    name = "|".join(names)
    if name not in _MODE_PRIORITY:
        raise ValueError(
            f"mode={mode!r} is not supported; use Mode.INFERENCE or Mode.TRAINING, optionally | Mode.TORCH_COMPILE"
        )
    return name


def _device_type(model: nn.Module, device: str | torch.device | None) -> str:
    if device is None:
        tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
        if tensor is None:
            raise ValueError("cannot infer the device of a model without parameters or buffers; pass device=")
        device = tensor.device
    device_type = device if isinstance(device, str) and device in _DEVICE_TYPES else torch.device(device).type
    if device_type == "cuda" and torch.version.hip is not None:
        device_type = "rocm"  # ROCm builds of torch report "cuda" devices
    if device_type not in _DEVICE_TYPES:
        raise ValueError(f"device={device!r} is not a device type kernels supports ({', '.join(_DEVICE_TYPES)})")
    return device_type


def _candidates(device_type: str, mapping: dict | None, kernels: Any) -> dict[str, dict[str, Any]]:
    """`{layer name: {mode name: kernel or repository}}` for `device_type`: ours, then `mapping` on top."""
    candidates = {
        name: dict(devices[device_type]) for name, devices in KERNEL_MAPPING.items() if device_type in devices
    }
    for name, devices in (mapping or {}).items():
        for device, entry in devices.items():
            if (device.type if isinstance(device, kernels.Device) else device) != device_type:
                continue
            entry = entry if isinstance(entry, dict) else {kernels.Mode.FALLBACK: entry}
            candidates[name] = {_flag_name(flag): repo for flag, repo in entry.items()}
    return candidates


def _flag_name(flag: Any) -> str:
    names = ("FALLBACK", "INFERENCE", "TRAINING", "TORCH_COMPILE")
    return "|".join(name for name in names if getattr(type(flag), name) in flag)


def _load(candidate: Any, classes: set[type]) -> Any:
    """The `kernels` repository of `candidate` once its layer has loaded and passed `_check_layer`, else the error."""
    try:
        repo = repository(candidate) if isinstance(candidate, (HubKernel, OwnKernel)) else candidate
        _check_layer(repo.load(), classes)
    except Exception as error:  # whatever stops a kernel from loading means: keep PyTorch
        return error
    return repo


def _check_layer(layer: type, classes: set[type]) -> None:
    """The checks `kernels` makes when it swaps a layer in, made before: a stateless `nn.Module` whose `forward`
    takes the same parameters (count and kinds) as ours."""
    if not (isinstance(layer, type) and issubclass(layer, nn.Module)) or layer.__init__ is not nn.Module.__init__:
        raise TypeError(f"{layer!r} is not a stateless nn.Module layer")
    theirs = list(inspect.signature(layer.forward).parameters.values())
    for cls in classes:
        ours = list(inspect.signature(cls.forward).parameters.values())
        if len(ours) != len(theirs) or any(a.kind != b.kind for a, b in zip(ours, theirs)):
            names = ", ".join(p.name for p in theirs)
            raise TypeError(f"{layer.__name__}.forward({names}) does not match {cls.__name__}.forward")


def _uses_kernel(module: nn.Module) -> bool:
    """Whether `module.forward` is a kernel's (`kernels` binds the class forward back on fallback)."""
    forward = module.__dict__.get("forward")
    return forward is not None and getattr(forward, "__func__", None) is not type(module).forward


def _describe(kernel: Any) -> str:
    if isinstance(kernel, HubKernel):
        return f"{kernel.repo_id}@{kernel.revision[:7]}"
    if isinstance(kernel, OwnKernel):
        return f"hf_efficient kernel {kernel.kernel}"
    return str(getattr(kernel, "_repo_id", None) or getattr(kernel, "_repo_path", None) or kernel)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


@functools.cache
def _notice(message: str) -> None:
    """Log `message` once per process (the same model kernelized again does not repeat it)."""
    logger.warning(message)


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Raise logger `name` to ERROR for the block: `kernels` logs one multi-line warning per layer without a
    mapping and per offline trust check; our notice says the same in one line."""
    target = logging.getLogger(name)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)
