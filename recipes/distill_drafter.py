"""DistillSpec: distil a drafter towards its target on the drafter's own samples, with TRL.

On-policy knowledge distillation (the student generates, the teacher scores every generated token) raises
the acceptance rate `1 - TV(p, q)` that speculative decoding depends on. The divergence is selectable, as the
paper finds the best one depends on the task and decoding: forward KL, reverse KL or JSD (TRL's generalised
JSD with `beta` = 0, 1, 0.5).

Paper: Zhou et al., "DistillSpec: Improving Speculative Decoding via Knowledge Distillation", ICLR 2024,
arXiv:2310.08461 (on-policy data, divergence choice); TRL `DistillationTrainer` (generalised JSD, Agarwal et al.
arXiv:2306.13649).

```bash
python recipes/distill_drafter.py --max-steps 40                 # reference target -> reference drafter
accelerate launch recipes/distill_drafter.py --divergence rkl
hf-efficient train distill_drafter -- --output-dir out/distilled
```
"""

from __future__ import annotations

import argparse
import os

DIVERGENCE_BETA = {"fkl": 0.0, "jsd": 0.5, "rkl": 1.0}


def distilled_drafter_path():
    """Default output: next to the reference models, keyed by both the student's and the teacher's recipe, so a
    retrained target or drafter is distilled again."""
    from hf_efficient.reference import cache_dir, reference_key

    return cache_dir() / f"drafter-distilled-{reference_key('drafter')}-from-{reference_key('target')}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="target model folder (default: the reference target)")
    parser.add_argument("--student", help="drafter model folder (default: the reference drafter)")
    parser.add_argument("--output-dir", help="checkpoints and the distilled drafter (default: the reference cache)")
    parser.add_argument("--divergence", choices=sorted(DIVERGENCE_BETA), default="fkl")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--num-prompts", type=int, default=512, help="training prompts cut from the reference corpus")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion-tokens", type=int, default=48, help="on-policy tokens generated per prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling and loss temperature")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Distil `--student` towards `--teacher` and save it to `--output-dir` (resumes from its checkpoints)."""
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint
    from trl import DistillationConfig, DistillationTrainer

    from hf_efficient.speculative.training_data import (
        load_target_and_drafter,
        schedule_arguments,
        training_prompts,
    )

    args = parse_args(argv)
    teacher, student, tokenizer = load_target_and_drafter(args.teacher, args.student)
    if args.output_dir is None:
        args.output_dir = str(distilled_drafter_path())
    tokenizer.padding_side = "left"
    dataset = Dataset.from_dict({"prompt": training_prompts(tokenizer, args.num_prompts, args.prompt_tokens)})
    config = DistillationConfig(
        **schedule_arguments(args),
        beta=DIVERGENCE_BETA[args.divergence],
        temperature=args.temperature,
        max_completion_length=args.completion_tokens,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=5,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():  # one writer under several processes
        tokenizer.save_pretrained(args.output_dir)
        print(f"saved the distilled drafter ({args.divergence}) to {args.output_dir}")


if __name__ == "__main__":
    main()
