"""The verification engine shared by every drafter: a `generate(custom_generate=...)` decoding loop.

`generate` prepares inputs, the cache, logits processors and stopping criteria, then calls the strategy like
`GenerationMixin._sample`. Each step the drafter proposes a `DraftTree` rooted at the last emitted token; the
target verifies all nodes in one forward (4-D ancestor mask + depth position ids), acceptance keeps the
longest valid path (greedy) or runs recursive rejection sampling (sampling), the accepted path's KV entries
are compacted per layer and the next token comes from the target at the path's end. Rows of a batch accept
different numbers of tokens; each row's output stays contiguous, exactly as plain `generate` writes it.

Subclasses implement `draft()` (and optionally `start()` / `observe()`); see `TokenRecycling`, `DraftModel`.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass

import torch
from transformers import (
    EosTokenCriteria,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    PrefixConstrainedLogitsProcessor,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from ..compat import (
    Cache,
    DynamicCache,
    GenerateDecoderOnlyOutput,
    accepts_cache,
    cache_kwarg,
    either_cache,
    generate_streamer,
    output_cache,
)
from .acceptance import greedy_accept, sample_accept
from .hub_mixin import StrategyHubMixin
from .kv import KVLayout, compact_cache, full_history_cache, tree_attention_mask
from .tree import DraftTree

__all__ = ["DecodingState", "SpeculativeDecoder", "SpeculativeStats"]

_TREE_ATTENTION = ("sdpa", "eager", "hfe_kv")  # implementations that honour an arbitrary 4-D float mask
# logits processors that read neither `input_ids` nor its length: one call covers every tree node
_PREFIX_FREE = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
)
# processors that ban EOS while the sequence is shorter than a threshold (they read `input_ids.shape[-1]` only)
_EOS_UNTIL_LENGTH = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)


@dataclass
class SpeculativeStats:
    """Counters of the last `generate` call.

    Attributes:
        steps (`int`): target forwards, prefill included (plain greedy: one per new token).
        new_tokens (`int`): tokens generated over all rows (padding after EOS excluded).
        row_forwards (`int`): sum over rows of the target forwards made while the row was unfinished.
        draft_tokens (`int`): draft nodes verified (root excluded), summed over steps and rows.
        draft_seconds (`float`): wall time spent in the strategy's `draft` and `observe` (the drafting overhead,
            to compare with the target forwards: `draft_seconds / (steps - 1)` per step).
    """

    steps: int = 0
    new_tokens: int = 0
    row_forwards: int = 0
    draft_tokens: int = 0
    draft_seconds: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """New tokens per target forward per row (1.0 for plain decoding)."""
        return self.new_tokens / self.row_forwards if self.row_forwards else 0.0


@dataclass
class DecodingState:
    """What a drafter sees of the running generation.

    Attributes:
        sequences (`torch.LongTensor` of shape `(B, max_length)`): prompt (left padded) and emitted tokens, padded.
        lengths (`torch.LongTensor` of shape `(B,)`): filled length of every row; the last token is the root.
        unfinished (`torch.BoolTensor` of shape `(B,)`): rows still generating.
        max_drafts (`torch.LongTensor` of shape `(B,)`): most draft tokens a row can still accept.
        generation_config (`GenerationConfig`): the call's configuration (`do_sample`, `eos_token_id`, ...).
        logits_processor (`LogitsProcessorList`): the call's processors (temperature, top-k, penalties, ...).
        cache (`Cache`): the target's KV cache (committed tokens only between steps).
        layout (`KVLayout`): validity and positions of the target cache's columns.
        prompt_logits (`torch.Tensor` of shape `(B, N, V)`, *optional*): target logits at the prompt's cache columns
            `prompt_columns`, when the drafter asked for them (`prompt_logit_positions`).
        prompt_columns (`torch.LongTensor` of shape `(N,)`, *optional*): cache columns of `prompt_logits`, ascending.
    """

    sequences: torch.LongTensor
    lengths: torch.LongTensor
    unfinished: torch.BoolTensor
    max_drafts: torch.LongTensor
    generation_config: GenerationConfig
    logits_processor: LogitsProcessorList
    cache: Cache | None = None
    layout: KVLayout | None = None
    prompt_logits: torch.Tensor | None = None
    prompt_columns: torch.LongTensor | None = None

    @property
    def roots(self) -> torch.LongTensor:
        """`(B,)` last emitted token of every row: the root of the next draft tree."""
        return self.sequences.gather(1, (self.lengths - 1)[:, None]).squeeze(1)


class SpeculativeDecoder(abc.ABC, StrategyHubMixin):
    """Base class of the speculative strategies: the one verification engine.

    An instance is a callable for `model.generate(**inputs, custom_generate=strategy, ...)`. It supports greedy
    and sampling (`do_sample=True` with the usual warpers), batches with left padding, `eos_token_id`,
    `max_new_tokens` / `max_length` (never exceeded), other stopping criteria, `streamer` (batch 1, fed exactly
    what plain `generate` feeds it) and `return_dict_in_generate` with `output_scores` / `output_logits`. A cache
    passed as `cache=` (transformers >= 5.24) or `past_key_values=` is used. `.stats` describes the last call.

    Greedy output equals plain greedy `generate` token for token up to floating-point reassociation: the tree
    forward computes the same logits as step-by-step decoding, exactly in exact arithmetic; in fp32 the
    differences (~1e-6) never flip an argmax in practice, in bf16 a logit can move by one bf16 ulp, which
    flips the argmax only where the two best logits of plain decoding are within that ulp.

    Strategies save, load and push like Hub models (`save_pretrained`, `from_pretrained`, `push_to_hub`, from
    huggingface_hub's `ModelHubMixin`, see `StrategyHubMixin`); `SpeculativeDecoder.from_pretrained(path)` returns
    the class the saved `config.json` names.
    """

    def __init__(self) -> None:
        self.stats = SpeculativeStats()

    # ----- drafter hooks ---------------------------------------------------------------------------------
    def start(self, model: PreTrainedModel, state: DecodingState) -> None:  # optional hook: no-op by default
        """Called once per `generate` call after the prefill (warm starts, drafter prefill)."""

    def prompt_logit_positions(self, prefill_ids: torch.LongTensor) -> torch.LongTensor | None:
        """Positions of the prefill input `(B, N)` whose target logits the drafter wants in `state.prompt_logits`
        (1-D, any order); `None` for none. The prefill's language-model head then runs at those positions only."""
        return None

    @abc.abstractmethod
    def draft(self, model: PreTrainedModel, state: DecodingState) -> DraftTree:
        """Propose a draft tree per row, rooted at `state.roots`."""

    def observe(  # optional hook: no-op by default
        self, state: DecodingState, tree: DraftTree, logits: torch.Tensor, path: torch.LongTensor, num_accepted
    ) -> None:
        """Called after each verification with the raw target `logits` `(B, T, V)` and the accepted `path`."""

    def validate(self, model: PreTrainedModel, generation_config: GenerationConfig) -> None:
        """Refuse unsupported combinations before any work (subclasses add drafter checks)."""
        config = model.config
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"{type(self).__name__} supports decoder-only models; got an encoder-decoder model.")
        if generation_config.num_beams is not None and generation_config.num_beams > 1:
            raise ValueError(
                f"num_beams={generation_config.num_beams} is not supported by speculative decoding; use num_beams=1 "
                "(greedy or do_sample=True), or drop custom_generate to run beam search."
            )
        if generation_config.use_cache is False or not accepts_cache(model):
            raise ValueError(
                f"{type(self).__name__} needs a model with a KV cache (use_cache=True and a forward that takes "
                "a cache); without one, use plain generate."
            )
        attn = getattr(config, "_attn_implementation", None) or "eager"
        if attn not in _TREE_ATTENTION:
            raise ValueError(
                f"attn_implementation={attn!r} cannot express tree attention masks; load the model with "
                f"attn_implementation='sdpa' (or 'eager')."
            )

    # ----- the loop -------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        model: PreTrainedModel,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        generation_config: GenerationConfig | None = None,
        synced_gpus: bool = False,
        streamer=None,
        **model_kwargs,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput:
        generation_config = generation_config or model.generation_config
        processors = logits_processor if logits_processor is not None else LogitsProcessorList()
        criteria = [
            c for c in (stopping_criteria or []) if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))
        ]  # length and EOS are enforced exactly below; the rest are checked token by token
        self.validate(model, generation_config)
        if any(isinstance(p, PrefixConstrainedLogitsProcessor) for p in processors):
            raise ValueError(
                "prefix_allowed_tokens_fn is not supported by speculative decoding (it is called with batch indices "
                "that tree verification does not preserve); use plain generate for constrained decoding."
            )
        if synced_gpus:
            raise ValueError("synced_gpus=True is not supported by speculative decoding.")
        B, L = input_ids.shape
        streamer = streamer if streamer is not None else generate_streamer(self)  # see `compat.generate_streamer`
        if streamer is not None and B > 1:
            raise ValueError(f"streamer supports batch size 1, got {B} rows.")
        cache = either_cache(model_kwargs.get("cache"), model_kwargs.get("past_key_values"))
        if cache is None:
            cache = DynamicCache(config=model.config)
        cache = full_history_cache(cache)  # sliding windows are then expressed in the tree masks
        self._check_cache(cache)
        self.stats = stats = SpeculativeStats()
        eos = torch.tensor(_as_list(generation_config.eos_token_id), dtype=torch.long, device=input_ids.device)
        pad = generation_config.pad_token_id
        pad = pad if pad is not None else (int(eos[0]) if eos.numel() else 0)
        max_length = generation_config.max_length
        want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
        want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
        record: list[list[tuple]] = [[] for _ in range(B)]

        # prefill, as plain generate does it (same attention mask, position ids and cache)
        attention_mask = model_kwargs.get("attention_mask")
        layout = KVLayout.from_prompt(attention_mask, input_ids)
        past = cache.get_seq_length()
        position_ids = model_kwargs.get("position_ids")
        position_ids = layout.positions if position_ids is None else position_ids
        wanted = self.prompt_logit_positions(input_ids[:, past:])
        keep = torch.tensor([L - past - 1], device=input_ids.device)  # the last position: the first new token
        keep = keep if wanted is None else torch.cat([wanted.to(keep.device), keep]).unique()  # ascending
        out = model(
            input_ids=input_ids[:, past:],
            attention_mask=attention_mask,
            position_ids=position_ids[:, past:],
            use_cache=True,
            logits_to_keep=keep if wanted is not None else 1,
            **cache_kwarg(cache),
        )
        cache = output_cache(out)
        window = self._check_cache(cache)
        _refuse_past_window(window, layout.length + 1)  # the drafters' first step verifies at least one token
        cache.activate_past_recording()  # caches that drop tokens keep them until the next crop
        stats.steps = 1
        stats.row_forwards = B
        state = DecodingState(
            sequences=torch.full((B, max_length), pad, dtype=torch.long, device=input_ids.device),
            lengths=torch.full((B,), L, dtype=torch.long, device=input_ids.device),
            unfinished=torch.ones(B, dtype=torch.bool, device=input_ids.device),
            max_drafts=torch.zeros(B, dtype=torch.long, device=input_ids.device),
            generation_config=generation_config,
            logits_processor=processors,
            cache=cache,
            layout=layout,
            prompt_logits=out.logits if wanted is not None else None,
            prompt_columns=past + keep if wanted is not None else None,
        )
        state.sequences[:, :L] = input_ids
        logits = out.logits[:, -1:].float()  # (B, 1, V)
        scores = processors(input_ids, logits[:, 0].clone())[:, None]  # (B, 1, V)
        first = torch.multinomial(torch.softmax(scores[:, 0], -1), 1) if generation_config.do_sample else None
        first = scores[:, 0].argmax(-1, keepdim=True) if first is None else first  # (B, 1)
        self._emit(state, first, [[(scores[b, 0], logits[b, 0])] for b in range(B)], eos, criteria, streamer, record)
        self.start(model, state)

        while bool(state.unfinished.any()):
            state.max_drafts = (max_length - state.lengths - 1).clamp(min=0)
            drafting = time.perf_counter()
            tree = self.draft(model, state)
            stats.draft_seconds += time.perf_counter() - drafting
            T = tree.size
            _refuse_past_window(window, layout.length + T)
            next_positions = layout.next_positions()  # (B,)
            node_positions = next_positions[:, None] + tree.depth  # (B, T)
            node_logits = model(
                input_ids=tree.tokens,
                attention_mask=tree_attention_mask(
                    model.config, layout, tree.ancestors(), node_positions, model.dtype
                ),
                position_ids=node_positions,
                use_cache=True,
                **cache_kwarg(cache),
            ).logits  # (B, T, V)
            scores = self._process(processors, state, tree, node_logits)  # (B, T, V) float32
            accept = sample_accept if generation_config.do_sample else greedy_accept
            path, num_accepted, next_token = accept(tree, scores, state.max_drafts)
            drafting = time.perf_counter()
            self.observe(state, tree, node_logits, path, num_accepted)
            stats.draft_seconds += time.perf_counter() - drafting
            stats.steps += 1
            stats.row_forwards += int(state.unfinished.sum())
            stats.draft_tokens += (T - 1) * int(state.unfinished.sum())

            # commit root + accepted drafts to the cache (holes for rows that accepted fewer)
            kept = torch.where(state.unfinished, num_accepted + 1, 1)  # (B,)
            A = int(kept.max())
            keep = path[:, :A]
            keep = torch.where(keep >= 0, keep, keep.gather(1, (kept - 1)[:, None]))  # pad with the row's last node
            new_positions = next_positions[:, None] + torch.arange(A, device=keep.device)
            compact_cache(cache, T, keep)
            layout.append(torch.arange(A, device=keep.device)[None] < kept[:, None], new_positions)

            drafted = tree.tokens.gather(1, path[:, 1:].clamp(min=0))  # (B, D) accepted drafts first
            emitted = torch.cat([drafted, next_token[:, None]], 1).scatter_(
                1, num_accepted[:, None], next_token[:, None]
            )
            node_records = [
                [(scores[b, n], node_logits[b, n].float()) for n in path[b, : int(num_accepted[b]) + 1].tolist()]
                if (want_scores or want_logits)
                else []
                for b in range(B)
            ]
            self._emit(state, emitted, node_records, eos, criteria, streamer, record, num_accepted + 1)

        if streamer is not None:
            streamer.end()
        sequences = state.sequences[:, : int(state.lengths.max())]
        if not generation_config.return_dict_in_generate:
            return sequences
        steps = [list(t) for t in zip(*[r + [None] * (max(map(len, record)) - len(r)) for r in record])]
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=tuple(_stack(step, 0) for step in steps) if want_scores else None,
            logits=tuple(_stack(step, 1) for step in steps) if want_logits else None,
            **cache_kwarg(cache),
        )

    # ----- helpers --------------------------------------------------------------------------------------
    def _check_cache(self, cache) -> int | None:
        """Refuse caches that cannot roll back; return the smallest window of the sliding layers left in the cache
        (the default `DynamicCache` has none: `full_history_cache`). Such a layer drops columns that tree masks
        still address, so verification over it is exact only while the sequence stays inside the window."""
        if not getattr(cache, "is_croppable", False):
            raise ValueError(
                f"{type(cache).__name__} declares is_croppable=False: it cannot roll back rejected draft tokens, "
                "which speculative decoding needs. Use the default DynamicCache, or this cache with plain generate."
            )
        windows = [getattr(layer, "sliding_window", None) for layer in cache.layers if getattr(layer, "is_sliding", 0)]
        return min((w for w in windows if w is not None), default=None)

    def _process(
        self, processors: LogitsProcessorList, state: DecodingState, tree: DraftTree, logits: torch.Tensor
    ) -> torch.Tensor:
        """Apply the logits processors at every node with the node's own prefix (row tokens + path), as plain
        `generate` would at that point.

        Warpers that read neither the prefix nor its length (temperature, top-k, top-p, ...) run once over all
        nodes, and minimum-length processors ban EOS at the nodes whose prefix is too short; the others run once
        per prefix length over the usable nodes of that length (nodes too deep to be used keep their scores).
        """
        scores = logits.float()  # (B, T, V)
        if not processors:
            return scores
        scores = scores.clone()
        B, T, V = scores.shape
        prefix_len = state.lengths[:, None] + tree.depth  # (B, T) length of the sequence each node continues
        groups = None  # prefix length -> usable (rows, nodes), built for the first processor that reads the prefix
        prefixes: dict[int, torch.LongTensor] = {}  # prefix length -> (N, length) token ids, built on demand
        for processor in processors:
            if isinstance(processor, _PREFIX_FREE):
                scores = processor(state.sequences, scores.view(B * T, V)).view(B, T, V)
                continue
            if isinstance(processor, _EOS_UNTIL_LENGTH):
                threshold, eos = _eos_ban(processor)
                short = prefix_len < threshold  # (B, T) nodes whose prefix is too short to end
                if bool(short.any()):
                    eos = eos.to(scores.device)
                    eos = eos[eos < V]  # ids outside the vocabulary never occur
                    scores[..., eos] = scores[..., eos].masked_fill(short[..., None], -math.inf)
                continue
            if groups is None:
                usable = (tree.depth <= state.max_drafts[:, None]) & state.unfinished[:, None]
                groups = {
                    length: torch.nonzero(usable & (prefix_len == length), as_tuple=True)
                    for length in prefix_len[usable].unique().tolist()
                }
                path_tokens = tree.path_tokens()  # (B, T, D + 1)
            for length, (rows, nodes) in groups.items():
                if length not in prefixes:
                    prefixes[length] = _prefix_ids(state, path_tokens, rows, nodes, length)
                scores[rows, nodes] = _process_rows(processor, prefixes[length], scores[rows, nodes], rows)
        return scores

    def _emit(self, state, tokens, node_records, eos, criteria, streamer, record, counts=None) -> None:
        """Append up to `counts[b]` tokens of `tokens` `(B, n)` to every unfinished row, stopping after EOS, at
        `max_length` or where another stopping criterion fires (checked token by token)."""
        B, n = tokens.shape
        j = torch.arange(n, device=tokens.device)[None]  # (1, n)
        counts = torch.full((B,), n, device=tokens.device) if counts is None else counts
        max_length = state.sequences.shape[1]
        live = (j < counts[:, None]) & (j < max_length - state.lengths[:, None]) & state.unfinished[:, None]  # (B, n)
        ends = torch.isin(tokens, eos) & live
        live &= (ends.long().cumsum(1) - ends.long()) == 0  # nothing after the first EOS
        take = live.sum(1)  # (B,) tokens appended per row
        stop = ends.any(1) | (state.lengths + take >= max_length)
        if criteria:
            take, stop = self._check_criteria(state, tokens, take, stop, criteria)
            live = j < take[:, None]
        rows, cols = live.nonzero(as_tuple=True)
        state.sequences[rows, state.lengths[rows] + cols] = tokens[rows, cols]
        state.lengths += take
        state.unfinished &= ~stop
        self.stats.new_tokens += len(rows)
        if any(node_records):
            for b, count in enumerate(take.tolist()):
                record[b] += node_records[b][:count]
        if streamer is not None and len(rows):
            streamer.put(tokens[0, : len(rows)].cpu())

    @staticmethod
    def _check_criteria(state, tokens, take, stop, criteria) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Shorten `take` to the first token where a stopping criterion fires; such rows stop."""
        take, stop = take.clone(), stop.clone()
        for b in torch.nonzero(take).flatten().tolist():
            length = int(state.lengths[b])
            row = torch.cat([state.sequences[b, :length], tokens[b, : int(take[b])]])[None]  # (1, length + take)
            for k in range(1, int(take[b]) + 1):
                if any(bool(c(row[:, : length + k], None).any()) for c in criteria):
                    take[b], stop[b] = k, True
                    break
        return take, stop


def _eos_ban(processor: LogitsProcessor) -> tuple[int, torch.Tensor]:
    """`(threshold, eos_ids)`: a minimum-length processor bans `eos_ids` while `input_ids.shape[-1] < threshold`."""
    if isinstance(processor, MinNewTokensLengthLogitsProcessor):
        return processor.prompt_length_to_skip + processor.min_new_tokens, processor.eos_token_id
    return processor.min_length, processor.eos_token_id


def _process_rows(
    processor: LogitsProcessor, ids: torch.LongTensor, scores: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """`processor(ids, scores)` for nodes of batch rows `rows` `(N,)`; per-row state is sliced to those rows
    (generate gives the repetition penalty each row's left-padding length, to leave padding unpenalised)."""
    ignore = getattr(processor, "prompt_ignore_length", None)
    if not (isinstance(processor, RepetitionPenaltyLogitsProcessor) and isinstance(ignore, torch.Tensor)):
        return processor(ids, scores)
    processor.prompt_ignore_length = ignore.to(rows.device)[rows]
    try:
        return processor(ids, scores)
    finally:
        processor.prompt_ignore_length = ignore


def _prefix_ids(
    state: DecodingState, path_tokens: torch.LongTensor, rows: torch.Tensor, nodes: torch.Tensor, length: int
) -> torch.LongTensor:
    """`(N, length)` token ids of the sequence that tree nodes `(rows, nodes)` continue: the row's tokens, then
    the node's root-to-node path (`path_tokens` `(B, T, D + 1)`)."""
    cols = torch.arange(length, device=rows.device)[None]  # (1, length)
    k = cols - state.lengths[rows][:, None] + 1  # (N, length) path depth of each column past the row
    return torch.where(
        k >= 1,
        path_tokens[rows, nodes].gather(1, k.clamp(0, path_tokens.shape[-1] - 1)),
        state.sequences[rows, :length],
    )


def _refuse_past_window(window: int | None, columns: int) -> None:
    """`ValueError` when a verification forward over `columns` cache columns would leave a sliding layer's window:
    such a layer drops columns that the tree masks still address."""
    if window is not None and columns >= window:
        raise ValueError(
            f"the sequence reached the sliding window ({window}) of the cache passed in; lower max_new_tokens, let "
            "generate create the cache (speculative decoding then keeps every token), or build our cache with "
            "sliding_layers='full'."
        )


def _as_list(value) -> list[int]:
    """`eos_token_id` as a list (it may be `None`, an int, a list or a tensor)."""
    return [] if value is None else [int(v) for v in torch.as_tensor(value).flatten().tolist()]


def _stack(step: list, which: int) -> torch.Tensor:
    present = next(item for item in step if item is not None)[which]
    return torch.stack([present.new_zeros(present.shape) if item is None else item[which] for item in step])
