"""Exact next-byte probabilities of a token-level language model, byte-level generation and ensembles.

Paper: Exact Byte-Level Probabilities from Tokenized Language Models for FIM-Tasks and Model Ensembles
(Phan, Amos, Gat, Havasi, Muckley, Ullrich, arXiv:2410.09303), §3 (Byte-Token Representation Lemma).

A byte prefix `x` has probability `P(x) = sum_t P(t)` over its *cover encodings*: canonical token sequences
`t` whose last token starts inside `x` (`bytes(t[:-1])` is a strict prefix of `x`) and whose bytes start with
`x`. Every cover of `x . b` is a cover of `x` whose bytes continue with `b`, so one pass over the covers of
`x` gives all 256 next-byte masses. Texts are read in *token space*, `text_prefix + text` (Llama-2 and Mistral put a
`▁` before every text, Gemma-3 and byte-level BPE nothing).

Which candidates are canonical depends on the tokenizer family, each with its own cover finder:
- byte-level BPE (GPT-2, Llama-3, Qwen, SmolLM2), `_ByteLevelBPECovers`: candidates are a split `j` within one
  token length of the end and a token `v` whose bytes start with `x[j:]`; the candidate is a canonical cover exactly
  when the tokenizer's own encoding of `x[:j] + bytes(v)` (from a pre-token boundary that the end cannot move) ends
  with `v`, and that encoding is the cover (all candidates are encoded in one `encode_batch` call);
- SentencePiece BPE with byte fallback (Gemma, Llama-2, Mistral), `SentencePieceCovers`: no pre-tokenization, so the
  cover is `encode(x[:j]) + [v]` and canonicality is a property of the junction pair (see `sentencepiece_covers`).

Covers share all but their last few tokens, so they are scored through one KV cache that is cropped back to the
shared prefix between evaluations (and between successive bytes).
"""

from __future__ import annotations

import abc
import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from tokenizers import Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..compat import DynamicCache, cache_kwarg
from .sentencepiece_covers import SentencePieceCovers
from .vocabulary import BytePrefixIndex, is_sentencepiece_bpe, plain_backend, text_prefix, token_bytes

__all__ = ["ByteLevelEnsemble", "ByteLevelSampler"]


class _PrefixScorer:
    """`log P(ids[1:] | ids[0])` and the next-token log-probabilities after `ids`, one KV cache for all calls.

    Consecutive queries usually share a long prefix; the cache is cropped (`crop(-n)`) to the shared part
    and only the differing tokens are run. The last `memo_size` answers are kept, since the covers of successive
    bytes revisit the same prefixes. `tokens_run` counts the tokens actually fed to the model.
    """

    def __init__(self, model: PreTrainedModel, memo_size: int = 32) -> None:
        self.model = model
        self.ids: list[int] = []
        self.cumulative: list[float] = []  # cumulative[i] = log P(ids[1 : i + 1] | ids[0])
        self.cache = DynamicCache()  # full layers, also for sliding-window attention (the mask applies the window):
        # a sliding layer drops old states, so it could not be cropped back past them
        self.last: torch.Tensor | None = None  # (V,) next-token log-probs after self.ids
        self.memo: OrderedDict[tuple[int, ...], tuple[float, torch.Tensor]] = OrderedDict()
        self.memo_size = memo_size
        self.tokens_run = 0

    @torch.no_grad()
    def __call__(self, ids: list[int]) -> tuple[float, torch.Tensor]:
        key = tuple(ids)
        if key in self.memo:
            self.memo.move_to_end(key)
            return self.memo[key]
        shared = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            shared += 1
        if shared == len(self.ids) and self.last is not None:  # pure extension: the cache holds exactly self.ids
            keep, cumulative = shared, [*self.cumulative, self.cumulative[-1] + float(self.last[ids[shared]])]
        else:  # re-run the last shared token: its logits score the first new token
            keep = max(shared - 1, 0)
            cumulative = self.cumulative[: keep + 1] or [0.0]
        if self.cache.get_seq_length() > keep:
            self.cache.crop(keep - self.cache.get_seq_length())
        new = torch.tensor([ids[keep:]], device=self.model.device)  # (1, m)
        logits = self.model(input_ids=new, use_cache=True, **cache_kwarg(self.cache)).logits[0]  # (m, V)
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (m, V)
        self.tokens_run += new.shape[1]
        steps = logp[:-1].gather(1, new[0, 1:, None]).squeeze(1).tolist()  # log P(ids[i] | ids[:i]), i > keep
        for step in steps:
            cumulative.append(cumulative[-1] + step)
        self.ids, self.cumulative, self.last = list(ids), cumulative, logp[-1].clone()
        result = self.memo[key] = (self.cumulative[-1], self.last)
        if len(self.memo) > self.memo_size:
            self.memo.popitem(last=False)
        return result


class _ByteGeneration(abc.ABC):
    """Byte-level greedy / sampled generation on top of `next_byte_distribution`."""

    @abc.abstractmethod
    def next_byte_distribution(self, text: str | bytes) -> torch.Tensor:
        """The exact next-byte distribution `(256,)` after `text`."""

    @abc.abstractmethod
    def byte_logprobs(self, text: str | bytes) -> torch.Tensor:
        """`log P(x_i | x_<i)` for every byte of `text`, `(n,)` float64 (natural log)."""

    def bits_per_byte(self, text: str | bytes) -> float:
        """The byte-level cross-entropy of `text` in bits per byte (`-mean(byte_logprobs) / ln 2`)."""
        return -float(self.byte_logprobs(text).mean()) / math.log(2)

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

        When `prompt` ends inside a character, the returned text starts with that whole character (`b"Caf\\xc3"`
        -> `"é ..."`), so that it decodes.

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
        cut = next((k for k in range(1, min(3, len(data)) + 1) if _incomplete_utf8(data[-k:])), 0)
        return (data[len(data) - cut :] + new).decode("utf-8", errors="replace")  # from the cut character on

    def complete(self, prompt: str | bytes, max_new_bytes: int = 32, **kwargs) -> str:
        """The rest of the word `prompt` ends in (up to the next whitespace), e.g. `"def pri"` -> `"nt"`.

        Unlike tokenizing a prompt that ends mid-token, the byte-level distribution carries no tokenization
        bias: every token that could continue the partial word contributes.
        """
        return self.generate(prompt, max_new_bytes=max_new_bytes, stop_bytes=b" \t\r\n", **kwargs)


class _ByteLevelBPECovers:
    """Cover encodings for byte-level BPE (GPT-2 / Llama-3 / Qwen / SmolLM2): each candidate is encoded whole.

    Args:
        table (`list[bytes | None]`): the bytes of every id (`token_bytes`).
        backend (`tokenizers.Tokenizer`): the tokenizer, no prefix space: `plain_backend(t, prefix_space=False)`.
    """

    def __init__(self, table: list[bytes | None], backend: Tokenizer) -> None:
        self.table, self.backend = table, backend
        self.index = BytePrefixIndex(table)
        self._pre_tokenizer = backend.pre_tokenizer
        self._byte_id = {b[0]: i for i, b in enumerate(table) if b is not None and len(b) == 1}

    def encode(self, data: bytes) -> list[int] | None:
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
        encodings = self.backend.encode_batch([t for t in texts if t is not None], add_special_tokens=False)
        it = iter(encodings)
        for text, tail in zip(texts, tails):
            out.append(None if text is None else next(it).ids + [self._byte_id[b] for b in tail])
        return out

    def _anchor(self, data: bytes) -> int:
        """A pre-token boundary far enough from the end that tokens before it do not depend on what follows."""
        limit = len(data) - self.index.max_len - 1
        if limit <= 0:
            return 0
        text = data[:limit].decode("utf-8", errors="ignore")
        starts = [len(text[:s].encode()) for _, (s, _) in self._pre_tokenizer.pre_tokenize_str(text)]
        return starts[-2] if len(starts) >= 2 else 0  # one pre-token of margin before the last complete one

    def covers(self, data: bytes, extend: bool) -> list[tuple[list[int], torch.Tensor, int]]:
        """The canonical covers of `data` grouped by prefix: `(prefix ids, last-token ids (C,), start j of the last)`.

        With `extend` the last token starts at `j <= len(data)` and runs past `data`, else it starts inside `data` and
        reaches its end. A candidate `v` at split `j` is kept when the canonical encoding of `data[:j] + bytes(v)` ends
        with `v`; its prefix is whatever that encoding puts before `v`.
        """
        n, anchor = len(data), self._anchor(data)
        fixed = self.encode(data[:anchor]) or []
        candidates = [
            (j, v)
            for j in range(max(anchor, n - self.index.max_len), n + int(extend))
            for v in self.index.starting_with(data[j:], min_len=n - j + int(extend)).tolist()
        ]
        encodings = self._encode_many([data[anchor:j] + self.table[v] for j, v in candidates])
        groups: dict[tuple[int, ...], tuple[list[int], int]] = {}
        for (j, v), ids in zip(candidates, encodings):
            if ids is not None and ids[-1] == v:
                groups.setdefault(tuple(ids[:-1]), ([], j))[0].append(v)
        return [(fixed + list(head), torch.tensor(last), j) for head, (last, j) in groups.items()]


class ByteLevelSampler(_ByteGeneration):
    """The exact next-byte distribution of a token LM with a byte-level BPE or SentencePiece byte-fallback tokenizer.

    Paper: Exact Byte-Level Probabilities from Tokenized Language Models (arXiv:2410.09303).

    Args:
        model (`PreTrainedModel`): a causal LM (eval mode; its KV cache is reused across cover evaluations).
        tokenizer (`PreTrainedTokenizerBase`): its tokenizer, a byte-level BPE (SmolLM2, GPT-2, Llama-3, Qwen) or a
            SentencePiece BPE with byte fallback (Gemma, Llama-2, Mistral); the text is preceded by `bos_token` (or
            `eos_token` when there is no BOS, as GPT-2 style models are trained).

    Example:

    ```python
    sampler = ByteLevelSampler(model, tokenizer)
    probs = sampler.next_byte_distribution("def pri")  # (256,), sums to 1
    sampler.complete("def pri")  # "nt(...)" style word completion from a prompt cut mid-token
    sampler.bits_per_byte("some text")  # exact byte-level cross-entropy, from prefix probabilities
    both = ByteLevelSampler.ensemble([(model_a, tokenizer_a), (model_b, tokenizer_b)])
    ```
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ValueError("the tokenizer has neither bos_token nor eos_token: set one to start the context")
        self.model, self.tokenizer, self.start = model.eval(), tokenizer, int(start)
        self.token_bytes = token_bytes(tokenizer)
        self.prefix = text_prefix(tokenizer, self.token_bytes)
        backend = plain_backend(tokenizer, prefix_space=False)
        _check_spelling(tokenizer, backend, self.token_bytes, self.prefix)
        covers = SentencePieceCovers if is_sentencepiece_bpe(tokenizer) else _ByteLevelBPECovers
        self.finder = covers(self.token_bytes, backend)
        self.max_token_bytes = self.finder.index.max_len
        self._first_byte = torch.tensor([b[0] if b else 0 for b in self.token_bytes])  # (V,)
        self.scorer = _PrefixScorer(self.model)

    @staticmethod
    def ensemble(
        members: Sequence[tuple[PreTrainedModel, PreTrainedTokenizerBase]], weights: Sequence[float] | None = None
    ) -> ByteLevelEnsemble:
        """A byte-level mixture of models whose tokenizers differ (see `ByteLevelEnsemble`)."""
        return ByteLevelEnsemble([ByteLevelSampler(m, t) for m, t in members], weights)

    def decode_ids(self, ids: Sequence[int]) -> bytes:
        """The text bytes of token `ids`, without the tokenizer's prefix space (special tokens raise `TypeError`)."""
        data = b"".join(self.token_bytes[i] for i in ids)
        return data[len(self.prefix) :] if data.startswith(self.prefix) else data

    def encode_bytes(self, data: bytes) -> list[int] | None:
        """Canonical ids of `data`, which may end inside a UTF-8 character (then in byte tokens).

        Returns `None` when no canonical token sequence spells `data` (it is not a prefix of any UTF-8 text, or, with
        byte fallback, it cuts a character that never falls back to bytes).
        """
        return self.finder.encode(self.prefix + bytes(data))

    def covers(self, data: bytes) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """The cover encodings of `data`, grouped by prefix: `(prefix ids, last-token ids (C,), next bytes (C,))`.

        Each cover is `prefix + [v]`, canonical, and its next byte is the byte of `v` right after `data`.
        """
        x = self.prefix + bytes(data)
        return [(prefix, last, self._byte_at(last, len(x) - j)) for prefix, last, j in self.finder.covers(x, True)]

    def _byte_at(self, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        """`(C,)` the byte at `offset` of each token's bytes."""
        if offset == 0:
            return self._first_byte[tokens]
        return torch.tensor([self.token_bytes[v][offset] for v in tokens.tolist()], dtype=torch.long)

    def _scores(self, prefix: list[int], last: torch.Tensor) -> torch.Tensor:
        """`(C,)` float64 `log P(prefix + [v])` for every `v` in `last`."""
        prefix_logp, logp = self.scorer([self.start, *prefix])  # float, (V,)
        return prefix_logp + logp[last.to(logp.device)].cpu().double()

    def next_byte_distribution(self, text: str | bytes) -> torch.Tensor:
        """`P(next byte | text)` as a `(256,)` float tensor summing to 1 (zero for impossible bytes)."""
        data = text.encode() if isinstance(text, str) else bytes(text)
        scores, next_bytes = [], []
        for prefix, last, nxt in self.covers(data):
            scores.append(self._scores(prefix, last))  # (C,) log P(cover)
            next_bytes.append(nxt)
        if not scores:
            raise ValueError(f"no canonical token sequence covers {data[-16:]!r}; it is not a UTF-8 prefix")
        scores, next_bytes = torch.cat(scores), torch.cat(next_bytes)  # (C_total,)
        masses = torch.zeros(256, dtype=torch.float64).index_add_(0, next_bytes, torch.exp(scores - scores.max()))
        return (masses / masses.sum()).float()  # (256,) proportional to P(data . b)

    def prefix_logprob(self, text: str | bytes) -> float:
        """`log P(text)`: the log-probability that the model's text starts with `text` (sum over its covers)."""
        x = self.prefix + (text.encode() if isinstance(text, str) else bytes(text))
        if not x:
            return 0.0
        scores = [self._scores(prefix, last) for prefix, last, _ in self.finder.covers(x, False)]
        return float(torch.logsumexp(torch.cat(scores), 0)) if scores else -math.inf

    def byte_logprobs(self, text: str | bytes) -> torch.Tensor:
        """`log P(x_i | x_<i) = log P(x_<=i) - log P(x_<i)` for every byte (`(n,)` float64), from prefix probabilities.

        Each needs only the covers that reach the observed byte, not the next-byte masses of all 256 bytes, so this is
        the cheap way to score a text (bits per byte, ensembles). The conditionals sum over bytes to one minus the
        mass the model puts on stopping or on non-canonical continuations, which `next_byte_distribution` renormalises.
        """
        data = text.encode() if isinstance(text, str) else bytes(text)
        logps = [self.prefix_logprob(data[:i]) for i in range(len(data) + 1)]
        if math.isinf(logps[-1]):
            raise ValueError(f"no canonical token sequence covers {data[-16:]!r}; it is not a UTF-8 prefix")
        return torch.tensor(logps[1:], dtype=torch.float64) - torch.tensor(logps[:-1], dtype=torch.float64)


def _check_spelling(
    tokenizer: PreTrainedTokenizerBase, backend: Tokenizer, table: list[bytes | None], prefix: bytes
) -> None:
    """Exact byte views need encodings that spell the text byte for byte (no NFKC, lowercasing, stripping).

    Texts are decoded-text bytes: a leading space is text like any other and the token space puts the prefix `▁`
    before it, as SentencePiece's dummy prefix does (a Metaspace pre-tokenizer would fold it into the prefix instead,
    but the token sequences are the same), so only the backend without prefix is probed with one.
    """
    added = sorted(t.content for t in tokenizer.added_tokens_decoder.values() if not t.special)
    probes = ["a b", "two  spaces ", "x\ny\tZ", "é日ü", f"a{added[0]}b" if added else "ab"]
    for text in [*probes, "  lead"]:
        checks = [(backend.encode(text, add_special_tokens=False).ids, text.encode())]
        if text in probes:
            checks.append((tokenizer(text, add_special_tokens=False)["input_ids"], prefix + text.encode()))
        for ids, expected in checks:
            spelt = b"".join(table[i] or b"<special>" for i in ids)
            if spelt != expected:
                raise ValueError(
                    f"{type(tokenizer).__name__} encodes {text!r} as tokens spelling {spelt!r}, not {expected!r}: its "
                    "normalizer or pre-tokenizer rewrites the text, so byte-level probabilities are not defined"
                )


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

    def byte_logprobs(self, text: str | bytes) -> torch.Tensor:
        """`log sum_m w_m P_m(x_i | x_<i)` for every byte (`(n,)` float64): the per-byte mixture."""
        logps = torch.stack([s.byte_logprobs(text) for s in self.samplers])  # (M, n)
        return torch.logsumexp(logps + self.weights.double().log()[:, None], dim=0)
