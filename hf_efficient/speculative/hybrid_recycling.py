"""Hybrid drafting: a suffix-automaton retrieval chain and Token Recycling's successor tree in one tree per step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from .cost_model import ForwardCostModel
from .engine import DecodingState
from .suffix_index import SuffixIndex
from .template import DraftTemplate
from .token_recycling import TokenRecycling, _previous_roots, _writable
from .tree import DraftTree

__all__ = ["HybridRecycling"]

# chain statistics per match-length class: 1, 2-3, 4-7, 8-15, 16+ matched tokens (longer matches copy more reliably)
_CLASSES = 5
_CHAIN_PRIOR = (0.2, 0.35, 0.5, 0.6, 0.7)  # prior P(chain token accepted | the previous one was), per class
_CHAIN_PRIOR_WEIGHT = 4.0


class HybridRecycling(TokenRecycling):
    """Token Recycling fused with retrieval: draft what followed the longest earlier occurrence of the context.

    Each step, every row's longest context suffix that occurred before, in its own prompt and output so far or in
    the session of earlier calls (`SuffixIndex`, a suffix automaton), yields a continuation. It is drafted as a
    chain grafted onto the recycling template where their tokens agree, so copying from the context (RAG,
    summarization, code edits) drafts long runs while free text falls back to the recycled successors, all
    verified in one forward. A chain shorter than planned is continued with recycled rank-0 successors; a row
    without a match continues the template's rank-0 spine instead.

    With `tree="auto"` the template size and the chain length are planned together each step (`plan_draft`): the
    chain's acceptance is measured per depth and match-length class, the template's per rank, against the
    target's forward time by tokens verified; a plain step when neither pays. With a fixed `tree` the chain takes
    the whole continuation found (up to `suffix_draft_tokens`). Acceptance is scored against the tokens actually
    emitted, also for chains that were not drafted, so the statistics keep up while the plan leaves them out.

    The successor tables, the session index and every statistic persist across calls (`save` / `load` / `reset`,
    `save_pretrained` / `from_pretrained`).

    Paper: Hu et al., "SAM Decoding: Speculative Decoding via Suffix Automaton", arXiv:2411.10666 (retrieval
    fused with Token Recycling); Oliaro et al., "SuffixDecoding", arXiv:2411.04975; Luo et al., "Turning Trash into
    Treasure: Accelerating Inference of Large Language Models with Token Recycling", arXiv:2408.08696.

    Args:
        topk, tree, pair_buckets, warm_start, cost_model: as for `TokenRecycling`.
        suffix_draft_tokens (`int`, *optional*, defaults to 16): longest retrieved continuation drafted per step.
        suffix_min_match (`int`, *optional*, defaults to 2): shortest context suffix match whose continuation is
            drafted.
        suffix_session_tokens (`int`, *optional*, defaults to 65536): tokens of earlier calls kept in the session
            index (`0` keeps none: each call retrieves from its own rows only).

    Example:

    ```python
    from hf_efficient.speculative import HybridRecycling

    hybrid = HybridRecycling()
    out = model.generate(**inputs, custom_generate=hybrid, max_new_tokens=128, do_sample=False)
    print(hybrid.stats.mean_accepted, hybrid.chain_acceptance)
    ```
    """

    def __init__(
        self,
        topk: int = 8,
        tree: str | int | Sequence[Sequence[int]] = "auto",
        pair_buckets: int = 65521,
        warm_start: bool = True,
        cost_model: ForwardCostModel | None = None,
        suffix_draft_tokens: int = 16,
        suffix_min_match: int = 2,
        suffix_session_tokens: int = 65536,
    ):
        if suffix_draft_tokens < 1:
            raise ValueError(f"suffix_draft_tokens={suffix_draft_tokens} must be >= 1 (use TokenRecycling for none)")
        if suffix_min_match < 1:
            raise ValueError(f"suffix_min_match={suffix_min_match} must be >= 1")
        self.suffix_draft_tokens = suffix_draft_tokens
        self.suffix_min_match = suffix_min_match
        self.suffix_session_tokens = suffix_session_tokens
        super().__init__(topk=topk, tree=tree, pair_buckets=pair_buckets, warm_start=warm_start, cost_model=cost_model)

    # ----- state ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the successor tables, the session index and the acceptance statistics (not the forward costs)."""
        super().reset()
        self.suffix = SuffixIndex(self.suffix_session_tokens)
        prior = torch.tensor(_CHAIN_PRIOR)[:, None].expand(_CLASSES, self.suffix_draft_tokens)
        self.chain_hits = prior * _CHAIN_PRIOR_WEIGHT  # (classes, depth)
        self.chain_trials = torch.full((_CLASSES, self.suffix_draft_tokens), _CHAIN_PRIOR_WEIGHT)

    @property
    def chain_acceptance(self) -> list[list[float]]:
        """Estimated P(chain token at depth `d` accepted | depth `d - 1` was), per match-length class (1, 2-3,
        4-7, 8-15, 16+ tokens)."""
        return (self.chain_hits / self.chain_trials).tolist()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return super().state_tensors() | {
            "suffix_session": torch.tensor(self.suffix.tokens, dtype=torch.long),
            "chain_hits": self.chain_hits,
            "chain_trials": self.chain_trials,
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned; a `TokenRecycling` state (no index yet) loads too."""
        super().load_state_tensors(tensors)
        if "suffix_session" in tensors:
            self.suffix.load(tensors["suffix_session"].tolist())
            self.chain_hits, self.chain_trials = tensors["chain_hits"].float(), tensors["chain_trials"].float()
            self.suffix_draft_tokens = self.chain_hits.shape[1]

    def _save_state(self, folder: Path) -> dict[str, Any]:
        return super()._save_state(folder) | {
            "suffix_draft_tokens": self.suffix_draft_tokens,
            "suffix_min_match": self.suffix_min_match,
            "suffix_session_tokens": self.suffix_session_tokens,
        }

    # ----- engine hooks ---------------------------------------------------------------------------------
    def start(self, model: PreTrainedModel, state: DecodingState) -> None:
        super().start(model, state)
        self.chain_hits, self.chain_trials = _writable(self.chain_hits), _writable(self.chain_trials)
        self._seconds = self._seconds_table(state, max(self._templates) + self.suffix_draft_tokens)
        prompt = state.layout.length
        lengths = state.lengths.tolist()
        tokens = state.sequences[:, : max(lengths)].tolist()
        valid = state.layout.valid.tolist()
        rows = [
            [t for t, v in zip(row[:prompt], keep) if v] + row[prompt:length]
            for row, keep, length in zip(tokens, valid, lengths)
        ]
        self.suffix.begin(rows)  # the previous call's rows join the session
        self._indexed = lengths  # tokens of each row indexed so far
        self._chains: list[tuple[int, list[int]] | None] = [None] * len(rows)  # last step's (class, continuation)

    def draft(self, model: PreTrainedModel, state: DecodingState) -> DraftTree:
        self._score_plain_step(state)
        self._index_emitted(state)
        self._chains = self._retrieve(state)
        n, c = self._plan(state, self._chain_gains(state))
        self._template = self._templates[n]
        return self._graft(state, self._draft_template(state, self._template), c)

    # ----- internals ------------------------------------------------------------------------------------
    def _index_emitted(self, state: DecodingState) -> None:
        """Append every row's newly emitted tokens to its index, first scoring the last step's continuation on them
        (depth `d` is tried when depths `< d` were right, and hit when its token was emitted)."""
        lengths = state.lengths.tolist()
        start = min(self._indexed)
        window = state.sequences[:, start : max(lengths)].tolist()
        for row, (indexed, length) in enumerate(zip(self._indexed, lengths)):
            if length == indexed:
                continue
            emitted = window[row][indexed - start : length - start]
            if self._chains[row] is not None:
                group, continuation = self._chains[row]
                right = 0
                while right < min(len(emitted), len(continuation)) and emitted[right] == continuation[right]:
                    right += 1
                tried = min(right + 1, len(emitted), len(continuation))
                self.chain_trials[group, :tried] += 1
                self.chain_hits[group, :right] += 1
            self.suffix.extend(row, emitted)
            self._indexed[row] = length

    def _retrieve(self, state: DecodingState) -> list[tuple[int, list[int]] | None]:
        """Per row, `(match-length class, continuation)` of its longest earlier match, or `None` (no match of at
        least `suffix_min_match` tokens, or the row is finished)."""
        chains = []
        budgets = state.max_drafts.clamp(max=self.suffix_draft_tokens).tolist()
        for row, (live, budget) in enumerate(zip(state.unfinished.tolist(), budgets)):
            length, continuation = self.suffix.match(row, budget) if live and budget else (0, [])
            usable = length >= self.suffix_min_match and continuation
            chains.append((min(length.bit_length() - 1, _CLASSES - 1), continuation) if usable else None)
        return chains

    def _chain_gains(self, state: DecodingState) -> list[float]:
        """`gains[c]`: expected accepted tokens of a `c`-token chain, averaged over the unfinished rows."""
        longest = max((len(chain[1]) for chain in self._chains if chain is not None), default=0)
        gains = [0.0] * (longest + 1)
        rates = self.chain_acceptance
        live = max(int(state.unfinished.sum()), 1)
        for chain in self._chains:
            if chain is None:
                continue
            group, continuation = chain
            accepted, expected = 1.0, 0.0
            for depth in range(len(continuation)):
                accepted *= rates[group][depth]
                expected += accepted
                gains[depth + 1] += expected / live
            for depth in range(len(continuation) + 1, longest + 1):  # a shorter chain gains nothing more
                gains[depth] += expected / live
        return gains

    def _graft(self, state: DecodingState, context: torch.LongTensor, c: int) -> DraftTree:
        """The template's tree (drafting buffer `context` `(B, n + 1)`) plus a chain of `c` nodes per row, hung
        below the deepest template node that spells a prefix of the row's continuation (so no node repeats a
        sibling's token); chain nodes past the continuation take recycled rank-0 successors."""
        template = self._template
        n = template.size
        nodes = context[:, 1:]  # (B, n)
        if c == 0:
            return DraftTree(nodes.contiguous(), template.parents)
        tokens, parents, pads = [], [], []
        spelled, template_parents, chain_parents = nodes.tolist(), template.parents.tolist(), list(range(n, n + c - 1))
        for row, chain in enumerate(self._chains):
            continuation = chain[1] if chain is not None else []
            node, used = _deepest_spelling(template, spelled[row], continuation)
            run = continuation[used : used + c]
            tokens.append(spelled[row] + run + [0] * (c - len(run)))
            parents.append([*template_parents, node, *chain_parents])
            pads.append(len(run))
        device = nodes.device
        tokens = torch.tensor(tokens, device=device)  # (B, n + c)
        shared = all(p == parents[0] for p in parents)  # a shared topology stays on the CPU: cached by value
        parents = torch.tensor(parents[0]) if shared else torch.tensor(parents, device=device)
        grid = parents.to(device).expand_as(tokens)  # (B, n + c)
        previous = _previous_roots(state)
        for j in range(min(pads), c):  # chain nodes past a row's continuation: recycled rank-0 successors
            pad = torch.tensor([j >= length for length in pads], device=device)  # (B,)
            parent = grid[:, n + j]  # (B,)
            grandparent = grid.gather(1, parent[:, None]).squeeze(1)
            before = tokens.gather(1, grandparent.clamp(min=0)[:, None]).squeeze(1)
            before = torch.where(grandparent >= 0, before, previous)  # the root's parent: its previous token
            successor = self._successors(before, tokens.gather(1, parent[:, None]).squeeze(1), 0)
            tokens[:, n + j] = torch.where(pad, successor, tokens[:, n + j])
        return DraftTree(tokens, parents)


def _deepest_spelling(template: DraftTemplate, tokens: list[int], continuation: list[int]) -> tuple[int, int]:
    """`(node, used)`: the deepest template node whose root path spells `continuation[:used]` (`tokens`: the row's
    template tokens); without a continuation, the end of the template's rank-0 spine."""
    if not continuation:
        return template.spine_end, 0
    node, used = 0, 0
    while used < len(continuation):
        child = next((c for c in template.children[node] if tokens[c] == continuation[used]), None)
        if child is None:
            break
        node, used = child, used + 1
    return node, used
