"""Train a small Llama that retrieves from its context: the backbone of the ChunkLLM retrieval benchmark.

The reference target, trained on plain code and prose, never learned in-context copying, so a key-value probe
cannot tell cache policies apart on it. This recipe trains a model that has it, on the reference tokenizer, in
two phases:

1. **induction**: rows of random tokens in which spans of 4-24 tokens reappear at random later offsets (several
   per row); loss on the copies only. The loss sits near the uniform level for hundreds of steps, then drops as
   induction heads form. The phase stops once the model repeats a 16-token span seen 60 tokens earlier with top-1
   accuracy >= `--copy-accuracy` (checked every 100 steps), or after `--induction-max-steps`.
2. **retrieval**: a mix of those rows, key-value documents (`NAME = "value"` lines planted in the first quarter
   of corpus text and all queried again at its end, each in a layout of `QUERY_LAYOUTS`; loss on the queries)
   and corpus text (LM loss). Each task's
   loss is averaged over its own tokens and the three are summed, so the short query sections are not drowned by
   the text.

Names in training use prefixes disjoint from the benchmark's (`KEY`, `TOKEN`, `LIMIT`, `PATH`) and values are
random letters, so the benchmark measures retrieval of unseen pairs.

```bash
python recipes/train_retrieval_lm.py --output-dir runs/retrieval-lm               # ~17 min on 2 CPU cores
accelerate launch --config_file recipes/configs/ddp.yaml recipes/train_retrieval_lm.py --output-dir runs/retrieval-lm
hf-efficient train train_retrieval_lm -- --output-dir runs/retrieval-lm --layers 3
```

More processes, GPUs or machines, with the configs in `recipes/configs/`: `recipes/README.md`.

Both phases are resumable (`--output-dir/induction-run/checkpoint-*`, `--output-dir/checkpoint-*`). The model,
the reference tokenizer and `retrieval_training.json` go to `--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from pathlib import Path

import torch

PROBE_PREFIXES = ("KEY", "TOKEN", "LIMIT", "PATH")  # the benchmark's names: never used in training
TRAIN_PREFIXES = (
    "NAME", "SIZE", "MODE", "PORT", "HOST", "USER", "ROOT", "FLAG", "TYPE", "CODE", "LEVEL", "COUNT", "DEPTH",
    "RATE", "TIME", "FILE", "DIR", "URL", "ID", "VAR", "ARG", "OPT", "BASE", "HEAD", "NODE", "ITEM", "LINE", "STEP",
    "UNIT", "TAG", "SEED", "BIAS", "LANG", "ZONE", "HASH", "SALT", "FORMAT", "QUEUE", "CACHE", "INDEX",
)  # fmt: skip
TASKS = ("copy", "key_value", "text")
PHASE2_MIX = {"copy": 4, "key_value": 6, "text": 4}  # rows per 14
# how a planted `NAME = "value"` pair is queried: "inline" names the key inside the answer's own line (and chunk);
# "question" asks for it in a line of its own, closed by a chunk boundary before the answer (the needle-in-a-haystack
# layout: question, then answer)
QUERY_LAYOUTS = {"inline": '\n{name} = "{value}"', "question": '\n{name}?\n"{value}"'}
COPY_GAP = 60  # the induction check: a 16-token span repeated after this many random tokens


def key_value_pairs(rng: random.Random, count: int, prefixes: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """`count` distinct names `PREFIX_NN` and as many random 5-letter lowercase values."""
    names = rng.sample([f"{prefix}_{i}" for prefix in prefixes for i in range(10, 100)], count)
    return names, ["".join(rng.choices(string.ascii_lowercase, k=5)) for _ in names]


def key_value_row(tokenizer, filler: list[int], rng: random.Random, length: int) -> tuple[list[int], list[int]]:
    """A `length`-token key-value document and its labels (-100 outside the final query section).

    2-6 `NAME = "value"` lines (fewer when they do not fit) are planted at a random point of the first quarter of
    `filler` (a token window at least `length` long); the document ends with every planted pair queried again, in
    random order, each in a layout of `QUERY_LAYOUTS` drawn at random.
    """

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    for count in range(rng.randint(2, 6), 0, -1):
        names, values = key_value_pairs(rng, count, TRAIN_PREFIXES)
        head = encode("".join(f'{name} = "{value}"\n' for name, value in zip(names, values)))
        order = rng.sample(range(count), count)
        queries = [
            QUERY_LAYOUTS[rng.choice(sorted(QUERY_LAYOUTS))].format(name=names[i], value=values[i]) for i in order
        ]
        tail = encode("".join(queries) + "\n")
        body = length - len(head) - len(tail)
        if body >= 8:
            at = rng.randrange(body // 4 + 1)
            return filler[:at] + head + filler[at:body] + tail, [-100] * (length - len(tail)) + tail
    raise ValueError(f"length={length} leaves no room for one key-value line and filler")


def key_value_texts(tokenizer, texts: list[str], count: int, length: int, seed: int = 0) -> list[str]:
    """`count` key-value documents of `length` tokens as text, their filler drawn from `texts` (e.g. to train
    ChunkLLM adapters on the distribution a retrieval LM was trained on)."""
    rng = random.Random(seed)
    stream = token_stream(tokenizer, texts)
    if len(stream) <= length:
        raise ValueError(f"the texts hold {len(stream)} tokens; key-value documents of {length} need more")
    documents = []
    for _ in range(count):
        start = rng.randrange(len(stream) - length)
        ids, _ = key_value_row(tokenizer, stream[start : start + length], rng, length)
        documents.append(tokenizer.decode(ids))
    return documents


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """`texts` tokenized and concatenated, each followed by the EOS token (if the tokenizer has one)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [token for text in texts for token in [*tokenizer(text, add_special_tokens=False).input_ids, *eos]]


def regular_tokens(tokenizer) -> range:
    """The ids of `tokenizer` past its special tokens (random rows never contain a special token)."""
    return range(max(tokenizer.all_special_ids) + 1, len(tokenizer))


def copy_row(tokens: range, rng: random.Random, length: int, spans: int) -> tuple[list[int], list[int]]:
    """Random tokens with `spans` copies (one per equal segment of the row) and labels on the copies.

    Each copy repeats a 4-24 token span from anywhere earlier in the row. Its first token is unlabelled: nothing in
    the context announces where a copy starts.
    """
    segment = length // spans
    if segment < 8:
        raise ValueError(f"length={length} is too short for {spans} copies (8 tokens each at least)")
    ids = [rng.choice(tokens) for _ in range(length)]
    labels = [-100] * length
    for start in range(0, segment * spans, segment):
        size = rng.randint(4, min(24, segment // 2))
        copy = rng.randrange(max(start, size), start + segment - size + 1)
        source = rng.randrange(copy - size + 1)
        ids[copy : copy + size] = ids[source : source + size]
        labels[copy + 1 : copy + size] = ids[copy + 1 : copy + size]
    return ids, labels


class SyntheticRows(torch.utils.data.IterableDataset):
    """An endless stream of `{"input_ids", "labels", "task"}` rows of `seq_len` tokens, tasks drawn by `mix`.

    `mix` maps task names (`TASKS`) to relative frequencies; `stream` (corpus token ids) feeds the text and
    key-value tasks.
    """

    def __init__(self, tokenizer, stream: list[int], seq_len: int, mix: dict[str, int], seed: int) -> None:
        unknown = set(mix) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; valid: {TASKS}")
        if len(stream) <= seq_len:
            raise ValueError(f"the corpus stream has {len(stream)} tokens; seq_len={seq_len} needs more")
        self.tokenizer, self.stream, self.seq_len, self.mix, self.seed = tokenizer, stream, seq_len, mix, seed

    def row(self, task: str, rng: random.Random) -> tuple[list[int], list[int]]:
        if task == "copy":
            return copy_row(regular_tokens(self.tokenizer), rng, self.seq_len, spans=max(1, self.seq_len // 48))
        start = rng.randrange(len(self.stream) - self.seq_len)
        window = self.stream[start : start + self.seq_len]
        if task == "key_value":
            return key_value_row(self.tokenizer, window, rng, self.seq_len)
        return window, window

    def __iter__(self):
        rng = random.Random(self.seed)
        tasks, weights = zip(*self.mix.items())
        while True:
            task = rng.choices(tasks, weights)[0]
            ids, labels = self.row(task, rng)
            yield {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "task": TASKS.index(task)}


def task_mean_loss(logits: torch.Tensor, labels: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over each task's labelled tokens, summed over the tasks in the batch.

    logits: (B, L, V); labels: (B, L) with -100 unlabelled; task: (B,) task index per row.
    """
    targets = labels[:, 1:]  # (B, L-1)
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
    ).view_as(targets)
    labelled = targets != -100
    total = logits.new_zeros((), dtype=torch.float32)
    for index in task.unique():
        tokens = labelled & (task == index)[:, None]  # (B, L-1)
        if tokens.any():
            total = total + token_loss[tokens].mean()
    return total


@torch.no_grad()
def copy_accuracy(model, tokens: range, rows: int = 16, span: int = 16, gap: int = COPY_GAP) -> float:
    """Top-1 accuracy of repeating a random `span`-token span seen `gap` random tokens earlier (its first token
    excluded)."""
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    segment = torch.randint(tokens.start, tokens.stop, (rows, span), generator=generator)
    filler = torch.randint(tokens.start, tokens.stop, (rows, gap), generator=generator)
    ids = torch.cat([segment, filler, segment], dim=1).to(device)  # (rows, 2 * span + gap)
    was_training = model.training
    model.eval()
    predicted = model(ids).logits[:, -span:-1].argmax(dim=-1)  # (rows, span - 1)
    model.train(was_training)
    return (predicted == ids[:, -span + 1 :]).float().mean().item()


def _trainer_class():
    from transformers import Trainer, TrainerCallback

    class TaskMeanTrainer(Trainer):
        """`Trainer` whose loss is `task_mean_loss` (rows carry a `task` index)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            task, labels = inputs.pop("task"), inputs.pop("labels")
            outputs = model(**inputs)
            loss = task_mean_loss(outputs.logits, labels, task)
            return (loss, outputs) if return_outputs else loss

    class InductionStop(TrainerCallback):
        """Stops training once `copy_accuracy` reaches `threshold` (checked every `every` steps and logged to
        `state.log_history` as `copy_accuracy`)."""

        def __init__(self, tokens: range, threshold: float, every: int = 100) -> None:
            self.tokens, self.threshold, self.every = tokens, threshold, every

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % self.every == 0:
                accuracy = copy_accuracy(model, self.tokens)
                state.log_history.append({"copy_accuracy": accuracy, "step": state.global_step})
                control.should_training_stop = accuracy >= self.threshold
            return control

    return TaskMeanTrainer, InductionStop


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True, help="checkpoints and the trained model")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--induction-seq-len", type=int, default=144, help="phase 1 row length (3 copied spans)")
    parser.add_argument("--induction-batch-size", type=int, default=32)
    parser.add_argument("--induction-max-steps", type=int, default=4000)
    parser.add_argument("--copy-accuracy", type=float, default=0.9, help="phase 1 ends at this copy accuracy")
    parser.add_argument("--seq-len", type=int, default=512, help="phase 2 row length")
    parser.add_argument("--batch-size", type=int, default=14, help="phase 2 rows per step")
    parser.add_argument("--max-steps", type=int, default=600, help="phase 2 steps")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-documents", type=int, default=600, help="reference-corpus train documents")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _train(model, args, phase_dir: Path, dataset, batch_size: int, max_steps: int, schedule: str, callbacks=()):
    """One resumable phase with `TaskMeanTrainer`; returns the trainer."""
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    trainer_class, _ = _trainer_class()
    training_args = TrainingArguments(
        output_dir=str(phase_dir),
        per_device_train_batch_size=batch_size,
        max_steps=max_steps,
        learning_rate=args.learning_rate,
        weight_decay=0.0,
        lr_scheduler_type=schedule,
        warmup_steps=0 if schedule == "constant" else max(1, max_steps // 20),
        max_grad_norm=1.0,
        logging_steps=max(1, min(100, max_steps // 10)),
        save_steps=max(25, max_steps // 4),
        save_total_limit=1,
        remove_unused_columns=False,
        seed=args.seed,
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=args.quiet,
    )
    trainer = trainer_class(model=model, args=training_args, train_dataset=dataset, callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=get_last_checkpoint(str(phase_dir)) if phase_dir.is_dir() else None)
    return trainer


def main(argv: list[str] | None = None) -> Path:
    """Train the retrieval LM into `--output-dir`; returns the output folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_efficient.recipes._distributed import end_distributed_training
    from hf_efficient.reference import reference_config, reference_corpus, tokenizer_dir

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(reference_config("target")))
    stream = token_stream(tokenizer, reference_corpus("train", "all")[: args.max_documents])
    start, record = time.perf_counter(), {}

    induction_dir = args.output_dir / "induction"
    if (induction_dir / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(induction_dir)
        record = json.loads((induction_dir / "induction.json").read_text())
    else:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden_size,
            intermediate_size=2 * args.hidden_size,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(2048, args.seq_len),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
        _, induction_stop = _trainer_class()
        stop = induction_stop(regular_tokens(tokenizer), args.copy_accuracy)
        rows = SyntheticRows(tokenizer, stream, args.induction_seq_len, {"copy": 1}, args.seed)
        trainer = _train(
            model, args, args.output_dir / "induction-run", rows, args.induction_batch_size,
            args.induction_max_steps, "constant", [stop],
        )  # fmt: skip
        record = {
            "induction_steps": trainer.state.global_step,
            "copy_accuracy": copy_accuracy(model, regular_tokens(tokenizer)),
            "copy_checks": [
                (entry["step"], round(entry["copy_accuracy"], 3))
                for entry in trainer.state.log_history
                if "copy_accuracy" in entry
            ],
            "induction_seconds": time.perf_counter() - start,
        }
        if record["copy_accuracy"] < args.copy_accuracy:
            print(
                f"warning: no induction after {record['induction_steps']} steps (copy accuracy "
                f"{record['copy_accuracy']:.2f} < {args.copy_accuracy}); raise --induction-max-steps",
                flush=True,
            )
        trainer.save_model(str(induction_dir))  # on every rank: a sharded (FSDP) model is gathered first
        if trainer.is_world_process_zero():
            (induction_dir / "induction.json").write_text(json.dumps(record, indent=2))

    rows = SyntheticRows(tokenizer, stream, args.seq_len, PHASE2_MIX, args.seed + 1)
    trainer = _train(model, args, args.output_dir, rows, args.batch_size, args.max_steps, "cosine")
    trainer.save_model(str(args.output_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        record.update(
            layers=args.layers,
            hidden_size=args.hidden_size,
            parameters=sum(p.numel() for p in model.parameters()),
            retrieval_steps=args.max_steps,
            retrieval_rows=f"{args.batch_size} x {args.seq_len} tokens ({PHASE2_MIX})",
            train_seconds=time.perf_counter() - start,
            final_loss=losses[-1] if losses else None,
        )
        (args.output_dir / "retrieval_training.json").write_text(json.dumps(record, indent=2))
    end_distributed_training()
    return args.output_dir


if __name__ == "__main__":
    main()
