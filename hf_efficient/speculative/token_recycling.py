"""Token Recycling: training-free drafting from an adjacency matrix of each token's recent top-k successors
(and, beyond the paper, a hashed table of the successors of token pairs)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from ..compat import cache_kwarg
from .engine import DecodingState, SpeculativeDecoder
from .tree import DraftTree, acceptance_probabilities, tree_template

__all__ = ["TokenRecycling"]

# prior P(child of rank r accepted | parent accepted), refined online from this object's own verifications
_RANK_PRIOR = (0.45, 0.15, 0.08, 0.05, 0.04, 0.03, 0.02, 0.02)
_PRIOR_WEIGHT = 20.0
# tree sizes `tree="auto"` times; at least 4 nodes, so the per-rank acceptance statistics keep being observed
_AUTO_SIZES = (4, 6, 8, 12, 16, 24, 32, 48, 64, 80)
_STATE_FILE = "recycling.safetensors"  # the `save` file inside a `save_pretrained` folder


class TokenRecycling(SpeculativeDecoder):
    """Training-free tree drafting: every verified node's top-k target candidates are *recycled* as drafts.

    The state is an adjacency matrix `(V, topk)`: row `t` holds the target's `topk` most likely successors of
    token `t`, last seen. A draft tree is read from it breadth-first along a template (child of rank `r` =
    `r`-th successor of the parent's token), verified in one target forward, and every verified node overwrites
    its token's row with the target's top-k at that node (accepted or not). The matrix persists across calls
    (`save` / `load` / `reset`); `save_pretrained` / `from_pretrained` / `push_to_hub` keep it together with the
    settings and, for `tree="auto"`, the forward timings (re-measured only on another kind of device).

    Beyond the paper, the successors are also kept per token *pair* (the node's parent token, the node's token) in
    a hashed table of `pair_buckets` rows, and a draft node whose pair has been seen takes its successors from
    there: one token of extra context makes recycled drafts markedly more accurate (on the reference target,
    mean accepted tokens per forward rise by 10-30% at the same tree size). `pair_buckets=0` is the paper's method.

    Paper: Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language Models with Token
    Recycling", ACL 2025, arXiv:2408.08696.

    Args:
        topk (`int`, *optional*, defaults to 8): successors kept per token (the paper's `k`).
        tree (`str`, `int` or `Sequence[Sequence[int]]`, *optional*, defaults to `"auto"`): the draft-tree
            template. `"auto"` times the target forward against tree size on the current device at the first
            call and keeps the size maximising expected tokens per second (re-planned every call from measured
            per-rank acceptance); an `int` is a fixed size (nodes incl. root) of the best template; a list of
            rank paths (e.g. `[[0], [1], [0, 0]]`, the paper's format) is used as given.
        pair_buckets (`int`, *optional*, defaults to 65521): rows of the token-pair table (a prime spreads the
            hashed pairs best); `0` disables it.
        warm_start (`bool`, *optional*, defaults to `True`): seed the rows of prompt tokens the matrix has not
            seen yet from the prefill logits (the prefill's LM head runs at those positions too; rows learned
            in earlier calls are kept).

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
        self.forward_costs: dict[int, float] = {}  # tree size -> seconds of one verification forward
        self.forward_costs_device: str | None = None  # the device `forward_costs` were measured on
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
        self._ranks = self._node_trials = self._node_hits = None  # template ranks `(T,)`, counts not yet folded

    def _fold_counts(self) -> None:
        """Add the per-node trials and hits of the current template's verifications to the per-rank counts."""
        if self._ranks is None:
            return
        ranks = self._ranks[1:].cpu()  # the root has no rank
        self.rank_trials = self.rank_trials.index_add(0, ranks, self._node_trials[1:].float().cpu())
        self.rank_hits = self.rank_hits.index_add(0, ranks, self._node_hits[1:].float().cpu())
        self._node_trials = torch.zeros_like(self._node_trials)
        self._node_hits = torch.zeros_like(self._node_hits)

    def save(self, path: str | os.PathLike) -> None:
        """Write the recycled successors and acceptance statistics to a safetensors file."""
        if self.adjacency is None:
            raise ValueError("nothing to save: the adjacency matrix is built by the first generate call")
        self._fold_counts()
        tensors = {
            "adjacency": self.adjacency.cpu(),
            "seen": self.seen.cpu(),
            "rank_hits": self.rank_hits,
            "rank_trials": self.rank_trials,
        }
        if self.pair_keys is not None:
            tensors |= {"pair_keys": self.pair_keys.cpu(), "pair_next": self.pair_next.cpu()}
        save_file(tensors, os.fspath(path), metadata={"method": "token_recycling", "topk": str(self.topk)})

    def load(self, path: str | os.PathLike) -> TokenRecycling:
        """Restore a state written by `save` (sets `topk` and `pair_buckets` from the file); returns `self`."""
        tensors = load_file(os.fspath(path))
        self.adjacency = tensors["adjacency"].long()
        self.seen = tensors["seen"].bool()
        self.pair_keys, self.pair_next = tensors.get("pair_keys"), tensors.get("pair_next")
        self.pair_buckets = 0 if self.pair_keys is None else len(self.pair_keys)
        self.topk = self.adjacency.shape[1]
        self.rank_hits, self.rank_trials = tensors["rank_hits"].float(), tensors["rank_trials"].float()
        self._ranks = self._node_trials = self._node_hits = None
        return self

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
        }

    @classmethod
    def _load_state(cls, folder: Path, config: dict[str, Any], device=None, **init_kwargs) -> TokenRecycling:
        """`device` is not needed: the state moves to the model's device at the first call."""
        strategy = cls(**init_kwargs)
        if (folder / _STATE_FILE).is_file():
            strategy.load(folder / _STATE_FILE)
        strategy.forward_costs = {int(size): float(s) for size, s in (config.get("forward_costs") or {}).items()}
        strategy.forward_costs_device = config.get("forward_costs_device")
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
        # the template stays on the CPU (DraftTree caches its topology by value); its drafting columns go to `device`
        self._parents, self._ranks = self._template(model, state)
        self._levels = _template_levels(self._parents, self._ranks, device)
        self._node_trials = torch.zeros(len(self._ranks), dtype=torch.long, device=device)
        self._node_hits = torch.zeros_like(self._node_trials)

    def draft(self, model: PreTrainedModel, state: DecodingState) -> DraftTree:
        B, T = state.sequences.shape[0], len(self._parents)
        context = torch.empty(B, T + 1, dtype=torch.long, device=state.sequences.device)  # the root's previous token,
        context[:, 0], context[:, 1] = _previous_roots(state), state.roots  # then the nodes
        for nodes, parents, grandparents, ranks in self._levels:  # one tree depth at a time, (n,) each
            parent = context[:, parents]  # (B, n)
            successor = self.adjacency[parent, ranks]
            if self.pair_keys is not None:
                key = context[:, grandparents] * len(self.adjacency) + parent  # negative where unknown: no match
                bucket = key % len(self.pair_keys)
                successor = torch.where(self.pair_keys[bucket] == key, self.pair_next[bucket, ranks], successor)
            context[:, nodes] = successor
        return DraftTree(context[:, 1:].contiguous(), self._parents)

    def observe(self, state, tree, logits, path, num_accepted) -> None:
        rows = state.unfinished
        previous = tree.tokens.gather(1, tree.parents.clamp(min=0))  # (B, T) parent token of every node
        previous[:, 0] = _previous_roots(state)
        top = logits[rows].topk(self.topk).indices  # (b, T, topk)
        self._recycle(previous[rows].flatten(), tree.tokens[rows].flatten(), top.flatten(0, 1))
        on_path = torch.zeros_like(tree.tokens, dtype=torch.bool).scatter_(1, path.clamp(min=0), True)[rows]
        tried = on_path.gather(1, tree.parents[rows].clamp(min=0))  # (b, T) parent on the accepted path
        self._node_trials += tried.sum(0)  # per template node; folded into per-rank counts by `_fold_counts`
        self._node_hits += (on_path & tried).sum(0)

    # ----- internals ------------------------------------------------------------------------------------
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

    def _template(self, model: PreTrainedModel, state: DecodingState) -> tuple[torch.LongTensor, torch.LongTensor]:
        if isinstance(self.tree, (list, tuple)):
            return _template_from_paths(self.tree)
        if isinstance(self.tree, int):
            return tree_template(self.tree, self.rank_acceptance)
        device = _device_name(state.sequences.device)
        if not self.forward_costs or self.forward_costs_device != device:  # timed once per kind of device
            self.forward_costs, self.forward_costs_device = self._measure(model, state), device
        # the best tree of n nodes holds the n - 1 likeliest nodes of the biggest one (best-first growth)
        largest = tree_template(max(self.forward_costs), self.rank_acceptance)
        likeliest = sorted(acceptance_probabilities(*largest, self.rank_acceptance)[1:], reverse=True)
        best = max(self.forward_costs, key=lambda size: (1 + sum(likeliest[: size - 1])) / self.forward_costs[size])
        return tree_template(best, self.rank_acceptance)

    def _measure(self, model: PreTrainedModel, state: DecodingState) -> dict[int, float]:
        """Seconds of one verification forward per tree size, on the live cache (cropped back after)."""
        costs = {}
        device = state.sequences.device
        for size in _AUTO_SIZES:
            tokens = state.roots[:, None].repeat(1, size)  # (B, size)
            ancestors = torch.ones(size, size, dtype=torch.bool, device=device).tril().expand(len(tokens), -1, -1)
            mask = state.layout.tree_mask(ancestors, model.dtype)
            positions = state.layout.next_positions()[:, None] + torch.arange(size, device=device)
            times = []
            for _ in range(3):
                _synchronize(device)
                start = time.perf_counter()
                model(input_ids=tokens, attention_mask=mask, position_ids=positions, **cache_kwarg(state.cache))
                _synchronize(device)
                times.append(time.perf_counter() - start)
                state.cache.crop(-size)
            costs[size] = min(times)  # the least disturbed run: other processes only ever add time
        return costs


def _first_occurrences(values: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`(unique, first)`: the distinct values of `values` `(N,)` and the index of the first occurrence of each."""
    unique, inverse = values.unique(return_inverse=True)
    order = torch.arange(len(values), device=values.device)
    return unique, torch.full_like(unique, len(values)).scatter_reduce_(0, inverse, order, "amin")


def _previous_roots(state: DecodingState) -> torch.LongTensor:
    """`(B,)` the token before each row's root (-1 where the row has none)."""
    before = state.lengths - 2
    return state.sequences.gather(1, before.clamp(min=0)[:, None]).squeeze(1).masked_fill(before < 0, -1)


def _template_levels(
    parents: torch.LongTensor, ranks: torch.LongTensor, device: torch.device
) -> list[tuple[torch.LongTensor, ...]]:
    """Per tree depth, `(nodes, parents, grandparents, ranks)` `(n,)` each, as columns of a drafting buffer whose
    column 0 holds the root's previous token and column `i + 1` node `i` (so the root's parent is column 0)."""
    parent_of = parents.tolist()
    depth = [0] * len(parent_of)
    for i in range(1, len(parent_of)):
        depth[i] = depth[parent_of[i]] + 1
    levels = []
    for d in range(1, max(depth, default=0) + 1):
        nodes = [i for i in range(len(parent_of)) if depth[i] == d]
        columns = [
            [i + 1 for i in nodes],
            [parent_of[i] + 1 for i in nodes],
            [parent_of[parent_of[i]] + 1 for i in nodes],
        ]
        levels.append(tuple(torch.tensor(c, device=device) for c in (*columns, ranks[nodes].tolist())))
    return levels


def _template_from_paths(paths: Sequence[Sequence[int]]) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Parents and ranks of a tree given as rank paths from the root (`[[0], [1], [0, 0], ...]`)."""
    index = {(): 0}
    parents, ranks = [-1], [-1]
    for path in sorted((tuple(p) for p in paths), key=lambda p: (len(p), p)):
        if not path or path[:-1] not in index:
            raise ValueError(f"tree path {list(path)} is empty or its parent path {list(path[:-1])} is missing")
        index[path] = len(parents)
        parents.append(index[path[:-1]])
        ranks.append(path[-1])
    return torch.tensor(parents), torch.tensor(ranks)


def _writable(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, cloned if an earlier call under `torch.inference_mode()` made it an inference tensor and this call
    runs outside inference mode (where inference tensors cannot be updated in place)."""
    return tensor.clone() if tensor.is_inference() and not torch.is_inference_mode_enabled() else tensor


def _device_name(device: torch.device) -> str:
    """What forward timings depend on: `"cpu"`, or the accelerator's type and name (`"cuda:NVIDIA H200"`)."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
