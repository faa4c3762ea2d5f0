"""Hub kernels: H-Net with and without `hf_efficient.kernelize`, and the kernelized ops on their own.

H-Net (the default `HNetConfig`, ~4M parameters, random weights from a fixed seed: speed does not depend on
training) runs a forward pass over byte rows cut from the reference corpus's test split, and greedy generation from
shorter prompts, once as built and once kernelized (a deep copy). On CPU the mapping has no RMSNorm or SiLU kernel,
so those keep PyTorch; H-Net's EMA scan gets hf_efficient's `ema-scan` kernel. The two ops with kernels of our own
are also timed alone against their references: the EMA scan (`linear_scan`) at the shapes of the recurrent blocks
and of de-chunking, and the quantized caches' dequantization (`QuantizedTensor.dequantize`) at GEAR/KIVI shapes.

Every comparison runs in interleaved rounds (`harness.interleaved`, order rotated each round); speedup = median of
the per-round ratios; `identical` = the kernelized result equals the reference bit for bit. The budget below is
frozen.
"""

from __future__ import annotations

import copy

import torch

from .harness import BenchReport, interleaved

DESCRIPTION = "hf_efficient.kernelize: H-Net forward/generate and the EMA-scan / dequantize kernels vs PyTorch"

SEED = 0
ROUNDS, OP_ROUNDS = 5, 7
FORWARD_BATCH, FORWARD_BYTES = 4, 1024
GENERATE_BATCH, PROMPT_BYTES, NEW_BYTES = 4, 256, 64
# (label, B, L, C, decay channels): recurrent block of the default config (C = 2 x 128), de-chunking (one decay per
# chunk, ~1/6 of the bytes), a paper-width outer stage (C = 2 x 1024)
SCAN_SHAPES = (
    ("recurrent block", 4, 1024, 256, 256),
    ("de-chunking", 4, 171, 128, 1),
    ("recurrent block, D=1024", 1, 2048, 2048, 2048),
)
# (label, shape (B, n_blocks, H_kv, R, D), bits, group size, grouped axis, dtype): GEAR keys / values, KIVI 2-bit
DEQUANTIZE_SHAPES = (
    ("keys 4-bit bf16", (1, 16, 3, 64, 64), 4, 64, -2, torch.bfloat16),
    ("values 4-bit bf16", (1, 16, 3, 64, 64), 4, 64, -1, torch.bfloat16),
    ("keys 2-bit fp16", (4, 16, 8, 32, 128), 2, 32, -2, torch.float16),
    ("values 8-bit fp32", (1, 16, 9, 64, 64), 8, 64, -1, torch.float32),
)
QUICK = dict(rounds=2, forward=(2, 256), generate=(2, 64, 8), scan_scale=4, dequantize_blocks=4)


def byte_rows(n: int, length: int, split: str = "test") -> list[bytes]:
    """`n` consecutive `length`-byte rows of the reference corpus's `split` (code, then prose)."""
    from hf_efficient.reference import reference_corpus

    stream = b""
    for document in reference_corpus(split):
        stream += document.encode()
        if len(stream) >= n * length:
            break
    return [stream[i * length : (i + 1) * length] for i in range(n)]


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    try:
        from kernels import get_local_kernel
    except ImportError as error:  # the environment, not a bug: the CLI shows it as one line
        message = "the kernels benchmark needs `kernels`: pip install 'hf-efficient[kernels]'"
        raise ModuleNotFoundError(message, name="kernels") from error
    import hf_efficient as hfe
    from hf_efficient.cache.quantization import quantize
    from hf_efficient.kernels import kernel_status, local_kernel
    from hf_efficient.models import ByteTokenizer, HNetConfig, HNetForCausalLM
    from hf_efficient.models.hnet.layers_hnet import linear_scan

    rounds = QUICK["rounds"] if quick else ROUNDS
    op_rounds = QUICK["rounds"] if quick else OP_ROUNDS
    forward_batch, forward_bytes = QUICK["forward"] if quick else (FORWARD_BATCH, FORWARD_BYTES)
    generate_batch, prompt_bytes, new_bytes = QUICK["generate"] if quick else (GENERATE_BATCH, PROMPT_BYTES, NEW_BYTES)

    torch.manual_seed(SEED)
    config = HNetConfig()
    model = HNetForCausalLM(config).to(device).eval()
    kernelized = hfe.kernelize(copy.deepcopy(model), mode="inference", device=device)
    status = kernel_status(kernelized)
    on_kernel, on_pytorch = [n for n, k in status.items() if k], [n for n, k in status.items() if not k]
    tokenizer = ByteTokenizer()
    report = BenchReport(
        "kernels",
        "Hub kernels: hf_efficient.kernelize vs PyTorch (H-Net, EMA scan, dequantize)",
        device=device,
        setup=f"H-Net default config ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, layout "
        f"{config.arch_layout}, widths {config.hidden_size}, random weights, seed {SEED}), fp32"
        f"{' (quick run)' if quick else ''}. Kernelized layers: {', '.join(on_kernel) or 'none'}; PyTorch (no "
        f"{device} kernel loads): {', '.join(on_pytorch) or 'none'}. Forward: "
        f"{forward_batch} rows x {forward_bytes} bytes of the reference corpus's test split; generate: "
        f"{generate_batch} prompts x {prompt_bytes} bytes, {new_bytes} new bytes, greedy. Ops: EMA scan "
        "(`linear_scan` vs the `ema-scan` kernel) and dequantize (`QuantizedTensor.dequantize` vs the "
        f"`group-dequantize` kernel). Interleaved rounds ({rounds} for the model, {op_rounds} for the ops, order "
        "rotated); speedup = median of per-round ratios; identical = equal bit for bit.",
    )

    def compare(op: str, case: str, reference, candidate, n_rounds: int) -> None:
        timing = interleaved({"pytorch": reference, "kernelized": candidate}, rounds=n_rounds, device=device)
        report.add_row(
            {
                "op": op,
                "case": case,
                "pytorch_ms": timing.median_s("pytorch") * 1e3,
                "kernelized_ms": timing.median_s("kernelized") * 1e3,
                "speedup": timing.speedup("kernelized", "pytorch"),
                "identical": all(
                    torch.equal(a, b) for a, b in zip(timing.results["pytorch"], timing.results["kernelized"])
                ),
            }
        )

    rows = byte_rows(forward_batch, forward_bytes)
    batch = tokenizer([r.decode("utf-8", "replace") for r in rows], return_tensors="pt", padding=True).to(device)

    def forward(m):
        with torch.inference_mode():
            return m(**batch, use_cache=False).logits

    compare("H-Net forward", f"{forward_batch} x {batch.input_ids.shape[1]} bytes", lambda: forward(model),
            lambda: forward(kernelized), rounds)  # fmt: skip

    prompts = [r.decode("utf-8", "replace") for r in byte_rows(generate_batch, prompt_bytes, split="test")]
    prompt_batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)

    def generate(m):
        with torch.inference_mode():
            return m.generate(
                **prompt_batch, max_new_tokens=new_bytes, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )

    compare("H-Net generate", f"{generate_batch} x {prompt_bytes} + {new_bytes} bytes", lambda: generate(model),
            lambda: generate(kernelized), rounds)  # fmt: skip

    ema_scan = get_local_kernel(local_kernel("ema-scan")).ema_scan
    dequantize = get_local_kernel(local_kernel("group-dequantize")).dequantize
    generator = torch.Generator().manual_seed(SEED)
    scale = QUICK["scan_scale"] if quick else 1
    for label, b, length, channels, decay_channels in SCAN_SHAPES:
        length, channels = max(length // scale, 2), max(channels // scale, 1)
        decay_channels = min(decay_channels, channels)
        a = torch.rand(b, length, decay_channels, generator=generator).to(device)
        x = torch.randn(b, length, channels, generator=generator).to(device)
        h0 = torch.randn(b, channels, generator=generator).to(device)
        compare("EMA scan", f"{label} ({b}, {length}, {channels})", lambda a=a, x=x, h0=h0: linear_scan(a, x, h0),
                lambda a=a, x=x, h0=h0: ema_scan(a, x, h0), op_rounds)  # fmt: skip
    for label, shape, bits, group, dim, dtype in DEQUANTIZE_SHAPES:
        shape = (shape[0], QUICK["dequantize_blocks"], *shape[2:]) if quick else shape
        q = quantize(torch.randn(shape, generator=generator).to(device, dtype), bits, group, dim)
        parts = (q.packed, q.scale, q.minimum, q.shape, q.bits, q.dim, q.dtype)
        compare("dequantize", f"{label} {tuple(shape)}", q.dequantize, lambda parts=parts: dequantize(*parts),
                op_rounds)  # fmt: skip

    for op in ("H-Net forward", "H-Net generate"):
        row = next(r for r in report.rows if r["op"] == op)
        report.note(f"{op}: {row['speedup']:.2f}x with kernelize, outputs identical: {row['identical']}")
    report.note(
        "generation decodes one byte per step, where the scans have length 1 and the kernel takes the reference "
        "path: its gain is limited to the prefill"
    )
    report.bar_plot("speedup", label="case")
    return report
