"""Token Recycling: training-free drafting from an adjacency matrix of each token's recent top-k successors."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from .engine import DecodingState, SpeculativeDecoder
from .tree import DraftTree, expected_accepted, tree_template

__all__ = ["TokenRecycling"]

# prior P(child of rank r accepted | parent accepted), refined online from this object's own verifications
_RANK_PRIOR = (0.45, 0.15, 0.08, 0.05, 0.04, 0.03, 0.02, 0.02)
_PRIOR_WEIGHT = 20.0
# tree sizes `tree="auto"` times; at least 4 nodes, so the per-rank acceptance statistics keep being observed
_AUTO_SIZES = (4, 6, 8, 12, 16, 24, 32, 48, 64, 80)


class TokenRecycling(SpeculativeDecoder):
    """Training-free tree drafting: every verified node's top-k target candidates are *recycled* as drafts.

    The state is an adjacency matrix `(V, topk)`: row `t` holds the target's `topk` most likely successors of
    token `t`, last seen. A draft tree is read from it breadth-first along a template (child of rank `r` =
    `r`-th successor of the parent's token), verified in one target forward, and every verified node overwrites
    its token's row with the target's top-k at that node (accepted or not). The matrix persists across calls
    (`save` / `load` / `reset`).

    Paper: Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large Language Models with Token
    Recycling", ACL 2025, arXiv:2408.08696.

    Args:
        topk (`int`, *optional*, defaults to 8): successors kept per token (the paper's `k`).
        tree (`str`, `int` or `Sequence[Sequence[int]]`, *optional*, defaults to `"auto"`): the draft-tree
            template. `"auto"` times the target forward against tree size on the current device at the first
            call and keeps the size maximising expected tokens per second (re-planned every call from measured
            per-rank acceptance); an `int` is a fixed size (nodes incl. root) of the best template; a list of
            rank paths (e.g. `[[0], [1], [0, 0]]`, the paper's format) is used as given.
        warm_start (`bool`, *optional*, defaults to `True`): seed the rows of the prompt's tokens from the
            prefill logits (costs keeping the prompt's logits once per call).

    Example:

    ```python
    from hf_efficient.speculative import TokenRecycling

    recycling = TokenRecycling(topk=8)
    out = model.generate(**inputs, custom_generate=recycling, max_new_tokens=64, do_sample=False)
    print(recycling.stats.mean_accepted)
    recycling.save("recycling.safetensors")
    ```
    """

    def __init__(self, topk: int = 8, tree: str | int | Sequence[Sequence[int]] = "auto", warm_start: bool = True):
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk={topk} must be >= 1")
        if not (tree == "auto" or isinstance(tree, (int, list, tuple))):
            raise ValueError(f"tree={tree!r}: use 'auto', a node count, or a list of rank paths like [[0], [0, 0]]")
        self.topk = topk
        self.tree = tree
        self.warm_start = warm_start
        self.wants_prompt_logits = warm_start
        self.forward_costs: dict[int, float] = {}
        self.reset()

    # ----- state ----------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the adjacency matrix and the acceptance statistics (not the measured forward costs)."""
        self.adjacency: torch.LongTensor | None = None  # (V, topk)
        prior = torch.tensor([_RANK_PRIOR[r] if r < len(_RANK_PRIOR) else 0.01 for r in range(self.topk)])
        self.rank_hits = prior * _PRIOR_WEIGHT  # (topk,)
        self.rank_trials = torch.full((self.topk,), _PRIOR_WEIGHT)

    def save(self, path: str | os.PathLike) -> None:
        """Write the adjacency matrix and acceptance statistics to a safetensors file."""
        if self.adjacency is None:
            raise ValueError("nothing to save: the adjacency matrix is built by the first generate call")
        tensors = {"adjacency": self.adjacency.cpu(), "rank_hits": self.rank_hits, "rank_trials": self.rank_trials}
        save_file(tensors, os.fspath(path), metadata={"method": "token_recycling", "topk": str(self.topk)})

    def load(self, path: str | os.PathLike) -> TokenRecycling:
        """Restore a state written by `save` (sets `topk` from the file); returns `self`."""
        tensors = load_file(os.fspath(path))
        self.adjacency = tensors["adjacency"].long()
        self.topk = self.adjacency.shape[1]
        self.rank_hits, self.rank_trials = tensors["rank_hits"].float(), tensors["rank_trials"].float()
        return self

    @property
    def rank_acceptance(self) -> list[float]:
        """Estimated probability that a child of rank `r` is accepted when its parent is."""
        return (self.rank_hits / self.rank_trials).tolist()

    # ----- engine hooks ---------------------------------------------------------------------------------
    def start(self, model: PreTrainedModel, state: DecodingState) -> None:
        vocab = model.get_output_embeddings().weight.shape[0]
        device = state.sequences.device
        if self.adjacency is None:
            self.adjacency = torch.arange(self.topk, device=device).repeat(vocab, 1)  # distinct, if uninformed
        if self.adjacency.shape[0] != vocab:
            raise ValueError(
                f"the recycling state was built for a vocabulary of {self.adjacency.shape[0]} tokens, this model "
                f"has {vocab}; call .reset() (or use one TokenRecycling per model)."
            )
        self.adjacency = self.adjacency.to(device)
        if state.prompt_logits is not None:  # logits of the last L prompt tokens (all of them without a cache)
            L, P = state.prompt_logits.shape[1], state.layout.length
            valid = state.layout.valid[:, P - L : P]  # (B, L), padding excluded
            self._recycle(state.sequences[:, P - L : P][valid], state.prompt_logits[valid])
            state.prompt_logits = None
        self._parents, self._ranks = self._template(model, state)

    def draft(self, model: PreTrainedModel, state: DecodingState) -> DraftTree:
        parents, ranks = self._parents.to(state.sequences.device), self._ranks.to(state.sequences.device)
        T = parents.shape[0]
        tokens = state.roots[:, None].repeat(1, T)  # (B, T)
        for i in range(1, T):  # breadth-first: a parent is filled before its children
            tokens[:, i] = self.adjacency[tokens[:, parents[i]], ranks[i]]
        return DraftTree(tokens, parents)

    def observe(self, state, tree, logits, path, num_accepted) -> None:
        rows = state.unfinished
        self._recycle(tree.tokens[rows].flatten(), logits[rows].flatten(0, 1))
        on_path = torch.zeros_like(tree.tokens, dtype=torch.bool).scatter_(1, path.clamp(min=0), True)[rows]
        tried = on_path.gather(1, tree.parents[rows].clamp(min=0))  # (b, T) parent on the accepted path
        tried[:, 0] = False
        ranks = self._ranks.to(tried.device).clamp(min=0)
        self.rank_trials += torch.zeros(self.topk).index_add_(0, ranks.cpu(), tried.sum(0).float().cpu())
        hits = on_path & tried
        self.rank_hits += torch.zeros(self.topk).index_add_(0, ranks.cpu(), hits.sum(0).float().cpu())

    # ----- internals ------------------------------------------------------------------------------------
    def _recycle(self, tokens: torch.LongTensor, logits: torch.Tensor) -> None:
        """`adjacency[tokens] = topk(logits)`; for a token seen several times the first occurrence wins."""
        if tokens.numel() == 0:
            return
        top = logits.topk(self.topk, dim=-1).indices  # (N, topk)
        unique, inverse = tokens.unique(return_inverse=True)
        order = torch.arange(tokens.numel(), device=tokens.device)
        first = torch.full_like(unique, tokens.numel()).scatter_reduce_(0, inverse, order, "amin")
        self.adjacency[unique] = top[first]

    def _template(self, model: PreTrainedModel, state: DecodingState) -> tuple[torch.LongTensor, torch.LongTensor]:
        if isinstance(self.tree, (list, tuple)):
            return _template_from_paths(self.tree)
        if isinstance(self.tree, int):
            return tree_template(self.tree, self.rank_acceptance)
        if not self.forward_costs:
            self.forward_costs = self._measure(model, state)
        best = max(
            self.forward_costs,
            key=lambda size: (
                (1 + expected_accepted(*tree_template(size, self.rank_acceptance), self.rank_acceptance))
                / self.forward_costs[size]
            ),
        )
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
                model(input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=state.cache)
                _synchronize(device)
                times.append(time.perf_counter() - start)
                state.cache.crop(-size)
            costs[size] = min(times)  # the least disturbed run: other processes only ever add time
        return costs


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
