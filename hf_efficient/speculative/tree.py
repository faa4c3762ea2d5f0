"""Draft trees: topology, ancestor masks, depth positions, root-to-node paths, and tree templates.

A draft is a tree whose node 0 is the *root*: the last token already emitted but not yet in the target's KV
cache. Every other node is a draft token whose parent precedes it (topological order), so a chain is the tree
with `parents = [-1, 0, 1, 2, ...]`. Rows of a batch may have different topologies (dynamic trees).

```python
from hf_efficient.speculative.tree import DraftTree, tree_template

parents, ranks = tree_template(size=8, rank_acceptance=[0.6, 0.2, 0.1])
```
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["DraftTree", "acceptance_probabilities", "expected_accepted", "tree_template"]


@dataclass
class DraftTree:
    """A batch of draft trees of `T` nodes each (node 0 = root).

    Args:
        tokens (`torch.LongTensor` of shape `(B, T)`): token id of every node; `tokens[:, 0]` is the root.
        parents (`torch.LongTensor` of shape `(B, T)` or `(T,)`): parent index of every node, `-1` for the root;
            `parents[..., i] < i`. A 1-D tensor is one topology shared by the whole batch.
        draft_probs (`torch.FloatTensor` of shape `(B, T, V)`, *optional*): for trees whose tokens were *sampled*,
            the distribution `q` each node's token was drawn from (at its parent). `None` means every draft token
            is a deterministic pick (`q` one-hot), as for Token Recycling and top-k trees.
    """

    tokens: torch.LongTensor
    parents: torch.LongTensor
    draft_probs: torch.FloatTensor | None = None

    def __post_init__(self) -> None:
        B = self.tokens.shape[0]
        self._paths = self._depth = self._ancestors = None
        if self.parents.dim() == 1:  # one topology for the batch: its paths, depths and mask are computed once
            shared = _shared_topology(tuple(self.parents.tolist()), self.tokens.device)
            self.parents, self._paths, self._depth, self._ancestors = (t.expand(B, *t.shape) for t in shared)
        if self.parents.shape != self.tokens.shape:
            raise ValueError(f"parents shape {tuple(self.parents.shape)} != tokens shape {tuple(self.tokens.shape)}")

    @property
    def size(self) -> int:
        """Number of nodes `T`, root included."""
        return self.tokens.shape[1]

    @property
    def paths(self) -> torch.LongTensor:
        """`(B, T, D + 1)` node indices of the root-to-node path of every node (`-1` past the node's depth).

        `paths[b, i, k]` is the ancestor of node `i` at depth `k` (`paths[b, i, depth(i)] = i`).
        """
        if self._paths is None:
            self._paths = _root_paths(self.parents)
        return self._paths

    @property
    def depth(self) -> torch.LongTensor:
        """`(B, T)` depth of every node (root = 0); the position id offset of the node."""
        if self._depth is None:
            self._depth = (self.paths >= 0).sum(-1) - 1
        return self._depth

    def ancestors(self) -> torch.BoolTensor:
        """`(B, T, T)` mask, `True` where column `j` is an ancestor of (or is) row node `i`."""
        if self._ancestors is None:
            self._ancestors = _ancestor_mask(self.paths)
        return self._ancestors

    def path_tokens(self) -> torch.LongTensor:
        """`(B, T, D + 1)` tokens along each node's root-to-node path (`-1` past the node's depth)."""
        paths = self.paths
        tokens = self.tokens.gather(1, paths.clamp(min=0).flatten(1)).view_as(paths)
        return tokens.masked_fill(paths < 0, -1)


@lru_cache(maxsize=256)  # hybrid drafts graft chains at a few places onto ~15 template sizes
def _shared_topology(
    parents: tuple[int, ...], device: torch.device
) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor, torch.BoolTensor]:
    """Parents `(T,)`, paths `(T, D + 1)`, depths `(T,)` and ancestor mask `(T, T)` of one topology on `device`
    (drafters reuse a few; pass CPU parents to `DraftTree` to look them up without a device sync)."""
    parents = torch.tensor([parents], device=device)
    paths = _root_paths(parents)
    return parents[0], paths[0], (paths[0] >= 0).sum(-1) - 1, _ancestor_mask(paths)[0]


def _ancestor_mask(paths: torch.LongTensor) -> torch.BoolTensor:
    """`(B, T, T)` ancestor-or-self mask from root-to-node paths `(B, T, D + 1)`."""
    B, T, _ = paths.shape
    anc = torch.zeros(B, T, T + 1, dtype=torch.bool, device=paths.device)
    anc.scatter_(2, paths.clamp(min=-1) % (T + 1), True)  # -1 lands in the spare column T
    return anc[..., :T]


def _root_paths(parents: torch.LongTensor) -> torch.LongTensor:
    """Root-to-node index paths `(B, T, D + 1)` from parent pointers `(B, T)` by repeated parent jumps."""
    B, T = parents.shape
    chain = [torch.arange(T, device=parents.device).expand(B, T)]  # chain[k] = k-th ancestor (0 = self)
    while (chain[-1] >= 0).any():
        chain.append(parents.gather(1, chain[-1].clamp(min=0)).masked_fill(chain[-1] < 0, -1))
    chain = torch.stack(chain[:-1], dim=-1)  # (B, T, D + 1): self, parent, ..., root, then -1
    depth = (chain >= 0).sum(-1, keepdim=True) - 1  # (B, T, 1)
    k = torch.arange(chain.shape[-1], device=parents.device)  # (D + 1,)
    paths = chain.gather(-1, (depth - k).clamp(min=0))  # paths[..., k] = ancestor at depth k
    return paths.masked_fill(k > depth, -1)


def tree_template(
    size: int, rank_acceptance: Sequence[float], max_depth: int | None = None
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """The tree of `size` nodes (root included) that maximises the expected number of accepted draft tokens.

    Child `r` of a node is its parent's `r`-th ranked successor (Token Recycling's adjacency rank, a top-k rank),
    accepted with probability `rank_acceptance[r]` when its parent is; a node's value is the product along its
    path, and the best tree holds the `size - 1` highest-valued nodes (greedy best-first, as in Sequoia's
    dynamic-programming view and EAGLE-2's reranking).

    Args:
        size (`int`): number of nodes including the root, `>= 1`.
        rank_acceptance (`Sequence[float]`): acceptance probability of a child by its rank (length = top-k).
        max_depth (`int`, *optional*): deepest draft level allowed.

    Returns:
        `(parents, ranks)`, both `torch.LongTensor` of shape `(size,)` in breadth-first order; the root has
        parent `-1` and rank `-1`.
    """
    if size < 1:
        raise ValueError(f"size={size} must be >= 1 (the root)")
    probs = [min(max(float(p), 1e-9), 1.0) for p in rank_acceptance]
    nodes = [(0, -1, -1, 1.0)]  # (depth, parent, rank, path probability)
    heap = [(-probs[r], r, 0) for r in range(len(probs))]  # candidates as (-value, rank, parent)
    heapq.heapify(heap)
    while len(nodes) < size and heap:
        neg_value, rank, parent = heapq.heappop(heap)
        depth = nodes[parent][0] + 1
        if max_depth is not None and depth > max_depth:
            continue
        nodes.append((depth, parent, rank, -neg_value))
        for r, p in enumerate(probs):
            heapq.heappush(heap, (neg_value * p, r, len(nodes) - 1))
    order = sorted(range(len(nodes)), key=lambda i: (nodes[i][0], nodes[i][1], nodes[i][2]))  # BFS
    new_index = {old: new for new, old in enumerate(order)}
    parents = torch.tensor([new_index.get(nodes[i][1], -1) for i in order])
    ranks = torch.tensor([nodes[i][2] for i in order])
    return parents, ranks


def expected_accepted(parents: torch.LongTensor, ranks: torch.LongTensor, rank_acceptance: Sequence[float]) -> float:
    """Expected number of accepted draft tokens of a template `(parents, ranks)` (both `(T,)`)."""
    return sum(acceptance_probabilities(parents, ranks, rank_acceptance)[1:])


def acceptance_probabilities(
    parents: torch.LongTensor, ranks: torch.LongTensor, rank_acceptance: Sequence[float]
) -> list[float]:
    """Probability that each node of a template is accepted (the root's is 1): the product along its path."""
    value = [1.0]
    for parent, rank in zip(parents.tolist()[1:], ranks.tolist()[1:]):
        value.append(value[parent] * float(rank_acceptance[rank]))
    return value
