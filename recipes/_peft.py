"""What the recipes share for PEFT and bitsandbytes: `--lora` (with `--lora-r`, `--lora-alpha`, `--lora-dropout`,
`--lora-target-modules`) and `--load-in-4bit` / `--load-in-8bit`.

Each recipe says what LoRA goes on and which of its models are quantized (`docs/peft.md` has the table). Quantized
models are frozen: bitsandbytes weights only take LoRA adapters (QLoRA), never a full update.

```python
>>> parser = argparse.ArgumentParser()
>>> add_peft_arguments(parser, lora="LoRA on the student", quantized="the teacher", targets="PEFT's default")
>>> args = parser.parse_args(["--lora", "--load-in-4bit"])
>>> lora_config(args)  # LoraConfig(r=16, lora_alpha=32, ...)
>>> quantized_loading(args)  # {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, ...)}
```
"""

from __future__ import annotations

import argparse

import torch

__all__ = ["add_peft_arguments", "lora_config", "quantized_loading"]


def add_peft_arguments(parser: argparse.ArgumentParser, *, lora: str, quantized: str, targets: str) -> None:
    """Add the PEFT and bitsandbytes options to a recipe's command line.

    Args:
        parser (`argparse.ArgumentParser`): the recipe's parser.
        lora (`str`): what `--lora` puts LoRA on, for the help text.
        quantized (`str`): which models `--load-in-4bit` / `--load-in-8bit` load quantized.
        targets (`str`): the default of `--lora-target-modules`.
    """
    group = parser.add_argument_group("PEFT and bitsandbytes")
    group.add_argument("--lora", action="store_true", help=f"train LoRA adapters: {lora}")
    group.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    group.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling numerator (scale = alpha / r)")
    group.add_argument("--lora-dropout", type=float, default=0.0)
    group.add_argument(
        "--lora-target-modules", nargs="+", metavar="NAME", help=f"module names LoRA goes on (default: {targets})"
    )
    bits = group.add_mutually_exclusive_group()
    bits.add_argument("--load-in-4bit", action="store_true", help=f"load {quantized} in 4-bit NF4 (bitsandbytes)")
    bits.add_argument("--load-in-8bit", action="store_true", help=f"load {quantized} in 8-bit LLM.int8 (bitsandbytes)")


def lora_config(args: argparse.Namespace, default_targets: str | list[str] | None = None, **kwargs):
    """The `peft.LoraConfig` of `--lora` (`None` without it); `default_targets` when `--lora-target-modules` is not
    given (`None`: PEFT's default for the model's architecture, e.g. `q_proj` and `v_proj` on Llama)."""
    if not args.lora:
        return None
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError("--lora needs peft: pip install 'hf-efficient[train]'") from error

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules or default_targets,
        **kwargs,
    )


def quantized_loading(args: argparse.Namespace) -> dict:
    """`from_pretrained` arguments of `--load-in-4bit` / `--load-in-8bit` (empty without them).

    Compute runs in bfloat16 on GPUs that support it, float32 otherwise. On a GPU each process loads its copy on its
    own device (`device_map`), the way distributed QLoRA training places quantized weights; on the CPU bitsandbytes
    works for correctness checks.
    """
    if not (args.load_in_4bit or args.load_in_8bit):
        return {}
    from transformers import BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    if args.load_in_4bit:
        compute = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    loading = {"quantization_config": config}
    if cuda:
        from accelerate import PartialState

        loading["device_map"] = {"": PartialState().device}
    return loading
