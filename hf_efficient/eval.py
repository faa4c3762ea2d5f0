"""Evaluation helpers: perplexity and bits per byte of any causal LM, and the gzip baseline.

Bits per byte (total negative log-likelihood in bits over the UTF-8 byte count of the texts) compares models
with different tokenizers directly: a byte-level model and a 4k-vocabulary BPE model score the same bytes.
Every text is scored from its first token (given `<s>` when the tokenizer has one) to its last; texts longer
than the window are scored in sliding windows where every token is scored exactly once, with at least
`window - stride` tokens of left context.

```python
from hf_efficient.eval import bits_per_byte, gzip_bits_per_byte
from hf_efficient.reference import reference_corpus, reference_model

model, tokenizer = reference_model("target")
texts = reference_corpus("validation", "code")
print(bits_per_byte(model, tokenizer, texts), gzip_bits_per_byte(texts))
```
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

__all__ = [
    "NLLResult",
    "bits_per_byte",
    "continuation_bits_per_byte",
    "gzip_bits_per_byte",
    "negative_log_likelihood",
    "perplexity",
]

DEFAULT_MAX_WINDOW = 512  # small models are often trained on short sequences (the reference ones on 512)


@dataclasses.dataclass
class NLLResult:
    """Total negative log-likelihood of a set of texts.

    Args:
        nats (`float`): summed NLL of every scored token, in nats.
        tokens (`int`): number of scored tokens.
        bytes (`int`): UTF-8 bytes those tokens cover.
    """

    nats: float
    tokens: int
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats / self.tokens)


def _windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) of the windows over a sequence of `n_tokens` token positions.

    The window covers positions [begin, end); it scores targets first_target..end-1 (each predicted from the
    position before it), which no earlier window scored. Target 0 is never scored (it is the start token).
    """
    spans, scored_up_to, end = [], 1, min(window, n_tokens)
    while True:
        spans.append((max(0, end - window), end, scored_up_to))
        if end == n_tokens:
            return spans
        scored_up_to, end = end, min(end + stride, n_tokens)


def _score_pieces(
    model: nn.Module, pieces: list[tuple[list[int], int]], batch_size: int, progress: bool
) -> tuple[float, int]:
    """Summed NLL (nats) and count of the scored targets of `pieces`: (token ids, index of the first scored target);
    every later target of a piece is scored, each predicted from the position before it."""
    pieces = sorted(pieces, key=lambda piece: len(piece[0]))  # similar lengths per batch: little padding
    device = next(model.parameters()).device
    batches = range(0, len(pieces), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch")
    nats, tokens = 0.0, 0
    with torch.inference_mode():
        for i in batches:
            batch = pieces[i : i + batch_size]
            length = max(len(ids) for ids, _ in batch)
            input_ids = torch.zeros(len(batch), length, dtype=torch.long)  # (B, L), right-padded
            score = torch.zeros(len(batch), length, dtype=torch.bool)  # (B, L): targets to score
            for row, (ids, first) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                score[row, first : len(ids)] = True
            attention_mask = (torch.arange(length) < torch.tensor([len(ids) for ids, _ in batch])[:, None]).long()
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L-1, V): predicts targets 1..L-1
            target_lp = log_probs.gather(-1, input_ids[:, 1:, None].to(device))[..., 0]  # (B, L-1)
            mask = score[:, 1:].to(device)  # (B, L-1)
            nats -= target_lp[mask].sum().item()
            tokens += int(mask.sum())
    return nats, tokens


def negative_log_likelihood(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> NLLResult:
    """Total NLL of `texts` under a causal LM, each text scored independently in sliding windows.

    Args:
        model (`nn.Module`): any causal LM whose forward takes `input_ids` and `attention_mask` and returns
            `.logits` of shape `(B, L, V)`.
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer (subword or byte-level).
        texts (`Sequence[str]`): the documents to score.
        window (`int`, *optional*): tokens per forward; defaults to the model's `max_position_embeddings`,
            capped at 512 (positions beyond a model's training length would be scored unfairly).
        stride (`int`, *optional*): tokens newly scored per window after the first (below `window`, so that
            every scored token keeps `window - stride` tokens of context); defaults to `window // 2`.
        batch_size (`int`, *optional*, defaults to 8): windows per forward.
        progress (`bool`, *optional*, defaults to `False`): show a tqdm bar over batches.

    Returns:
        `NLLResult`: summed nats, scored tokens and covered UTF-8 bytes.
    """
    window = window or min(
        getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_WINDOW, DEFAULT_MAX_WINDOW
    )
    stride = stride or max(1, window // 2)
    if not 0 < stride < window:  # each window must hold the token before the first one it scores
        raise ValueError(f"need 0 < stride < window; got window={window}, stride={stride}")
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pieces, total_bytes = [], 0  # pieces: (token ids of one window, index of its first scored target)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_bytes = len(text.encode("utf-8"))
        if start_id is not None:
            ids = [start_id, *ids]
        elif ids:  # no start token: the first token cannot be predicted, so its bytes are not counted
            n_bytes -= len(tokenizer.decode(ids[:1]).encode("utf-8"))
        if len(ids) < 2:
            continue
        total_bytes += n_bytes
        pieces += [(ids[b:e], t - b) for b, e, t in _windows(len(ids), window, stride)]
    nats, tokens = _score_pieces(model, pieces, batch_size, progress)
    return NLLResult(nats=nats, tokens=tokens, bytes=total_bytes)


def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Token-level perplexity, `exp(total NLL / scored tokens)`, of `texts` (see `negative_log_likelihood`).

    Perplexities only compare models of one tokenizer; use `bits_per_byte` across tokenizers.
    """
    result = negative_log_likelihood(
        model, tokenizer, texts, window=window, stride=stride, batch_size=batch_size, progress=progress
    )
    return result.perplexity


def bits_per_byte(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Total NLL of `texts` in bits over their UTF-8 byte count (see `negative_log_likelihood` for arguments).

    Comparable across tokenizers and with `gzip_bits_per_byte` on the same texts.
    """
    result = negative_log_likelihood(
        model, tokenizer, texts, window=window, stride=stride, batch_size=batch_size, progress=progress
    )
    return result.bits_per_byte


def continuation_bits_per_byte(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Bits per byte of each continuation given its context: NLL of the continuation's tokens in bits over its
    UTF-8 bytes, for `(context, continuation)` pairs.

    Context and continuation are tokenized separately (the continuation's tokens do not depend on the context),
    so the same continuation can be scored after different contexts, e.g. a clean and a corrupted one. Each pair
    is scored in one forward, from the start token: keep it within the model's trained length.

    Example:

    ```python
    >>> clean = continuation_bits_per_byte(model, tokenizer, [("The cat sat on", " the mat.")])
    >>> noisy = continuation_bits_per_byte(model, tokenizer, [("Teh cat sta on", " the mat.")])
    ```
    """
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start_id is None:
        raise ValueError("continuation_bits_per_byte needs a tokenizer with a BOS or EOS token to start from")
    pieces, total_bytes = [], 0
    for context, continuation in pairs:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        pieces.append(([start_id, *context_ids, *continuation_ids], 1 + len(context_ids)))
        total_bytes += len(continuation.encode("utf-8"))
    nats, _ = _score_pieces(model, pieces, batch_size, progress)
    return nats / math.log(2) / max(1, total_bytes)


def _deflated_size(data: bytes, level: int) -> int:
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw DEFLATE: gzip without header and checksum
    return len(compressor.compress(data) + compressor.flush())


def gzip_bits_per_byte(texts: Sequence[str], level: int = 9, per_document: bool = True) -> float:
    """Bits per UTF-8 byte of gzip (DEFLATE at `level`; 9 is `gzip -9`) on `texts`.

    Args:
        texts (`Sequence[str]`): the documents.
        level (`int`, *optional*, defaults to 9): zlib compression level.
        per_document (`bool`, *optional*, defaults to `True`): compress every text on its own, as a model
            scores every text on its own (the fair comparison with `bits_per_byte`). With `False` the texts are
            joined by newlines and compressed as one stream, so gzip also exploits repetitions *across* texts
            within its 32 KiB window: a stricter baseline. Either way the gzip header and trailer (18 bytes
            of container, not compression) are not counted.

    Returns:
        `float`: compressed bits over uncompressed UTF-8 bytes.
    """
    data = [text.encode("utf-8") for text in texts if text]
    if not data:
        raise ValueError("texts are empty; gzip bits per byte is undefined")
    if per_document:
        return 8 * sum(_deflated_size(d, level) for d in data) / sum(map(len, data))
    joined = b"\n".join(data)
    return 8 * _deflated_size(joined, level) / len(joined)
