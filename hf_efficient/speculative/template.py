"""Draft-tree templates for drafting from successor tables (Token Recycling and its hybrid).

A template is a tree of successor ranks: child `r` of a node is its parent's `r`-th recycled successor. Drafting fills
the nodes one depth at a time from the tables; `best_first_templates` gives the best template of every planned size
(`tree="auto"`), `template_from_paths` reads the paper's rank-path format.

```python
from hf_efficient.speculative.template import best_first_templates

templates = best_first_templates((1, 4, 8), 64, rank_acceptance=[0.5, 0.2, 0.1], device="cpu")
templates[8].gain  # expected accepted draft tokens of the best 8-node tree
```
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from .tree import acceptance_probabilities, tree_template

__all__ = ["DraftTemplate", "best_first_templates", "template_from_paths"]


@dataclass
class DraftTemplate:
    """A draft-tree template ready to draft from.

    Attributes:
        parents (`torch.LongTensor` of shape `(n,)`): parent of every node, on the CPU (`DraftTree` caches the
            topology by value).
        ranks (`torch.LongTensor` of shape `(n,)`): successor rank of every node (-1 for the root), on the CPU.
        node_ranks (`torch.LongTensor` of shape `(n - 1,)`): `ranks[1:]` on the drafting device.
        levels (`list`): per tree depth, `(nodes, parents, grandparents, ranks)` `(m,)` each, as columns of a
            drafting buffer whose column 0 holds the root's previous token and column `i + 1` node `i`.
        gain (`float`): expected accepted draft tokens, from the per-rank acceptance.
    """

    parents: torch.LongTensor
    ranks: torch.LongTensor
    node_ranks: torch.LongTensor
    levels: list[tuple[torch.LongTensor, ...]]
    gain: float

    @classmethod
    def by_size(
        cls, parents: torch.LongTensor, ranks: torch.LongTensor, acceptance: Sequence[float], device: torch.device
    ) -> dict[int, DraftTemplate]:
        """`{size: template}` of the template `(parents, ranks)` (both `(n,)`, breadth-first)."""
        gain = sum(acceptance_probabilities(parents, ranks, acceptance)[1:])
        template = cls(parents, ranks, ranks[1:].to(device), _levels(parents, ranks, device), gain)
        return {len(parents): template}

    @property
    def size(self) -> int:
        return len(self.parents)

    @cached_property
    def children(self) -> list[list[int]]:
        """Children of every node, by rank."""
        children: list[list[int]] = [[] for _ in range(self.size)]
        for node, parent in enumerate(self.parents.tolist()[1:], start=1):
            children[parent].append(node)
        return children

    @cached_property
    def spine_end(self) -> int:
        """The deepest node on the rank-0 path from the root."""
        node, ranks = 0, self.ranks.tolist()
        while rank_0 := [child for child in self.children[node] if ranks[child] == 0]:
            node = rank_0[0]
        return node


def best_first_templates(
    sizes: Sequence[int], max_size: int, rank_acceptance: Sequence[float], device: torch.device
) -> dict[int, DraftTemplate]:
    """The best template of every size in `sizes` (up to `max_size` nodes): the best tree of `n` nodes holds the
    `n - 1` likeliest nodes of the largest one (best-first growth, `tree_template`)."""
    parents, ranks = tree_template(max_size, rank_acceptance)
    value = acceptance_probabilities(parents, ranks, rank_acceptance)
    best_first = sorted(range(len(value)), key=lambda i: (-value[i], i))  # a node's parent comes before it
    templates = {}
    for size in (s for s in sizes if s <= len(value)):
        keep = sorted(best_first[:size])  # breadth-first again, so parents still precede their children
        index = {node: i for i, node in enumerate(keep)}
        kept_parents = torch.tensor([index.get(int(parents[node]), -1) for node in keep])
        templates |= DraftTemplate.by_size(kept_parents, ranks[keep], rank_acceptance, device)
    return templates


def template_from_paths(paths: Sequence[Sequence[int]]) -> tuple[torch.LongTensor, torch.LongTensor]:
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


def _levels(
    parents: torch.LongTensor, ranks: torch.LongTensor, device: torch.device
) -> list[tuple[torch.LongTensor, ...]]:
    """`DraftTemplate.levels` of the template `(parents, ranks)` on `device`."""
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
