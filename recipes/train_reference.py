"""Train a reference model (and its byte-level BPE tokenizer) on the embedded reference corpus.

The reference models are small Llama-architecture causal LMs trained from scratch with `transformers.Trainer`
on packed fixed-length sequences of the standard-library corpus (`hf_efficient.reference.reference_corpus`).
The training code lives in `hf_efficient.reference.trained` (`reference_model(name)` builds its cache with it);
this script is its command line, to train a variant by hand:

```bash
python recipes/train_reference.py --name target --output-dir runs/target          # resumable
accelerate launch --config_file recipes/configs/ddp.yaml recipes/train_reference.py --output-dir runs/target
hf-efficient train train_reference -- --name target --output-dir runs/target --seq-len 1024
```

More processes, GPUs or machines, with the configs in `recipes/configs/`: `recipes/README.md`.

Checkpoints go to `--output-dir/checkpoint-*`; a rerun resumes from the last one. The final model and
tokenizer are saved to `--output-dir` itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from hf_efficient.recipes._distributed import end_distributed_training
from hf_efficient.reference.trained import REFERENCE_MODELS, ReferenceConfig, train_model


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
    end_distributed_training()
    print(f"saved {args.name} to {args.output_dir}")


if __name__ == "__main__":
    main()
