"""Exact next-byte probabilities of a token-level language model, byte-level generation and ensembles.

Paper: Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles
(Phan, Amos, Gat, Havasi, Muckley, Ullrich, arXiv:2410.09303), §3 (Byte-Token Representation Lemma).

A byte prefix `x` has probability `P(x) = sum_t P(t)` over its *cover encodings*: canonical token sequences
`t` whose last token starts inside `x` (`bytes(t[:-1])` is a strict prefix of `x`) and whose bytes start with
`x`. Every cover of `x . b` is a cover of `x` whose bytes continue with `b`, so one pass over the covers of
`x` gives all 256 next-byte masses. Candidates are a split `j` within one token length of the end and a
token `v` whose bytes start with `x[j:]`; the candidate is a canonical cover exactly when the tokenizer's own
encoding of `x[:j] + bytes(v)` ends with `v`, and that encoding is the cover (all candidates are encoded in
one `encode_batch` call). Covers share all but their last few tokens, so they are scored through one KV cache
that is cropped back to the shared prefix between evaluations (and between successive bytes).
"""

from __future__ import annotations

import abc
import bisect
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..compat import DynamicCache, cache_kwarg
from .vocabulary import plain_backend, token_bytes

__all__ = ["ByteLevelEnsemble", "ByteLevelSampler"]


class _PrefixScorer:
    """`log P(ids[1:] | ids[0])` and the next-token log-probabilities after `ids`, one KV cache for all calls.

    Consecutive queries usually share a long prefix; the cache is cropped (`crop(-n)`) to the shared part
    and only the differing tokens are run. `tokens_run` counts the tokens actually fed to the model.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.ids: list[int] = []
        self.cumulative: list[float] = []  # cumulative[i] = log P(ids[1 : i + 1] | ids[0])
        self.cache = DynamicCache(config=model.config)
        self.last: torch.Tensor | None = None  # (V,) next-token log-probs after self.ids
        self.tokens_run = 0

    @torch.no_grad()
    def __call__(self, ids: list[int]) -> tuple[float, torch.Tensor]:
        shared = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            shared += 1
        if shared == len(ids) == len(self.ids):
            return self.cumulative[-1], self.last
        if shared == len(self.ids) and self.last is not None:  # pure extension: the cache holds exactly self.ids
            keep, cumulative = shared, [*self.cumulative, self.cumulative[-1] + float(self.last[ids[shared]])]
        else:  # re-run the last shared token: its logits score the first new token
            keep = max(shared - 1, 0)
            cumulative = self.cumulative[: keep + 1] or [0.0]
        self.cache.crop(keep - self.cache.get_seq_length())
        new = torch.tensor([ids[keep:]], device=self.model.device)  # (1, m)
        logits = self.model(input_ids=new, use_cache=True, **cache_kwarg(self.cache)).logits[0]  # (m, V)
        logp = torch.log_softmax(logits.float(), dim=-1)  # (m, V)
        self.tokens_run += new.shape[1]
        steps = logp[:-1].gather(1, new[0, 1:, None]).squeeze(1).tolist()  # log P(ids[i] | ids[:i]), i > keep
        for step in steps:
            cumulative.append(cumulative[-1] + step)
        self.ids, self.cumulative, self.last = list(ids), cumulative, logp[-1]
        return self.cumulative[-1], self.last


class _ByteGeneration(abc.ABC):
    """Byte-level greedy / sampled generation on top of `next_byte_distribution`."""

    @abc.abstractmethod
    def next_byte_distribution(self, text: str | bytes) -> torch.Tensor:
        """The exact next-byte distribution `(256,)` after `text`."""

    def generate(
        self,
        prompt: str | bytes,
        max_new_bytes: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        stop_bytes: bytes = b"",
        generator: torch.Generator | None = None,
    ) -> str:
        """Continue `prompt` byte by byte; returns the new text (stopping before any of `stop_bytes`).

        Args:
            prompt (`str | bytes`): the prefix; it may end anywhere, even inside a token or a character.
            max_new_bytes (`int`, *optional*, defaults to 32): number of bytes to add at most.
            do_sample (`bool`, *optional*, defaults to `False`): sample instead of taking the likeliest byte.
            temperature (`float`, *optional*, defaults to 1.0): sampling temperature on byte probabilities.
            stop_bytes (`bytes`, *optional*, defaults to `b""`): bytes that end generation (not included).
            generator (`torch.Generator`, *optional*): random source for sampling.
        """
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0; use do_sample=False for greedy decoding")
        data = prompt.encode() if isinstance(prompt, str) else bytes(prompt)
        new = bytearray()
        for _ in range(max_new_bytes):
            probs = self.next_byte_distribution(data + new)  # (256,)
            if do_sample:
                probs = probs.pow(1.0 / temperature)
                byte = int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
            else:
                byte = int(probs.argmax())
            if byte in stop_bytes:
                break
            new.append(byte)
        return new.decode("utf-8", errors="replace")

    def complete(self, prompt: str | bytes, max_new_bytes: int = 32, **kwargs) -> str:
        """The rest of the word `prompt` ends in (up to the next whitespace), e.g. `"def pri"` -> `"nt"`.

        Unlike tokenizing a prompt that ends mid-token, the byte-level distribution carries no tokenization
        bias: every token that could continue the partial word contributes.
        """
        return self.generate(prompt, max_new_bytes=max_new_bytes, stop_bytes=b" \t\r\n", **kwargs)


class ByteLevelSampler(_ByteGeneration):
    """The exact next-byte distribution of a token LM with a byte-level BPE tokenizer.

    Paper: Exact Byte-Level Probabilities from Tokenized Language Models (arXiv:2410.09303).

    Args:
        model (`PreTrainedModel`): a causal LM (eval mode; its KV cache is reused across cover evaluations).
        tokenizer (`PreTrainedTokenizerBase`): its byte-level BPE tokenizer; the text is preceded by
            `bos_token` (or `eos_token` when there is no BOS, as GPT-2 style models are trained).

    Example:

    ```python
    sampler = ByteLevelSampler(model, tokenizer)
    probs = sampler.next_byte_distribution("def pri")  # (256,), sums to 1
    sampler.complete("def pri")  # "nt(...)" style word completion from a prompt cut mid-token
    both = ByteLevelSampler.ensemble([(model_a, tokenizer_a), (model_b, tokenizer_b)])
    ```
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("the tokenizer has neither bos_token nor eos_token: set one to start the context")
        self.model, self.tokenizer, self.start = model.eval(), tokenizer, int(start)
        self.token_bytes = token_bytes(tokenizer)
        self._backend = plain_backend(tokenizer)
        self._pre_tokenizer = self._backend.pre_tokenizer
        self._byte_id = {b[0]: i for i, b in enumerate(self.token_bytes) if b is not None and len(b) == 1}
        self._sorted = sorted((b, i) for i, b in enumerate(self.token_bytes) if b)
        self._keys = [b for b, _ in self._sorted]
        self.max_token_bytes = max(len(b) for b in self._keys)
        self.scorer = _PrefixScorer(self.model)

    @staticmethod
    def ensemble(
        members: Sequence[tuple[PreTrainedModel, PreTrainedTokenizerBase]], weights: Sequence[float] | None = None
    ) -> ByteLevelEnsemble:
        """A byte-level mixture of models whose tokenizers differ (see `ByteLevelEnsemble`)."""
        return ByteLevelEnsemble([ByteLevelSampler(m, t) for m, t in members], weights)

    def decode_ids(self, ids: Sequence[int]) -> bytes:
        """The bytes of token `ids` (special tokens have none and raise `TypeError`)."""
        return b"".join(self.token_bytes[i] for i in ids)

    def encode_bytes(self, data: bytes) -> list[int] | None:
        """Canonical ids of `data`, which may end inside a UTF-8 character (those bytes stay byte tokens).

        Returns `None` when `data` is not a prefix of any UTF-8 text (no model-generated text is).
        """
        return self._encode_many([data])[0]

    def _encode_many(self, items: list[bytes]) -> list[list[int] | None]:
        texts, tails, out = [], [], []
        for data in items:
            for cut in range(min(4, len(data) + 1)):  # an incomplete trailing character has at most 3 bytes
                head, tail = data[: len(data) - cut], data[len(data) - cut :]
                try:
                    text = head.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if not cut or _incomplete_utf8(tail):
                    texts.append(text)
                    tails.append(tail)
                    break
            else:
                texts.append(None)
                tails.append(b"")
        encodings = self._backend.encode_batch([t for t in texts if t is not None], add_special_tokens=False)
        it = iter(encodings)
        for text, tail in zip(texts, tails):
            out.append(None if text is None else next(it).ids + [self._byte_id[b] for b in tail])
        return out

    def _starting_with(self, prefix: bytes, longer_than: int) -> list[int]:
        """Ids of tokens whose bytes start with `prefix` and are longer than `longer_than` bytes."""
        lo = bisect.bisect_left(self._keys, prefix)
        hi = bisect.bisect_left(self._keys, prefix + b"\xff" * (self.max_token_bytes + 1))
        return [i for b, i in self._sorted[lo:hi] if len(b) > longer_than]

    def _anchor(self, data: bytes) -> int:
        """A pre-token boundary far enough from the end that tokens before it do not depend on what follows."""
        limit = len(data) - self.max_token_bytes - 1
        if limit <= 0:
            return 0
        text = data[:limit].decode("utf-8", errors="ignore")
        starts = [len(text[:s].encode()) for _, (s, _) in self._pre_tokenizer.pre_tokenize_str(text)]
        return starts[-2] if len(starts) >= 2 else 0  # one pre-token of margin before the last complete one

    def covers(self, data: bytes) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """The cover encodings of `data`, grouped by prefix: `(prefix ids, last-token ids (C,), next bytes (C,))`.

        Each cover is `prefix + [v]`; its next byte is the byte of `v` right after `data`. A candidate `v` at
        split `j` is kept when the canonical encoding of `data[:j] + bytes(v)` ends with `v`; its prefix is
        whatever that encoding puts before `v` (not always the canonical encoding of `data[:j]`: `"a  x"` is
        `a Ġ Ġx` while `"a  "` alone is `a ĠĠ`).
        """
        n, anchor = len(data), self._anchor(data)
        fixed = self.encode_bytes(data[:anchor]) or []
        candidates = [
            (j, v)
            for j in range(max(anchor, n - self.max_token_bytes), n + 1)
            for v in self._starting_with(data[j:], longer_than=n - j)
        ]
        encodings = self._encode_many([data[anchor:j] + self.token_bytes[v] for j, v in candidates])
        groups: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
        for (j, v), ids in zip(candidates, encodings):
            if ids is not None and ids[-1] == v:
                last, next_bytes = groups.setdefault(tuple(ids[:-1]), ([], []))
                last.append(v)
                next_bytes.append(self.token_bytes[v][n - j])
        return [(fixed + list(head), torch.tensor(last), torch.tensor(nxt)) for head, (last, nxt) in groups.items()]

    def next_byte_distribution(self, text: str | bytes) -> torch.Tensor:
        """`P(next byte | text)` as a `(256,)` float tensor summing to 1 (zero for impossible bytes)."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        scores, next_bytes = [], []
        for prefix, last, nxt in self.covers(data):
            prefix_logp, logp = self.scorer([self.start, *prefix])  # float, (V,)
            scores.append(prefix_logp + logp[last].cpu())  # (C,) log P(cover)
            next_bytes.append(nxt)
        if not scores:
            raise ValueError(f"no canonical token sequence covers {data[-16:]!r}; it is not a UTF-8 prefix")
        scores, next_bytes = torch.cat(scores), torch.cat(next_bytes)  # (C_total,)
        masses = torch.zeros(256, dtype=torch.float64).index_add_(
            0, next_bytes, torch.exp(scores.double() - scores.max())
        )  # (256,) proportional to P(data . b)
        return (masses / masses.sum()).float()


def _incomplete_utf8(tail: bytes) -> bool:
    """Whether `tail` (1-3 bytes) is the start of a multi-byte UTF-8 character that lacks its last bytes."""
    lead = tail[0]
    need = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
    return need > len(tail) and all(0x80 <= b <= 0xBF for b in tail[1:])


class ByteLevelEnsemble(_ByteGeneration):
    """Average the exact byte-level distributions of models that do not share a vocabulary.

    Paper: Exact Byte-Level Probabilities from Tokenized Language Models (arXiv:2410.09303), §5.

    Args:
        samplers (`Sequence[ByteLevelSampler]`): one per model.
        weights (`Sequence[float]`, *optional*): mixture weights (normalised); uniform by default.
    """

    def __init__(self, samplers: Sequence[_ByteGeneration], weights: Sequence[float] | None = None) -> None:
        if not samplers:
            raise ValueError("an ensemble needs at least one sampler")
        weights = [1.0] * len(samplers) if weights is None else list(weights)
        if len(weights) != len(samplers) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights={weights} must be {len(samplers)} non-negative numbers with a positive sum")
        self.samplers = list(samplers)
        self.weights = torch.tensor(weights, dtype=torch.float32) / sum(weights)  # (M,)

    def next_byte_distribution(self, text: str | bytes) -> torch.Tensor:
        probs = torch.stack([s.next_byte_distribution(text) for s in self.samplers])  # (M, 256)
        return self.weights @ probs
