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
python recipes/distill_drafter.py --teacher path/to/target --student path/to/drafter --lora --load-in-4bit
python recipes/distill_drafter.py --teacher path/to/smollm2 --student-layers 4 --chat --vocab-size 8192 \
    --teacher-dtype bfloat16 --output-dir out/smollm2-drafter          # a drafter cut from the target itself
```

`--student-layers N` builds the student from the teacher (`drafter_from_target`: its first N - 1 layers, its last
layer, its embeddings and LM head), the same-tokenizer drafter a chat model lacks; `--chat` turns the training
prompts into chat requests (the teacher's chat template), so the student learns the target's answers;
`--vocab-size K` trims the distilled drafter's LM head to the K tokens the teacher generates most (VocabTrim), saved
for `load_drafter`.

`--lora` trains LoRA adapters on the student instead of all its weights (PEFT's default targets for its
architecture, `q_proj` and `v_proj` on Llama, or `--lora-target-modules`); `--load-in-4bit` / `--load-in-8bit`
load the frozen models with bitsandbytes: the teacher, and with `--lora` the student's base too (QLoRA). The LoRA
adapter goes to `--output-dir/lora` and, merged into a full-precision copy of the student, the drafter that
speculative decoding loads to `--output-dir` (no LoRA overhead at draft time).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

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
    parser.add_argument("--student-layers", type=int, help="cut the student from the teacher: this many layers")
    parser.add_argument("--chat", action="store_true", help="training prompts as chat requests (chat template)")
    parser.add_argument("--vocab-size", type=int, help="trim the distilled drafter's LM head to this many tokens")
    parser.add_argument(
        "--teacher-dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the frozen teacher"
    )
    from hf_efficient.recipes._peft import add_peft_arguments

    add_peft_arguments(
        parser,
        lora="on the student (the distilled drafter is saved merged)",
        quantized="the teacher, and with --lora the student's base (QLoRA)",
        targets="PEFT's default for the student's architecture: q_proj, v_proj for Llama",
    )
    args = parser.parse_args(argv)
    if args.student_layers is not None and args.student is not None:
        parser.error("--student-layers cuts the student from the teacher; drop --student (or --student-layers)")
    if args.student_layers is not None and args.teacher is None:
        parser.error("--student-layers needs --teacher PATH (the model to cut the drafter from)")
    if args.student_layers is not None and args.lora:
        parser.error("--student-layers trains the cut layers in full; drop --lora")
    return args


def _model_paths(args: argparse.Namespace) -> tuple[str, str]:
    """The teacher's and the student's folders, each defaulting to the reference model of that role (built when
    missing)."""
    from hf_efficient.reference import reference_model, reference_model_path

    paths = []
    for given, role in ((args.teacher, "target"), (args.student, "drafter")):
        if given is None:
            reference_model(role)  # builds it into the cache when missing
        paths.append(given or str(reference_model_path(role)))
    return paths[0], paths[1]


def _load_models(args: argparse.Namespace):
    """`(teacher, student, tokenizer, student_path)`, quantized as `--load-in-4bit` / `--load-in-8bit` ask."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_efficient.recipes._peft import quantized_loading

    teacher_path, student_path = _model_paths(args)
    quantized = quantized_loading(args)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, **quantized)
    student = AutoModelForCausalLM.from_pretrained(student_path, **(quantized if args.lora else {}))
    return teacher, student, AutoTokenizer.from_pretrained(teacher_path), student_path


def _save_merged(lora_dir: str, student_path: str, output_dir: str) -> None:
    """The LoRA adapter merged into a full-precision copy of the student (trained on a 4-bit base or not)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_path)
    PeftModel.from_pretrained(student, lora_dir).merge_and_unload().save_pretrained(output_dir)


_CHAT_INSTRUCTIONS = (
    "Summarize the following text in two sentences.",
    "Continue the following text.",
    "What is the main point of the following text?",
    "Explain the following text to a beginner.",
)


def chat_requests(texts: list[str]) -> list[list[dict[str, str]]]:
    """Each text as one user turn asking something about it (the instructions rotate)."""
    return [
        [{"role": "user", "content": f"{_CHAT_INSTRUCTIONS[i % len(_CHAT_INSTRUCTIONS)]}\n\n{text}"}]
        for i, text in enumerate(texts)
    ]


def _teacher_and_cut_student(args: argparse.Namespace):
    """`(teacher, student, tokenizer)`: the student cut from the teacher (`--student-layers`), in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_efficient.speculative.layer_drafter import drafter_from_target

    teacher = AutoModelForCausalLM.from_pretrained(args.teacher)
    student = drafter_from_target(teacher, args.student_layers)  # from the float32 weights
    teacher = teacher.to(getattr(torch, args.teacher_dtype))
    return teacher, student, AutoTokenizer.from_pretrained(args.teacher)


def _trim_saved_drafter(args: argparse.Namespace, teacher, tokenizer, prompts: list, answers: int = 32) -> None:
    """Trim the saved drafter's LM head to the `--vocab-size` tokens the teacher uses most: counted on its greedy
    answers to the first `answers` training prompts and on all the prompts (VocabTrim), then save it over."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_efficient.speculative.vocab_trim import token_counts, trim_drafter_vocab

    texts = [tokenizer.apply_chat_template(p, tokenize=False) if isinstance(p, list) else p for p in prompts]
    counts = token_counts(texts, tokenizer)
    with torch.no_grad():
        for text in texts[:answers]:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(teacher.device)
            out = teacher.generate(**ids, max_new_tokens=args.completion_tokens, do_sample=False)
            counts.update(out[0, ids.input_ids.shape[1] :].tolist())
    drafter = AutoModelForCausalLM.from_pretrained(args.output_dir)
    trim_drafter_vocab(drafter, counts, args.vocab_size).save_pretrained(args.output_dir)


def main(argv: list[str] | None = None) -> None:
    """Distil `--student` towards `--teacher` and save it to `--output-dir` (resumes from its checkpoints)."""
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint
    from trl import DistillationConfig, DistillationTrainer

    from hf_efficient.recipes._distributed import end_distributed_training
    from hf_efficient.recipes._peft import lora_config
    from hf_efficient.speculative.training_data import (
        load_target_and_drafter,
        schedule_arguments,
        training_prompts,
    )

    args = parse_args(argv)
    if args.student_layers is not None:
        teacher, student, tokenizer = _teacher_and_cut_student(args)
    elif args.lora or args.load_in_4bit or args.load_in_8bit:
        teacher, student, tokenizer, student_path = _load_models(args)
    else:
        teacher, student, tokenizer = load_target_and_drafter(args.teacher, args.student)
    if args.output_dir is None:
        args.output_dir = str(distilled_drafter_path())
    tokenizer.padding_side = "left"
    prompts = training_prompts(tokenizer, args.num_prompts, args.prompt_tokens)
    dataset = Dataset.from_dict({"prompt": chat_requests(prompts) if args.chat else prompts})
    config = DistillationConfig(
        **schedule_arguments(args),
        beta=DIVERGENCE_BETA[args.divergence],
        temperature=args.temperature,
        max_completion_length=args.completion_tokens,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=5,
    )
    peft_config = lora_config(args, task_type="CAUSAL_LM")
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    trainer.train(resume_from_checkpoint=last)
    lora_dir = str(Path(args.output_dir) / "lora")
    trainer.save_model(lora_dir if peft_config is not None else args.output_dir)
    if trainer.is_world_process_zero():  # one writer under several processes
        if peft_config is not None:
            _save_merged(lora_dir, student_path, args.output_dir)
        if args.vocab_size is not None:
            _trim_saved_drafter(args, teacher, tokenizer, dataset["prompt"])
        tokenizer.save_pretrained(args.output_dir)
        print(f"saved the distilled drafter ({args.divergence}) to {args.output_dir}")
    end_distributed_training()


if __name__ == "__main__":
    main()
