"""Train ChunkLLM adapters on a frozen backbone: attention distillation for the Q/K adapters + boundary BCE.

For every layer, the backbone's attention of each token (averaged over the query heads of a KV group) is summed
over the closed chunks older than its local window (`--local-chunks`, always kept at inference, so the adapters
only rank the older ones); the Q/K adapters learn to reproduce that chunk distribution (KL), by default
(`--distillation-target chunk`) at each chunk's first token, where inference selects, and averaged over the chunk's
tokens, since that one selection serves the whole chunk (`token`: every token on its own attention). Chunks come
from a rule (`--rule sentence`: a token containing a newline or ending in `.`, `!`, `?`; `--rule line`: a token
containing a newline), which is also the target of the boundary adapter (BCE). Only adapter parameters train.

```bash
python recipes/train_chunkllm.py --output-dir runs/chunkllm                       # reference target, resumable
accelerate launch recipes/train_chunkllm.py --backbone path/to/llama --output-dir runs/chunkllm --max-steps 500
hf-efficient train train_chunkllm -- --output-dir runs/chunkllm --seq-len 1024 --top-k-chunks 16
python recipes/train_chunkllm.py --backbone path/to/llama --load-in-4bit --output-dir runs/chunkllm-4bit
python recipes/train_chunkllm.py --backbone path/to/smollm2 --backbone-dtype bfloat16 --output-dir runs/smollm2
python recipes/train_chunkllm.py --adapters runs/chunkllm --lora --output-dir runs/chunkllm-code --text-file code.txt
```

Checkpoints go to `--output-dir/checkpoint-*` and a rerun resumes from the last one; the trained adapters (an
adapter checkpoint naming its backbone, loadable with `AutoModelForCausalLM`), the tokenizer and a model card go to
`--output-dir`.

The backbone is frozen, so it can be loaded in bfloat16 (`--backbone-dtype bfloat16`) or quantized
(`--load-in-4bit` / `--load-in-8bit`, bitsandbytes): only the adapters train, in float32. `--adapters PATH` continues
from trained adapters; `--lora` then fine-tunes them with LoRA on their linear layers
(`ChunkLLMForCausalLM.lora_target_modules`), e.g. for another domain: the PEFT adapter goes to `--output-dir/lora` and
the merged adapters to `--output-dir`, as without `--lora`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

RULES = ("sentence", "line")


def boundary_label_table(tokenizer, rule: str = "sentence") -> torch.Tensor:
    """`(V,)` boolean table: does token id `i` close a chunk under `rule` (`"sentence"` or `"line"`)."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {RULES}")
    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        closes = "\n" in text
        if rule == "sentence":
            closes = closes or text.rstrip(" ").endswith((".", "!", "?"))
        table[token_id] = closes
    return table


class BoundaryDataset(torch.utils.data.Dataset):
    """Fixed-length blocks of the tokenized texts with their rule labels: `{"input_ids", "boundary_labels"}`."""

    def __init__(self, texts: list[str], tokenizer, seq_len: int, rule: str) -> None:
        from hf_efficient.recipes.train_retrieval_lm import token_stream

        stream = token_stream(tokenizer, texts)
        if len(stream) < seq_len:
            raise ValueError(f"the corpus has {len(stream)} tokens, fewer than seq_len={seq_len}")
        self.blocks = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)  # (N, L)
        self.labels = boundary_label_table(tokenizer, rule)[self.blocks].float()  # (N, L)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index], "boundary_labels": self.labels[index]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from hf_efficient.models.chunkllm.configuration_chunkllm import DISTILLATION_TARGETS
    from hf_efficient.recipes._peft import add_peft_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="checkpoints and the trained model")
    parser.add_argument(
        "--backbone", help="backbone path or Hub id (default: the one --adapters names, else the reference target)"
    )
    parser.add_argument("--adapters", help="continue from these trained ChunkLLM adapters (a checkpoint folder)")
    parser.add_argument("--text-file", type=Path, help="training text (default: the reference corpus train split)")
    parser.add_argument("--rule", choices=RULES, default="sentence", help="boundary labelling rule")
    parser.add_argument("--seq-len", type=int, default=512, help="training sequence length in tokens")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--top-k-chunks", type=int, default=8)
    parser.add_argument(
        "--local-chunks", type=int, default=4, help="recent chunks always kept (the adapters learn the older ones)"
    )
    parser.add_argument("--sink-tokens", type=int, default=4)
    parser.add_argument("--adapter-dim", type=int, help="Q/K adapter width per KV head (default: 32, or --adapters')")
    parser.add_argument("--boundary-loss-weight", type=float, default=1.0)
    parser.add_argument("--max-documents", type=int, default=400, help="reference-corpus documents to use")
    parser.add_argument(
        "--key-value-documents",
        type=int,
        default=0,
        help="add this many key-value documents (`recipes/train_retrieval_lm.py`, seq-len tokens each) to the text",
    )
    parser.add_argument(
        "--distillation-target", choices=DISTILLATION_TARGETS, default="chunk", help="see `ChunkLLMConfig`"
    )
    parser.add_argument(
        "--backbone-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the frozen backbone (bfloat16: half the memory, fast on CPUs with AMX); adapters stay float32",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_peft_arguments(
        parser,
        lora="on the linear layers of the --adapters (needs --adapters)",
        quantized="the frozen backbone",
        targets="ChunkLLMForCausalLM.lora_target_modules, the Q/K and boundary adapters' linear layers",
    )
    args = parser.parse_args(argv)
    if args.lora and args.adapters is None:
        parser.error(
            "--lora fine-tunes trained adapters with LoRA and needs --adapters PATH; to train fresh adapters, drop "
            "--lora (they train in full: the backbone stays frozen either way)"
        )
    return args


def _model(args: argparse.Namespace, backbone: str):
    """Fresh adapters on `backbone`, or the `--adapters` checkpoint (on `backbone`), with `--lora` on them."""
    from hf_efficient.models import ChunkLLMForCausalLM
    from hf_efficient.recipes._peft import lora_config, quantized_loading

    settings = dict(
        top_k_chunks=args.top_k_chunks,
        sink_tokens=args.sink_tokens,
        local_chunks=args.local_chunks,
        boundary_loss_weight=args.boundary_loss_weight,
        distillation_target=args.distillation_target,
    )
    loading = quantized_loading(args) or {"dtype": getattr(torch, args.backbone_dtype)}
    if args.adapters is None:
        return ChunkLLMForCausalLM.from_backbone(
            backbone, adapter_dim=args.adapter_dim or 32, backbone_kwargs=loading, **settings
        )
    model = ChunkLLMForCausalLM.from_pretrained(args.adapters, backbone=backbone, **loading, **settings)
    if args.adapter_dim is not None and args.adapter_dim != model.config.adapter_dim:
        raise ValueError(
            f"--adapter-dim={args.adapter_dim} differs from the adapters in {args.adapters} "
            f"(adapter_dim={model.config.adapter_dim}): drop --adapter-dim"
        )
    model.train()  # the adapters train, the backbone stays frozen
    if not args.lora:
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(args, ChunkLLMForCausalLM.lora_target_modules))


def _backbone_and_tokenizer(name_or_path: str | None, adapters: str | None = None):
    from transformers import AutoTokenizer

    if name_or_path is None and adapters is not None:
        from hf_efficient.models import ChunkLLMConfig

        name_or_path = ChunkLLMConfig.from_pretrained(adapters).base_model_name_or_path
    if name_or_path is None:
        from hf_efficient.reference import reference_model, reference_model_path

        reference_model("target")  # builds it into the cache when missing
        name_or_path = str(reference_model_path("target"))
    return name_or_path, AutoTokenizer.from_pretrained(name_or_path)


def main(argv: list[str] | None = None) -> Path:
    """Train the adapters of `--backbone` into `--output-dir`; returns the output folder."""
    from transformers import Trainer, TrainingArguments, default_data_collator
    from transformers.trainer_utils import get_last_checkpoint

    from hf_efficient.hub import render_model_card
    from hf_efficient.recipes._distributed import end_distributed_training

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    backbone, tokenizer = _backbone_and_tokenizer(args.backbone, args.adapters)
    if args.text_file is not None:
        texts = [args.text_file.read_text()]
    else:
        from hf_efficient.reference import reference_corpus

        texts = reference_corpus("train", "all")[: args.max_documents]
    if args.key_value_documents:
        from hf_efficient.recipes.train_retrieval_lm import key_value_texts

        texts = texts + key_value_texts(tokenizer, texts, args.key_value_documents, args.seq_len, args.seed)
        random.Random(args.seed).shuffle(texts)  # spread the key-value documents over the training blocks
    dataset = BoundaryDataset(texts, tokenizer, args.seq_len, args.rule)
    model = _model(args, backbone)
    training_args = TrainingArguments(
        output_dir=str(args.output_dir),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=max(1, args.max_steps // 20),
        save_steps=max(25, args.max_steps // 4),
        save_total_limit=1,
        label_names=["boundary_labels"],
        seed=args.seed,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=args.quiet,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=default_data_collator)
    start = time.perf_counter()
    last = get_last_checkpoint(str(args.output_dir)) if args.output_dir.is_dir() else None  # every rank looks
    trainer.train(resume_from_checkpoint=last)
    if trainer.is_world_process_zero():
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if args.lora:  # the PEFT adapter, then the adapters with it merged in: the usual checkpoint
            model.save_pretrained(args.output_dir / "lora")
            model = model.merge_and_unload()
        model.save_pretrained(args.output_dir)  # the adapters; the config names the backbone
        tokenizer.save_pretrained(args.output_dir)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        record = {
            "backbone": str(backbone),
            "rule": args.rule,
            "seq_len": args.seq_len,
            "steps": args.max_steps,
            "distillation_target": args.distillation_target,
            "key_value_documents": args.key_value_documents,
            "train_seconds": time.perf_counter() - start,
            "final_loss": losses[-1] if losses else None,
            "adapter_parameters": sum(p.numel() for p in model.adapter_state_dict().values()),
            "trained_parameters": trained,
            "adapters": args.adapters,
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha} if args.lora else None,
            "quantized_backbone": "4-bit" if args.load_in_4bit else "8-bit" if args.load_in_8bit else None,
            "backbone_dtype": None if args.load_in_4bit or args.load_in_8bit else args.backbone_dtype,
        }
        (args.output_dir / "chunkllm_training.json").write_text(json.dumps(record, indent=2))
        mixed = f", {args.key_value_documents} key-value documents added" if args.key_value_documents else ""
        card = render_model_card(
            "chunkllm",
            backbone=str(backbone),
            adapter_parameters=f"{record['adapter_parameters']:,}",
            top_k_chunks=str(args.top_k_chunks),
            local_chunks=str(args.local_chunks),
            sink_tokens=str(args.sink_tokens),
            rule=args.rule,
            dataset=str(args.text_file or "hf_efficient reference corpus (train split)"),
            training_details=f"{args.max_steps} steps of {args.batch_size} x {args.seq_len} tokens with "
            f"`recipes/train_chunkllm.py` ({args.distillation_target}-level attention distillation{mixed}).",
        )
        card.save(args.output_dir / "README.md")
    end_distributed_training()
    return args.output_dir


if __name__ == "__main__":
    main()
