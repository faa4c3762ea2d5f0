"""Train a hierarchical byte LM (H-Net 1- or 2-stage, HAT) or the BPE Llama baseline on the reference corpus.

Every model sees the same packed byte budget per step: byte models train on `--seq-len` bytes per sequence, the
BPE baseline on as many tokens as cover the same bytes on average. Documents are packed as `<s> doc </s>`.
H-Net runs with its per-stage learning rates; the ratio loss and the learned bytes per chunk are logged.

```bash
python recipes/train_byte_lm.py --model hnet --output-dir runs/hnet --max-steps 300        # resumable
accelerate launch --config_file recipes/configs/ddp.yaml recipes/train_byte_lm.py --model hat --output-dir runs/hat
hf-efficient train train_byte_lm -- --model bpe --output-dir runs/bpe --max-steps 300
```

More processes, GPUs or machines, with the configs in `recipes/configs/`: `recipes/README.md`.

Checkpoints go to `--output-dir/checkpoint-*` and a rerun resumes from the last one; the final model and its
tokenizer are saved to `--output-dir` (remote code included for the byte models) with `metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from hf_efficient.recipes._distributed import end_distributed_training
from hf_efficient.reference import reference_corpus

MODELS = ("hnet", "hnet2", "hat", "bpe")


def build_model(name: str):
    """`(model, tokenizer)` for one of `MODELS`, all a few million parameters."""
    from hf_efficient.models import ByteTokenizer, HATConfig, HATForCausalLM, HNetConfig, HNetForCausalLM

    if name == "hnet":
        return HNetForCausalLM(HNetConfig()), ByteTokenizer()
    if name == "hnet2":
        config = HNetConfig(
            arch_layout=["m2", ["T1m1", ["T3"], "m1T1"], "m2"],
            hidden_size=[128, 192, 256],
            intermediate_size=[0, 512, 704],
            num_attention_heads=[4, 4, 4],
            sliding_window=[128, 64, None],
            compression_ratio=[2.5, 2.5],
        )
        return HNetForCausalLM(config), ByteTokenizer()
    if name == "hat":
        return HATForCausalLM(HATConfig()), ByteTokenizer()
    if name == "bpe":
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        from hf_efficient.reference import reference_config, tokenizer_dir

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(reference_config("target")))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return LlamaForCausalLM(config), tokenizer
    raise ValueError(f"unknown --model {name!r}; choose one of {MODELS}")


def packed_dataset(tokenizer, texts: list[str], seq_len: int, max_sequences: int | None) -> list[dict]:
    """`<s> doc </s>` streams cut into `seq_len`-token training rows."""
    stream: list[int] = []
    for text in texts:
        stream += [
            tokenizer.bos_token_id,
            *tokenizer(text, add_special_tokens=False).input_ids,
            tokenizer.eos_token_id,
        ]
        if max_sequences and len(stream) >= seq_len * max_sequences:
            break
    rows = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)][:max_sequences]
    return [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows]


def bytes_per_token(tokenizer, texts: list[str]) -> float:
    n_bytes = sum(len(t.encode()) for t in texts)
    return n_bytes / max(1, sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in texts))


class ByteLMTrainer(Trainer):
    """`Trainer` that also logs H-Net's ratio loss and the learned bytes per chunk (or per word for HAT)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._extra: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if getattr(outputs, "ratio_loss", None) is not None:
            self._extra["ratio_loss"].append(float(outputs.ratio_loss.detach()))
        if getattr(outputs, "lm_loss", None) is not None:
            self._extra["lm_loss"].append(float(outputs.lm_loss.detach()))
        for stage, value in enumerate(getattr(outputs, "compression", None) or ()):
            self._extra[f"bytes_per_chunk_stage{stage}"].append(value)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        logs.update({k: sum(v) / len(v) for k, v in self._extra.items() if v})
        self._extra = defaultdict(list)
        super().log(logs, *args, **kwargs)


def train_byte_lm(
    model_name: str,
    output_dir: str | Path,
    *,
    max_steps: int = 300,
    seq_len: int = 512,
    batch_size: int = 8,
    learning_rate: float = 2e-3,
    kind: str = "all",
    max_train_sequences: int | None = None,
    save_steps: int = 100,
    seed: int = 0,
    logging_steps: int = 25,
    resume: bool = True,
):
    """Train `model_name` (one of `MODELS`) and save it to `output_dir`; returns `(model, tokenizer, log_history)`.

    `seq_len` counts bytes; the BPE baseline's sequences are shortened to cover the same bytes on average.
    """
    torch.manual_seed(seed)
    model, tokenizer = build_model(model_name)
    texts = reference_corpus("train", kind)
    length = seq_len
    if model_name == "bpe":
        length = max(16, round(seq_len / bytes_per_token(tokenizer, texts[:200])))
    data = packed_dataset(tokenizer, texts, length, max_train_sequences or max_steps * batch_size)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, max_steps // 20),
        weight_decay=0.1,
        max_grad_norm=1.0,
        logging_steps=logging_steps,
        save_steps=save_steps,
        save_total_limit=2,
        report_to=[],
        seed=seed,
        dataloader_drop_last=True,
        use_cpu=not torch.cuda.is_available(),
    )
    optimizers = (None, None)
    if hasattr(model, "optimizer_param_groups"):  # H-Net: per-stage learning rates (paper §3.1)
        groups = model.optimizer_param_groups(learning_rate, weight_decay=args.weight_decay)
        optimizers = (torch.optim.AdamW(groups, betas=(0.9, 0.95)), None)
    trainer = ByteLMTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, optimizers=optimizers
    )
    last = get_last_checkpoint(str(output_dir)) if resume and Path(output_dir).is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(output_dir))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "model": model_name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "final_loss": losses[-1] if losses else math.nan,
    }
    if trainer.is_world_process_zero():  # one writer under several processes
        tokenizer.save_pretrained(str(output_dir))
        Path(output_dir, "metrics.json").write_text(json.dumps(metrics, indent=2))
    return model, tokenizer, trainer.state.log_history


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="hnet")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=512, help="bytes per training sequence")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--kind", choices=("code", "prose", "all"), default="all")
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    args = parser.parse_args(argv)
    train_byte_lm(
        args.model,
        args.output_dir,
        max_steps=args.max_steps,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        kind=args.kind,
        save_steps=args.save_steps,
        seed=args.seed,
        resume=not args.no_resume,
    )
    end_distributed_training()


if __name__ == "__main__":
    main()
