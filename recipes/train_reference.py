"""Train a reference model (and its byte-level BPE tokenizer) on the embedded reference corpus.

The reference models are small Llama-architecture causal LMs trained from scratch with `transformers.Trainer`
on packed fixed-length sequences of the standard-library corpus (`hf_efficient.reference.reference_corpus`).
`hf_efficient.reference.reference_model(name)` runs this recipe into its cache; run it by hand to train a
variant:

```bash
python recipes/train_reference.py --name target --output-dir runs/target          # resumable
accelerate launch recipes/train_reference.py --name drafter --output-dir runs/drafter --max-steps 300
hf-efficient train train_reference -- --name target --output-dir runs/target --seq-len 1024
```

Checkpoints go to `--output-dir/checkpoint-*`; a rerun resumes from the last one. The final model and
tokenizer are saved to `--output-dir` itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_efficient.reference import REFERENCE_MODELS, ReferenceConfig, reference_corpus

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TOKEN_STREAMS = ("code", "prose")  # one token file per kind, shared by every model of one tokenizer


def build_tokenizer(config: ReferenceConfig, out_dir: Path) -> None:
    """Train the byte-level BPE tokenizer on the train split and save it with the tokenized training streams.

    Writes a `PreTrainedTokenizerFast` (`<s>` prepended by `tokenizer(text)`) and `train-{code,prose}.npy`:
    every train document as `<s> ids </s>`, concatenated (uint16 token ids), so models sharing the tokenizer
    do not tokenize the corpus again.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = reference_corpus("train", "all")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    assert fast.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [PAD_ID, BOS_ID, EOS_ID]
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    for kind in TOKEN_STREAMS:
        encoded = tokenizer.encode_batch(reference_corpus("train", kind), add_special_tokens=False)
        stream = [np.asarray([BOS_ID, *e.ids, EOS_ID], dtype=np.uint16) for e in encoded]
        np.save(out_dir / f"train-{kind}.npy", np.concatenate(stream))


class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length blocks of a token stream; each item is `{"input_ids": (L,), "labels": (L,)}`."""

    def __init__(self, stream: np.ndarray, seq_len: int) -> None:
        n_blocks = len(stream) // seq_len
        self.blocks = torch.from_numpy(stream[: n_blocks * seq_len].astype(np.int64)).view(n_blocks, seq_len)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]  # (L,)
        return {"input_ids": block, "labels": block}


def packed_dataset(config: ReferenceConfig, tokenizer_dir: Path) -> PackedDataset:
    """Code and (`prose_repeats` times) prose training streams, interleaved in seq_len chunks, then packed."""
    chunks = []
    for kind, repeats in (("code", 1), ("prose", config.prose_repeats)):
        stream = np.load(tokenizer_dir / f"train-{kind}.npy")
        chunks += [stream[i : i + config.seq_len] for i in range(0, len(stream), config.seq_len)] * repeats
    random.Random(config.seed).shuffle(chunks)  # mix kinds so every batch sees both
    return PackedDataset(np.concatenate(chunks), config.seq_len)


def build_model(config: ReferenceConfig, vocab_size: int):
    """A freshly initialised `LlamaForCausalLM` of `config` with tied embeddings and the tokenizer's ids."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


def bf16_supported() -> bool:
    """Whether bf16 autocast is fast here: a CUDA GPU with bf16, or a CPU with native bf16 (AVX512-BF16/AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def train_model(
    config: ReferenceConfig,
    tokenizer_dir: Path,
    output_dir: Path,
    final_dir: Path | None = None,
    progress: bool = True,
) -> Path:
    """Train one reference model with `transformers.Trainer`, resuming from the last checkpoint in `output_dir`.

    Args:
        config (`ReferenceConfig`): architecture and training budget.
        tokenizer_dir (`Path`): folder written by `build_tokenizer`.
        output_dir (`Path`): checkpoints (`checkpoint-*`) and Trainer state.
        final_dir (`Path`, *optional*): where the trained model and tokenizer are saved (default `output_dir`).
        progress (`bool`, *optional*, defaults to `True`): Trainer progress bar and loss logging.

    Returns:
        `Path`: `final_dir`.
    """
    from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments, default_data_collator
    from transformers.trainer_utils import get_last_checkpoint

    final_dir = Path(final_dir or output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model = build_model(config, len(tokenizer))
    bf16 = config.bf16 and bf16_supported()
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_steps,
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=max(1, config.max_steps // 20),
        save_steps=max(50, config.max_steps // 4),
        save_total_limit=1,
        seed=config.seed,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=not progress,
        bf16=bf16,
        use_cpu=bf16 and not torch.cuda.is_available(),  # Trainer refuses CPU bf16 autocast without it
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=packed_dataset(config, tokenizer_dir),
        data_collator=default_data_collator,
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=get_last_checkpoint(str(output_dir)))
    if trainer.is_world_process_zero():
        trainer.save_model(str(final_dir))
        tokenizer.save_pretrained(final_dir)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        record = {
            "config": dataclasses.asdict(config),
            "train_seconds": time.perf_counter() - start,
            "final_loss": losses[-1] if losses else None,
            "parameters": model.num_parameters(),
        }
        (final_dir / "reference_training.json").write_text(json.dumps(record, indent=2))
    return final_dir


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="target", help=f"reference model to train: {', '.join(REFERENCE_MODELS)}")
    parser.add_argument("--output-dir", type=Path, required=True, help="checkpoints and final model")
    parser.add_argument("--tokenizer-dir", type=Path, help="tokenizer folder (default: the cached reference one)")
    for field in dataclasses.fields(ReferenceConfig):  # every knob, e.g. --max-steps 20 for a smoke run
        if field.name != "description":
            flag, kind = f"--{field.name.replace('_', '-')}", str(field.type)
            if kind == "bool":
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"override {field.name}")
            else:
                parser.add_argument(flag, type={"int": int, "float": float}[kind], help=f"override {field.name}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train `--name` (with any field of `ReferenceConfig` overridden) into `--output-dir`."""
    from hf_efficient import reference

    args = parse_args(argv)
    fields = [f.name for f in dataclasses.fields(ReferenceConfig) if f.name != "description"]
    try:
        config = reference.reference_config(args.name)
        config = dataclasses.replace(config, **{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    except ValueError as error:  # a one-line error, not a traceback
        sys.exit(f"error: {error}")
    tokenizer_dir = args.tokenizer_dir or reference.tokenizer_dir(config)
    train_model(config, tokenizer_dir, args.output_dir)
    print(f"saved {args.name} to {args.output_dir}")


if __name__ == "__main__":
    main()
