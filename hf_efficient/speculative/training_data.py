"""What the drafter recipes share: the (target, drafter) pair and training prompts from the reference corpus."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["load_target_and_drafter", "schedule_arguments", "training_prompts"]


def load_target_and_drafter(
    target: str | None = None, drafter: str | None = None
) -> tuple[PreTrainedModel, PreTrainedModel, PreTrainedTokenizerBase]:
    """`(target, drafter, tokenizer)` from model folders, each defaulting to the reference model of that role."""
    from hf_efficient.reference import reference_model

    if target:
        target_model, tokenizer = AutoModelForCausalLM.from_pretrained(target), AutoTokenizer.from_pretrained(target)
    else:
        target_model, tokenizer = reference_model("target")
    drafter_model = AutoModelForCausalLM.from_pretrained(drafter) if drafter else reference_model("drafter")[0]
    return target_model, drafter_model, tokenizer


def training_prompts(tokenizer: PreTrainedTokenizerBase, n: int, prompt_tokens: int) -> list[str]:
    """The first `prompt_tokens` tokens of the first `n` long-enough training documents, code and prose alternating."""
    from hf_efficient.reference import reference_corpus

    code, prose = reference_corpus("train", "code"), reference_corpus("train", "prose")
    prompts = []
    for document in (doc for pair in zip(code, prose) for doc in pair):
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) >= prompt_tokens:
            prompts.append(tokenizer.decode(ids[:prompt_tokens]))
        if len(prompts) == n:
            break
    return prompts


def schedule_arguments(args) -> dict:
    """`TrainingArguments` fields both recipes take from their command line (cosine schedule, resumable)."""
    return dict(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(args.max_steps // 10, 1),
        save_steps=max(args.max_steps // 2, 1),
        save_total_limit=1,
        report_to=[],
        seed=args.seed,
    )
