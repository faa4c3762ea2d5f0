"""Hub kernels: our kernels' layout and builds, offline loading (LocalLayerRepository, LOCAL_KERNELS), exact equality
with the reference ops, `kernelize` fallback (identical outputs, one notice, no raise), pinned mapping, and the
remote-code model files without `kernels`."""

from __future__ import annotations

import copy
import importlib
import json
import logging
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_efficient.cache.quantization import quantize
from hf_efficient.kernels import KERNEL_MAPPING, OWN_KERNELS, HubKernel, OwnKernel, build_kernel, kernel_source
from hf_efficient.kernels.kernelize import _notice
from hf_efficient.models import ByteTokenizer, HATConfig, HATForCausalLM, HNetConfig, HNetForCausalLM
from hf_efficient.models.hnet.layers_hnet import linear_scan

kernels = pytest.importorskip("kernels")

TOK = ByteTokenizer()
PROMPTS = ["def add(a, b):\n    return", "Hallo wörld"]
NOTICE_LOGGER = "hf_efficient.kernels.kernelize"


@pytest.fixture(autouse=True)
def _fresh_notices(tmp_path, monkeypatch):
    """Each test sees its own first notice, builds its kernels in its own cache and stays offline."""
    _notice.cache_clear()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Every own kernel built once into a fresh folder (a Hub kernel repository)."""
    root = tmp_path_factory.mktemp("kernels")
    return {name: build_kernel(name, root / name) for name in OWN_KERNELS}


HNET = dict(  # recurrent blocks with and without MLP, attention in the main network
    arch_layout=["m1M1", ["T2"], "m1"],
    hidden_size=[48, 64],
    intermediate_size=[96, 128],
    num_attention_heads=[2, 4],
    sliding_window=[8, None],
)
HAT = dict(hidden_size=48, intermediate_size=96, backbone_hidden_size=64, backbone_intermediate_size=128)


def tiny_hnet() -> HNetForCausalLM:
    torch.manual_seed(0)
    return HNetForCausalLM(HNetConfig(**HNET)).eval()


def tiny_hat() -> HATForCausalLM:
    torch.manual_seed(0)
    return HATForCausalLM(HATConfig(**HAT)).eval()


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    batch = TOK(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    ids = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=TOK.pad_token_id)
    return logits, ids


def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == NOTICE_LOGGER]


def scan_module(path):
    """The `scan` module of the `ema-scan` build at `path` (builds of the same sources share their submodules: kernels
    names the loaded modules by the build's metadata id, a hash of the sources)."""
    return importlib.import_module(kernels.get_local_kernel(path).__name__ + ".scan")


def uses_kernel(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return forward is not None and forward.__func__ is not type(module).forward


# ----------------------------------------------------------------------------------------- layout and builds


@pytest.mark.parametrize("name", OWN_KERNELS)
def test_sources_follow_the_hub_kernel_layout(name, built):
    from kernels._rust import Backend, Build

    source = kernel_source(name)
    build = Build.open(source)  # kernel-builder's own parser: strict about fields and backends
    assert build.general.backends == [Backend.CPU, Backend.CUDA]
    package = source / "torch-ext" / name.replace("-", "_")
    assert (package / "__init__.py").is_file() and (package / "layers.py").is_file()
    for backend in ("cpu", "cuda"):
        variant = built[name] / "build" / f"torch-{backend}"
        metadata = kernels.Metadata.read_from_file(variant / "metadata.json")
        assert str(metadata.name) == name and metadata.backend.backend_type == Backend.from_str(backend)
        assert sorted(p.name for p in variant.glob("*.py")) == sorted(p.name for p in package.glob("*.py"))


def test_build_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        build_kernel("ema-scan", tmp_path)
    with pytest.raises(ValueError, match="ema-scan, group-dequantize"):
        kernel_source("flash-attn")


def test_local_kernel_is_cached_by_source_hash(tmp_path):
    from hf_efficient.kernels import local_kernel

    first = local_kernel("ema-scan")
    assert first.parent.parent.parent == tmp_path / "cache" and local_kernel("ema-scan") == first
    assert json.loads((first / "build" / "torch-cpu" / "metadata.json").read_text())["name"] == "ema-scan"


# ---------------------------------------------------------------------------------------------- EMA scan


SCAN_CASES = [  # (B, L, C, decay channels, dtype)
    (2, 37, 5, 5, torch.float32),
    (3, 64, 8, 1, torch.float32),  # de-chunking: one decay per chunk
    (2, 100, 16, 16, torch.bfloat16),
    (1, 1, 4, 4, torch.float32),
    (2, 0, 3, 3, torch.float32),
    (2, 300, 64, 64, torch.float32),  # above the kernel's size threshold for its buffered path
    (3, 200, 64, 1, torch.float32),
    (2, 129, 128, 128, torch.bfloat16),
]


@pytest.mark.parametrize("buffered_always", [False, True], ids=["default", "buffered-always"])
@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-a{c[3]}-{str(c[4])[6:]}")
def test_ema_scan_kernel_equals_linear_scan_bit_for_bit(case, buffered_always, built, monkeypatch):
    batch, length, channels, decay_channels, dtype = case
    layer = kernels.LocalLayerRepository(built["ema-scan"], layer_name="EMAScan").load()
    if buffered_always:  # the buffered path at every size, not only above its threshold
        monkeypatch.setattr(scan_module(built["ema-scan"]), "BUFFERED_MIN_ELEMENTS", 0)
    a = torch.rand(batch, length, decay_channels).to(dtype)
    b = torch.randn(batch, length, channels).to(dtype)
    for h0 in (torch.randn(batch, channels).to(dtype), None):
        assert torch.equal(layer()(a, b, h0), linear_scan(a, b, h0))


def test_ema_scan_kernel_gradients_equal_the_reference(built):
    scan = kernels.get_local_kernel(built["ema-scan"]).ema_scan
    grads = []
    for fn in (scan, linear_scan):
        torch.manual_seed(1)
        a, b, h0 = torch.rand(2, 21, 6, requires_grad=True), torch.randn(2, 21, 6, requires_grad=True), None
        h0 = torch.randn(2, 6, requires_grad=True)
        fn(a, b, h0).pow(2).sum().backward()
        grads.append((a.grad, b.grad, h0.grad))
    for ours, reference in zip(*grads):
        assert torch.equal(ours, reference)


def test_dechunk_module_reaches_the_kernel_and_equals_dechunk():
    from hf_efficient import kernelize
    from hf_efficient.models.hnet.dynamic_chunking_hnet import HNetDeChunk, dechunk

    torch.manual_seed(0)
    inner, prob, last = torch.randn(2, 40, 16), torch.rand(2, 40), torch.randn(2, 16)  # 40 chunks of 90 bytes
    valid = torch.tensor([[True] * 40, [True] * 31 + [False] * 9])
    boundary = torch.zeros(2, 90, dtype=torch.bool)
    for row, count in enumerate((40, 31)):
        boundary[row, torch.randperm(90)[:count]] = True
    module = kernelize(HNetDeChunk(), mode="inference", device="cpu")
    assert uses_kernel(module.scan)
    expected = dechunk(inner, prob, valid, boundary, last)
    for ours, reference in zip(module(inner, prob, valid, boundary, last), expected):
        assert torch.equal(ours, reference)


# --------------------------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [-1, -2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_group_dequantize_kernel_equals_the_cache_dequantize(bits, dim, dtype, built):
    from hf_efficient.kernels import GroupDequantize

    dequantize = kernels.get_local_kernel(built["group-dequantize"]).dequantize
    x = (torch.randn(2, 3, 4, 32, 16) * 3).to(dtype)  # (B, n_blocks, H_kv, R, D)
    q = quantize(x, bits=bits, group_size=16, dim=dim)
    parts = (q.packed, q.scale, q.minimum, q.shape, q.bits, q.dim, q.dtype)
    expected = q.dequantize()
    assert torch.equal(dequantize(*parts), expected)
    assert torch.equal(GroupDequantize()(*parts), expected)
    # through kernelize: the marked reference module gets the kernel's forward, the result is unchanged
    wrapper = nn.Sequential(GroupDequantize())
    repo = kernels.LocalLayerRepository(built["group-dequantize"], layer_name="GroupDequantize")
    from hf_efficient import kernelize

    kernelize(wrapper, mode="inference", device="cpu", mapping={"GroupDequantize": {"cpu": repo}})
    assert uses_kernel(wrapper[0]) and torch.equal(wrapper[0](*parts), expected)


def test_local_kernels_env_var_loads_a_kernel_by_repo_id(built, monkeypatch):
    monkeypatch.setenv("LOCAL_KERNELS", f"hf-efficient/group-dequantize={built['group-dequantize']}")
    module = kernels.get_kernel("hf-efficient/group-dequantize", version=1)  # never looked up on the Hub
    layer = kernels.LayerRepository("hf-efficient/group-dequantize", layer_name="GroupDequantize", revision="v1")
    assert layer.load() is module.layers.GroupDequantize
    q = quantize(torch.randn(1, 2, 8, 4), bits=4, group_size=8, dim=-2)
    assert torch.equal(module.dequantize(q.packed, q.scale, q.minimum, q.shape, 4, q.dim, q.dtype), q.dequantize())


# -------------------------------------------------------------------------------------------- kernelize


@pytest.mark.parametrize("factory", [tiny_hnet, tiny_hat], ids=["hnet", "hat"])
def test_kernelize_on_cpu_offline_keeps_outputs_identical_with_one_notice(factory, caplog, monkeypatch):
    import hf_efficient as hfe
    from hf_efficient.kernels import local_kernel

    # tiny scans are below the EMA kernel's threshold for its buffered path: take it at every size here
    monkeypatch.setattr(scan_module(local_kernel("ema-scan")), "BUFFERED_MIN_ELEMENTS", 0)
    model = factory()
    expected_logits, expected_ids = outputs(model)
    kernelized = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING):
        assert hfe.kernelize(kernelized, mode=kernels.Mode.INFERENCE, device="cpu") is kernelized
        hfe.kernelize(kernelized, mode="inference")  # the same notice is not repeated
    logits, ids = outputs(kernelized)
    assert torch.equal(logits, expected_logits) and torch.equal(ids, expected_ids)
    assert kernelized.state_dict().keys() == model.state_dict().keys()
    kept = "hf_efficient.kernelize: PyTorch forward kept for RMSNorm, SiLU (no cpu kernel for INFERENCE)"
    assert notices(caplog) == [kept]
    assert [r.name for r in caplog.records if r.name.startswith("kernels")] == []  # kernels' own warnings are muted
    expected = {"EMAScan": True, "RMSNorm": False, "SiLU": False} if factory is tiny_hnet else {}
    assert hfe.kernels.kernel_status(kernelized) == {"RMSNorm": False, "SiLU": False, **expected}


def test_kernelize_training_mode_keeps_gradients(caplog):
    import hf_efficient as hfe

    model, reference = tiny_hnet().train(), tiny_hnet().train()
    hfe.kernelize(model, device="cpu")  # mode from model.training
    batch = TOK(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    for m in (model, reference):
        m(**batch, labels=batch.input_ids).loss.backward()
    scans = [m for m in model.modules() if type(m).__name__ == "HNetEMAScan"]
    assert scans and all(uses_kernel(m) for m in scans)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_kernelize_falls_back_when_kernels_cannot_load(built, tmp_path, caplog):
    """Offline, uncached Hub kernels, a missing local build and a layer with another signature: no raise, identical
    outputs, one notice naming each cause."""
    import hf_efficient as hfe

    model = tiny_hnet()
    expected_logits, expected_ids = outputs(model)
    mapping = {
        "RMSNorm": {"cpu": kernels.LayerRepository("kernels-community/liger-kernels", layer_name="LigerRMSNorm",
                                                   revision="979ee9bbdc58b455063903e91602ac58ad66b047")},
        "EMAScan": {"cpu": kernels.LocalLayerRepository(tmp_path / "missing", layer_name="EMAScan")},
        "SiLU": {"cpu": kernels.LocalLayerRepository(built["ema-scan"], layer_name="EMAScan")},  # forward(a, b, h0)
    }  # fmt: skip
    with caplog.at_level(logging.WARNING):
        hfe.kernelize(model, mode="inference", device="cpu", mapping=mapping)
    assert not any(uses_kernel(m) for m in model.modules())
    logits, ids = outputs(model)
    assert torch.equal(logits, expected_logits) and torch.equal(ids, expected_ids)
    [notice] = notices(caplog)
    assert re.search(r"EMAScan \(.*missing.* did not load", notice)
    assert re.search(r"RMSNorm \(kernels-community/liger-kernels.* did not load", notice)
    assert re.search(r"SiLU \(.*does not match HNetSiLU", notice)


def test_kernelize_without_the_kernels_package(monkeypatch, caplog):
    import hf_efficient as hfe

    model = tiny_hat()
    monkeypatch.setitem(sys.modules, "kernels", None)  # `import kernels` raises ImportError
    with caplog.at_level(logging.WARNING):
        hfe.kernelize(model, mode="inference")
    assert not any(uses_kernel(m) for m in model.modules())
    assert notices(caplog) == [
        "hf_efficient.kernelize: `kernels` is not installed (pip install 'hf-efficient[kernels]'); "
        "RMSNorm, SiLU keep the PyTorch forward"
    ]


def test_kernelize_rejects_bad_arguments():
    import hf_efficient as hfe

    with pytest.raises(ValueError, match=r"unknown kernels\.Mode"):
        hfe.kernelize(tiny_hat(), mode="fast")
    with pytest.raises(ValueError, match=r"mode=<Mode\.FALLBACK"):
        hfe.kernelize(tiny_hat(), mode=kernels.Mode.FALLBACK)
    with pytest.raises(ValueError, match="pass device="):
        hfe.kernelize(nn.Sequential(nn.SiLU()).append(_marked_silu()), mode="inference")


def _marked_silu() -> nn.Module:
    from hf_efficient.models.hat.layers_hat import HATSiLU

    return HATSiLU()


# ------------------------------------------------------------------------------------------------ mapping


def test_mapping_is_pinned_and_covers_every_marked_layer():
    hex40 = re.compile(r"[0-9a-f]{40}")
    for layer, devices in KERNEL_MAPPING.items():
        for device, modes in devices.items():
            assert device in ("cpu", "cuda", "rocm", "xpu", "mps", "npu"), (layer, device)
            for mode, kernel in modes.items():
                assert all(name in kernels.Mode.__members__ for name in mode.split("|")), mode
                if isinstance(kernel, HubKernel):
                    assert kernel.repo_id.startswith("kernels-community/") and hex40.fullmatch(kernel.revision)
                else:
                    assert isinstance(kernel, OwnKernel) and kernel.kernel in OWN_KERNELS
    marked = {
        getattr(cls, "kernel_layer_name", None)
        for model in (tiny_hnet(), tiny_hat())
        for cls in {type(m) for m in model.modules()}
    } - {None}
    assert marked == {"RMSNorm", "SiLU", "EMAScan"} and marked <= KERNEL_MAPPING.keys()

    from hf_efficient.kernels import kernel_mapping

    cuda = kernel_mapping("cuda")
    assert str(cuda["RMSNorm"]["cuda"][kernels.Mode.INFERENCE]) == (
        "`kernels-community/liger-kernels` (revision: 979ee9bbdc58b455063903e91602ac58ad66b047), layer `LigerRMSNorm`"
    )
    cpu = kernel_mapping("cpu")
    assert set(cpu) == {"EMAScan", "GroupDequantize"}
    assert isinstance(cpu["EMAScan"]["cpu"][kernels.Mode.TRAINING], kernels.LocalLayerRepository)


# ------------------------------------------------------------------------------------ remote code, no kernels


@pytest.mark.parametrize("family", ["hnet", "hat"])
def test_remote_code_files_work_without_kernels(family, tmp_path, monkeypatch):
    """The model folder (the files `save_pretrained` copies to the Hub) imported as a fresh package with `kernels`
    and `hf_efficient` unimportable: the marked layers are plain PyTorch layers and the model runs."""
    from hf_efficient import models

    package = f"remote_{family}_{tmp_path.name}"
    source = Path(models.__path__[0]) / family
    shutil.copytree(source, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "kernels", None)
    monkeypatch.setitem(sys.modules, "hf_efficient", None)
    layers = importlib.import_module(f"{package}.layers_{family}")
    modeling = importlib.import_module(f"{package}.modeling_{family}")
    marked = [cls for cls in vars(layers).values() if isinstance(cls, type) and cls.__module__ == layers.__name__]
    # our decorator sets `kernel_layer_name` on the class itself; a base class transformers marked (`LlamaRMSNorm`,
    # on releases whose own hub-kernel integration is on) may still carry it, inherited
    assert marked and not any("kernel_layer_name" in vars(cls) for cls in marked)
    prefix, kwargs = ("HNet", HNET) if family == "hnet" else ("HAT", HAT)
    config = getattr(modeling, f"{prefix}Config")(**kwargs)
    model = getattr(modeling, f"{prefix}ForCausalLM")(config).eval()
    reference = tiny_hnet() if family == "hnet" else tiny_hat()
    model.load_state_dict(reference.state_dict())
    batch = TOK(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


# ---------------------------------------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_kernels_benchmark_quick_run(tmp_path):
    from hf_efficient import bench

    report = bench.run("kernels", quick=True, out_dir=tmp_path)
    assert {row["op"] for row in report.rows} >= {"H-Net forward", "H-Net generate", "EMA scan", "dequantize"}
    assert all(row["identical"] for row in report.rows)
