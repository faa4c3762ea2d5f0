"""Train the SpecDec++ acceptance-prediction head on a frozen drafter, with `transformers.Trainer`.

Data: the target continues corpus prompts (greedy); along those responses the frozen drafter's last hidden
state at each position is paired with whether the drafter's top token there is accepted by the target —
`1[argmax q == argmax p]` for greedy verification, or the soft label `min(1, p(d) / q(d))` for sampling.
The head is trained with a weighted binary cross-entropy (rejections weigh more: a missed rejection wastes a
whole draft tail). `DraftModel(drafter, acceptance_head=AcceptanceHead.load(...))` then stops drafting once
P(some rejection) exceeds its threshold.

Paper: Huang, Guo and Wang, "SpecDec++: Boosting Speculative Decoding via Adaptive Candidate Lengths",
COLM 2025, arXiv:2405.19715 (§4: acceptance prediction head, weighted BCE, target-generated responses).

```bash
python recipes/train_acceptance_head.py --output-dir out/acceptance-head
accelerate launch --config_file recipes/configs/ddp.yaml recipes/train_acceptance_head.py --label sampling
```

More processes, GPUs or machines, with the configs in `recipes/configs/`: `recipes/README.md`.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="target model folder (default: the reference target)")
    parser.add_argument("--drafter", help="drafter model folder (default: the reference drafter)")
    parser.add_argument("--output-dir", default="acceptance-head", help="checkpoints and acceptance_head.safetensors")
    parser.add_argument("--label", choices=("greedy", "sampling"), default="greedy")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=3, help="residual blocks of the head")
    parser.add_argument("--reject-weight", type=float, default=6.0, help="BCE weight of rejections (paper: 6)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


class HeadTrainingModel(nn.Module):
    """Wraps an `AcceptanceHead` with the weighted BCE loss, as `Trainer` expects (`forward` returns the loss)."""

    def __init__(self, head: nn.Module, reject_weight: float) -> None:
        super().__init__()
        self.head, self.reject_weight = head, reject_weight

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(hidden)  # (N,)
        weight = 1.0 + (self.reject_weight - 1.0) * (1.0 - labels)  # soft labels weigh in proportion
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels, weight=weight)
        return {"loss": loss, "logits": logits}


@torch.no_grad()
def acceptance_data(target, drafter, tokenizer, prompts: list[str], response_tokens: int, label: str):
    """`(hidden (N, E), labels (N,))` along target-generated responses to `prompts`."""
    hiddens, labels = [], []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        sequence = target.generate(**inputs, max_new_tokens=response_tokens, do_sample=False)  # (1, L)
        start = inputs["input_ids"].shape[1] - 1  # the position predicting the first response token
        p = torch.softmax(target(sequence).logits[0, start:-1].float(), -1)  # (R, V)
        out = drafter(sequence, output_hidden_states=True)
        q = torch.softmax(out.logits[0, start:-1].float(), -1)  # (R, V)
        draft = q.argmax(-1)  # the drafter's top token at each position
        if label == "greedy":
            accepted = (p.argmax(-1) == draft).float()
        else:  # the probability that `draft` survives rejection sampling, min(1, p / q)
            accepted = (p.gather(1, draft[:, None]) / q.gather(1, draft[:, None])).clamp(max=1.0).squeeze(1)
        hiddens.append(out.hidden_states[-1][0, start:-1].float())
        labels.append(accepted)
    return torch.cat(hiddens), torch.cat(labels)


def main(argv: list[str] | None = None) -> None:
    """Build the data, train the head on the frozen drafter, save `acceptance_head.safetensors`."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from hf_efficient.recipes._distributed import end_distributed_training
    from hf_efficient.speculative import AcceptanceHead
    from hf_efficient.speculative.training_data import (
        load_target_and_drafter,
        schedule_arguments,
        training_prompts,
    )

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    target, drafter, tokenizer = load_target_and_drafter(args.target, args.drafter)
    target.eval(), drafter.eval()
    prompts = training_prompts(tokenizer, args.num_prompts, args.prompt_tokens)
    hidden, labels = acceptance_data(target, drafter, tokenizer, prompts, args.response_tokens, args.label)
    print(f"{len(labels)} positions, mean acceptance {labels.mean():.3f}")
    dataset = Dataset.from_dict({"hidden": hidden.tolist(), "labels": labels.tolist()}).with_format("torch")
    head = AcceptanceHead(drafter.config.hidden_size, num_layers=args.num_layers)
    training_args = TrainingArguments(**schedule_arguments(args), logging_steps=25, remove_unused_columns=False)
    trainer = Trainer(model=HeadTrainingModel(head, args.reject_weight), args=training_args, train_dataset=dataset)
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    trainer.train(resume_from_checkpoint=last)
    if trainer.is_world_process_zero():  # one writer under several processes
        head.save(os.path.join(args.output_dir, "acceptance_head.safetensors"))
        print(f"saved the acceptance head to {args.output_dir}/acceptance_head.safetensors")
    end_distributed_training()


if __name__ == "__main__":
    main()
