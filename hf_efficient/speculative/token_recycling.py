"""Token Recycling: training-free drafting from an adjacency matrix of each token's recent top-k successors
(and, beyond the paper, a hashed table of the successors of token pairs)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from .cost_model import SIZES, ForwardCostModel, device_name, forward_seconds, model_key, plan_draft
from .engine import DecodingState, SpeculativeDecoder
from .template import DraftTemplate, best_first_templates, template_from_paths
from .tree import DraftTree, tree_template

__all__ = ["TokenRecycling"]

# prior P(child of rank r accepted | parent accepted), refined online from this object's own verifications
_RANK_PRIOR = (0.45, 0.15, 0.08, 0.05, 0.04, 0.03, 0.02, 0.02)
_PRIOR_WEIGHT = 20.0
_MAX_TREE = 64  # the largest template `tree="auto"` plans with
_STATE_FILE = "recycling.safetensors"  # the `save` file inside a `save_pretrained` folder


class TokenRecycling(SpeculativeDecoder):
    """Training-free tree drafting: every verified node's top-k target candidates are *recycled* as drafts.

    The state is an adjacency matrix `(V, topk)`: row `t` holds the target's `topk` most likely successors of
    token `t`, last seen. A draft tree is read from it breadth-first along a template (child of rank `r` =
    `r`-th successor of the parent's token), verified in one target forward, and every verified node overwrites
    its token's row with the target's top-k at that node (accepted or not). The matrix persists across calls
    (`save` / `load` / `reset`); `save_pretrained` / `from_pretrained` / `push_to_hub` keep it together with the
    settings and, for `tree="auto"`, the forward timings (looked up again only for another device or model).

    With `tree="auto"` every step's tree size is planned (`cost_model.plan_draft`) from the measured acceptance per
    rank and the target's forward time by tokens verified (`ForwardCostModel`: timed once per model, dtype, device
    and thread count, kept on disk): the size maximising expected tokens per second, a root-only plain step when
    drafting would not pay.

    Beyond the paper, the successors are also kept per token *pair* (the node's parent token, the node's token) in
    a hashed table of `pair_buckets` rows, and a draft node whose pair has been seen takes its successors from
    there: one token of extra context makes recycled drafts markedly more accurate (on the reference target,
    mean accepted tokens per forward rise by 10-30% at the same tree size). `pair_buckets=0` is the paper's method.

    Paper: Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language Models with Token
    Recycling", ACL 2025, arXiv:2408.08696.

    Args:
        topk (`int`, *optional*, defaults to 8): successors kept per token (the paper's `k`).
        tree (`str`, `int` or `Sequence[Sequence[int]]`, *optional*, defaults to `"auto"`): the draft-tree
            template. `"auto"` plans every step's size (1 to 64 nodes; 1 is a plain step) for the most expected
            tokens per second from `cost_model`'s forward times and the measured per-rank acceptance; an `int` is
            a fixed size (nodes incl. root) of the best template; a list of rank paths (e.g. `[[0], [1], [0, 0]]`,
            the paper's format) is used as given.
        pair_buckets (`int`, *optional*, defaults to 65521): rows of the token-pair table (a prime spreads the
            hashed pairs best); `0` disables it.
        warm_start (`bool`, *optional*, defaults to `True`): seed the rows of prompt tokens the matrix has not
            seen yet from the prefill logits (the prefill's LM head runs at those positions too; rows learned
            in earlier calls are kept).
        cost_model (`ForwardCostModel`, *optional*): the target's forward times for `tree="auto"`; by default
            measured once per machine and model and cached on disk. `ForwardCostModel(costs={...})` pins them.

    Example:

    ```python
    from hf_efficient.speculative import TokenRecycling

    recycling = TokenRecycling(topk=8)
    out = model.generate(**inputs, custom_generate=recycling, max_new_tokens=64, do_sample=False)
    print(recycling.stats.mean_accepted)
    recycling.save_pretrained("recycling")  # later: TokenRecycling.from_pretrained("recycling")
    ```
    """

    def __init__(
        self,
        topk: int = 8,
        tree: str | int | Sequence[Sequence[int]] = "auto",
        pair_buckets: int = 65521,
        warm_start: bool = True,
        cost_model: ForwardCostModel | None = None,
    ):
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk={topk} must be >= 1")
        if pair_buckets < 0:
            raise ValueError(f"pair_buckets={pair_buckets} must be >= 0 (0 disables the token-pair table)")
        if not (tree == "auto" or isinstance(tree, (int, list, tuple))):
            raise ValueError(f"tree={tree!r}: use 'auto', a node count, or a list of rank paths like [[0], [0, 0]]")
        self.topk = topk
        self.tree = tree
        self.pair_buckets = pair_buckets
        self.warm_start = warm_start
        self.cost_model = cost_model if cost_model is not None else ForwardCostModel()
        self.forward_costs: dict[int, float] = {}  # tokens verified -> seconds of one forward (`tree="auto"`)
        self.forward_costs_device: str | None = None  # the device `forward_costs` were measured on
        self.forward_costs_model: str | None = None  # and the model (`cost_model.model_key`)
        self.reset()

    # ----- state ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the recycled successors and the acceptance statistics (not the measured forward costs)."""
        self.adjacency: torch.LongTensor | None = None  # (V, topk)
        self.seen: torch.BoolTensor | None = None  # (V,) rows written from target logits
        self.pair_keys: torch.LongTensor | None = None  # (pair_buckets,) `previous * V + token` per row, -1 if empty
        self.pair_next: torch.LongTensor | None = None  # (pair_buckets, topk) successors of that pair
        prior = torch.tensor([_RANK_PRIOR[r] if r < len(_RANK_PRIOR) else 0.01 for r in range(self.topk)])
        self.rank_hits = prior * _PRIOR_WEIGHT  # (topk,)
        self.rank_trials = torch.full((self.topk,), _PRIOR_WEIGHT)
        self._pending: torch.LongTensor | None = None  # (2, topk) trials and hits per rank not yet folded in

    def _fold_counts(self) -> None:
        """Add the per-rank trials and hits counted on the drafting device since the last fold (one sync)."""
        if self._pending is None:
            return
        pending = self._pending.float().cpu()
        self.rank_trials, self.rank_hits = self.rank_trials + pending[0], self.rank_hits + pending[1]
        self._pending = torch.zeros_like(self._pending)

    def save(self, path: str | os.PathLike) -> None:
        """Write the learned state (`state_tensors`) to a safetensors file."""
        if self.adjacency is None:
            raise ValueError("nothing to save: the adjacency matrix is built by the first generate call")
        metadata = {"method": "token_recycling", "topk": str(self.topk)}
        save_file(self.state_tensors(), os.fspath(path), metadata=metadata)

    def load(self, path: str | os.PathLike) -> TokenRecycling:
        """Restore a state written by `save` (sets `topk` and `pair_buckets` from the file); returns `self`."""
        self.load_state_tensors(load_file(os.fspath(path)))
        return self

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The recycled successors and acceptance statistics as CPU tensors (subclasses add theirs)."""
        self._fold_counts()
        tensors = {
            "adjacency": self.adjacency.cpu(),
            "seen": self.seen.cpu(),
            "rank_hits": self.rank_hits,
            "rank_trials": self.rank_trials,
        }
        if self.pair_keys is not None:
            tensors |= {"pair_keys": self.pair_keys.cpu(), "pair_next": self.pair_next.cpu()}
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned."""
        self.adjacency = tensors["adjacency"].long()
        self.seen = tensors["seen"].bool()
        self.pair_keys, self.pair_next = tensors.get("pair_keys"), tensors.get("pair_next")
        self.pair_buckets = 0 if self.pair_keys is None else len(self.pair_keys)
        self.topk = self.adjacency.shape[1]
        self.rank_hits, self.rank_trials = tensors["rank_hits"].float(), tensors["rank_trials"].float()
        self._pending = None

    def _save_state(self, folder: Path) -> dict[str, Any]:
        if self.adjacency is not None:  # built by the first call
            self.save(folder / _STATE_FILE)
        return {
            "topk": self.topk,
            "tree": self.tree,
            "pair_buckets": self.pair_buckets,
            "warm_start": self.warm_start,
            "forward_costs": {str(size): seconds for size, seconds in self.forward_costs.items()},
            "forward_costs_device": self.forward_costs_device,
            "forward_costs_model": self.forward_costs_model,
        }

    @classmethod
    def _load_state(cls, folder: Path, config: dict[str, Any], device=None, **init_kwargs) -> TokenRecycling:
        """`device` is not needed: the state moves to the model's device at the first call."""
        strategy = cls(**init_kwargs)
        if (folder / _STATE_FILE).is_file():
            strategy.load(folder / _STATE_FILE)
        strategy.forward_costs = {int(size): float(s) for size, s in (config.get("forward_costs") or {}).items()}
        strategy.forward_costs_device = config.get("forward_costs_device")
        strategy.forward_costs_model = config.get("forward_costs_model")
        return strategy

    @property
    def rank_acceptance(self) -> list[float]:
        """Estimated probability that a child of rank `r` is accepted when its parent is."""
        self._fold_counts()
        return (self.rank_hits / self.rank_trials).tolist()

    # ----- engine hooks ---------------------------------------------------------------------------------
    def prompt_logit_positions(self, prefill_ids: torch.LongTensor) -> torch.LongTensor | None:
        if not self.warm_start:
            return None
        if self.seen is None or int(prefill_ids.max()) >= len(self.seen):  # first call (or a mismatch start reports)
            return torch.arange(prefill_ids.shape[1], device=prefill_ids.device)
        unseen = ~self.seen.to(prefill_ids.device)[prefill_ids]  # (B, N)
        return unseen.any(0).nonzero().flatten()

    def start(self, model: PreTrainedModel, state: DecodingState) -> None:
        vocab = model.get_output_embeddings().weight.shape[0]
        device = state.sequences.device
        if self.adjacency is None:
            self.adjacency = torch.arange(self.topk, device=device).repeat(vocab, 1)  # distinct, if uninformed
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        if self.pair_keys is None and self.pair_buckets:
            self.pair_keys = torch.full((self.pair_buckets,), -1, dtype=torch.long, device=device)
            self.pair_next = torch.zeros(self.pair_buckets, self.topk, dtype=torch.long, device=device)
        if self.adjacency.shape[0] != vocab:
            raise ValueError(
                f"the recycling state was built for a vocabulary of {self.adjacency.shape[0]} tokens, this model "
                f"has {vocab}; call .reset() (or use one TokenRecycling per model)."
            )
        self.adjacency, self.seen = _writable(self.adjacency.to(device)), _writable(self.seen.to(device))
        if self.pair_keys is not None:
            self.pair_keys, self.pair_next = _writable(self.pair_keys.to(device)), _writable(self.pair_next.to(device))
        if state.prompt_logits is not None:  # logits at the prompt columns `prompt_columns`
            columns = state.prompt_columns
            before = (columns - 1).clamp(min=0)
            previous = state.sequences[:, before].masked_fill(~state.layout.valid[:, before] | (columns == 0), -1)
            valid = state.layout.valid[:, columns]  # (B, N), padding excluded
            top = state.prompt_logits[valid].topk(self.topk).indices
            self._recycle(previous[valid], state.sequences[:, columns][valid], top)
            state.prompt_logits = None
        self._fold_counts()
        self._pending = torch.zeros(2, self.topk, dtype=torch.long, device=device)
        self._templates = self._plan_templates(model, state)  # template size -> `DraftTemplate`
        self._seconds = self._seconds_table(state, max(self._templates))
        self._plain_drafts = None  # what a plain step would have drafted, scored once its token is known

    def draft(self, model: PreTrainedModel, state: DecodingState) -> DraftTree:
        self._score_plain_step(state)
        self._template = self._templates[self._plan(state)[0]]
        return DraftTree(self._draft_template(state, self._template)[:, 1:].contiguous(), self._template.parents)

    def observe(self, state, tree, logits, path, num_accepted) -> None:
        rows = state.unfinished
        previous = tree.tokens.gather(1, tree.parents.clamp(min=0))  # (B, T) parent token of every node
        previous[:, 0] = _previous_roots(state)
        top = logits[rows].topk(self.topk).indices  # (b, T, topk)
        self._recycle(previous[rows].flatten(), tree.tokens[rows].flatten(), top.flatten(0, 1))
        n = self._template.size  # template nodes come first; nodes past them (a subclass's) are not ranked
        if n > 1:
            on_path = torch.zeros_like(tree.tokens, dtype=torch.bool).scatter_(1, path.clamp(min=0), True)[rows]
            tried = on_path.gather(1, tree.parents[rows, :n].clamp(min=0))  # (b, n) parent on the accepted path
            hit = on_path[:, :n] & tried
            self._pending[0].index_add_(0, self._template.node_ranks, tried[:, 1:].sum(0))  # the root has no rank
            self._pending[1].index_add_(0, self._template.node_ranks, hit[:, 1:].sum(0))

    # ----- internals ------------------------------------------------------------------------------------
    def _plan(self, state: DecodingState, chain_gains: Sequence[float] = (0.0,)) -> tuple[int, int]:
        """`(template size, chain length)` of this step: the fixed template, or `plan_draft`'s choice (`"auto"`)."""
        if len(self._templates) == 1:
            return next(iter(self._templates)), len(chain_gains) - 1
        gains = {size: template.gain for size, template in self._templates.items()}
        return plan_draft(self._seconds, gains, chain_gains)

    def _draft_template(self, state: DecodingState, template: DraftTemplate) -> torch.LongTensor:
        """`(B, n + 1)` drafting buffer of `template`: column 0 the root's previous token, column `i + 1` node `i`."""
        B = state.sequences.shape[0]
        context = torch.empty(B, template.size + 1, dtype=torch.long, device=state.sequences.device)
        context[:, 0], context[:, 1] = _previous_roots(state), state.roots
        for nodes, parents, grandparents, ranks in template.levels:  # one tree depth at a time, (n,) each
            context[:, nodes] = self._successors(context[:, grandparents], context[:, parents], ranks)
        if template.size == 1:  # a plain step: keep what every rank would have drafted (`_score_plain_step`)
            ranks = torch.arange(self.topk, device=context.device)
            drafts = self._successors(context[:, :1], context[:, 1:], ranks)  # (B, topk)
            self._plain_drafts = (drafts, state.lengths.clone(), state.unfinished.clone())
        return context

    def _score_plain_step(self, state: DecodingState) -> None:
        """Count the last plain step's would-be children against the token it emitted (a child of rank `r` is
        accepted exactly when it equals that token, in greedy and in sampling), so per-rank acceptance keeps being
        measured while the plan drafts nothing."""
        if self._plain_drafts is None:
            return
        drafts, lengths, live = self._plain_drafts
        last = state.sequences.shape[1] - 1  # rows already at max_length were not live
        emitted = state.sequences.gather(1, lengths.clamp(max=last)[:, None])  # (B, 1) the token the step emitted
        self._pending[0] += live.sum()
        self._pending[1] += ((drafts == emitted) & live[:, None]).sum(0)
        self._plain_drafts = None

    def _successors(self, previous: torch.Tensor, parent: torch.Tensor, ranks: torch.Tensor | int) -> torch.Tensor:
        """The rank-`ranks` successors of tokens `parent` preceded by `previous` (-1 if unknown), shapes broadcast:
        from the pair table where the pair was seen, else from the adjacency matrix."""
        successor = self.adjacency[parent, ranks]
        if self.pair_keys is not None:
            key = previous * len(self.adjacency) + parent  # negative where unknown: no match
            bucket = key % len(self.pair_keys)
            successor = torch.where(self.pair_keys[bucket] == key, self.pair_next[bucket, ranks], successor)
        return successor

    def _seconds_table(self, state: DecodingState, nodes: int) -> list[float]:
        """`[seconds of a forward verifying t nodes per row for t in 0..nodes]` (`tree="auto"`; the batch's rows
        count: a forward of `B` rows of `t` nodes is timed as `B * t` tokens)."""
        if not self.forward_costs:
            return []
        rows = state.sequences.shape[0]
        return [forward_seconds(self.forward_costs, rows * max(t, 1)) for t in range(nodes + 1)]

    def _recycle(self, previous: torch.LongTensor, tokens: torch.LongTensor, top: torch.LongTensor) -> None:
        """Record successors `top` `(N, topk)` of `tokens` `(N,)` (preceded by `previous` `(N,)`, -1 if unknown) in
        the adjacency matrix and the pair table; for a row written several times the first occurrence wins."""
        if tokens.numel() == 0:
            return
        rows, first = _first_occurrences(tokens)
        self.adjacency[rows] = top[first]
        self.seen[rows] = True
        if self.pair_keys is None:
            return
        known = previous >= 0
        key = previous[known] * len(self.adjacency) + tokens[known]  # (M,)
        buckets, first = _first_occurrences(key % len(self.pair_keys))
        self.pair_keys[buckets] = key[first]
        self.pair_next[buckets] = top[known][first]

    def _plan_templates(self, model: PreTrainedModel, state: DecodingState) -> dict[int, DraftTemplate]:
        """The templates this call drafts from, by size: the given one, or for `"auto"` one per planned size."""
        acceptance, device = self.rank_acceptance, state.sequences.device
        if isinstance(self.tree, (list, tuple)):
            return DraftTemplate.by_size(*template_from_paths(self.tree), acceptance, device)
        if isinstance(self.tree, int):
            return DraftTemplate.by_size(*tree_template(self.tree, acceptance), acceptance, device)
        self._update_forward_costs(model)
        return best_first_templates(SIZES, _MAX_TREE, acceptance, device)

    def _update_forward_costs(self, model: PreTrainedModel) -> None:
        """`forward_costs` of this model and device: pinned by `cost_model`, kept when this object already holds
        them (saved with it), else `cost_model`'s (timed at most once per machine, cached on disk)."""
        device, identity = device_name(model.device), model_key(model)
        held = self.forward_costs and (self.forward_costs_device, self.forward_costs_model) == (device, identity)
        if self.cost_model.costs is not None or not held:
            self.forward_costs = self.cost_model.forward_costs(model)
        self.forward_costs_device, self.forward_costs_model = device, identity


def _first_occurrences(values: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`(unique, first)`: the distinct values of `values` `(N,)` and the index of the first occurrence of each."""
    unique, inverse = values.unique(return_inverse=True)
    order = torch.arange(len(values), device=values.device)
    return unique, torch.full_like(unique, len(values)).scatter_reduce_(0, inverse, order, "amin")


def _previous_roots(state: DecodingState) -> torch.LongTensor:
    """`(B,)` the token before each row's root (-1 where the row has none)."""
    before = state.lengths - 2
    return state.sequences.gather(1, before.clamp(min=0)[:, None]).squeeze(1).masked_fill(before < 0, -1)


def _writable(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, cloned if an earlier call under `torch.inference_mode()` made it an inference tensor and this call
    runs outside inference mode (where inference tensors cannot be updated in place)."""
    return tensor.clone() if tensor.is_inference() and not torch.is_inference_mode_enabled() else tensor
