"""Lossless acceptance over a verified draft tree: greedy (longest path matching the target argmax) and sampling.

Sampling is recursive rejection sampling over the tree (SpecInfer, arXiv:2305.09781, §4.2): at a node with
target distribution `p'` the children are tried in order; child `x` drawn from `q` is accepted with
probability `min(1, p'(x) / q(x))`, otherwise `p' <- norm(max(0, p' - q))`. Deterministic drafts (Token
Recycling, top-k trees) have `q = one-hot(x)`, so a rejected token gets `p'(x) = 0` and a duplicate sibling
can never be accepted twice. With a single sampled child this is Leviathan et al.'s Algorithm 1
(arXiv:2211.17192). If no child is accepted the next token is drawn from `p'`.
"""

from __future__ import annotations

import torch

from .tree import DraftTree

__all__ = ["greedy_accept", "sample_accept"]


def greedy_accept(
    tree: DraftTree, scores: torch.Tensor, max_drafts: torch.LongTensor
) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
    """The deepest root-to-node path whose every token equals the target argmax at its parent.

    Args:
        tree (`DraftTree`): the verified tree, `T` nodes.
        scores (`torch.Tensor` of shape `(B, T, V)`): processed target scores at every node.
        max_drafts (`torch.LongTensor` of shape `(B,)`): most draft tokens a row may accept (length budget).

    Returns:
        `(path, num_accepted, next_token)`: `path` `(B, D + 1)` node indices (root first, `-1` padded),
        `num_accepted` `(B,)` accepted draft tokens, `next_token` `(B,)` the target's token after the path.
    """
    B, T = tree.tokens.shape
    target = scores.argmax(-1)  # (B, T)
    correct = tree.tokens == target.gather(1, tree.parents.clamp(min=0))  # (B, T), root compared to itself
    correct[:, 0] = True
    paths = tree.paths  # (B, T, D + 1)
    on_path = correct.gather(1, paths.clamp(min=0).flatten(1)).view_as(paths) | (paths < 0)
    depth = tree.depth
    accepted = on_path.all(-1) & (depth <= max_drafts[:, None])  # (B, T)
    rank = torch.where(accepted, depth * (T + 1) - torch.arange(T, device=depth.device), -1)  # deepest, then first
    best = rank.argmax(-1)  # (B,)
    rows = torch.arange(B, device=best.device)
    return paths[rows, best], depth[rows, best], target[rows, best]


def sample_accept(
    tree: DraftTree, scores: torch.Tensor, max_drafts: torch.LongTensor, generator: torch.Generator | None = None
) -> tuple[torch.LongTensor, torch.LongTensor, torch.LongTensor]:
    """Recursive rejection sampling over the tree; same returns as [`greedy_accept`].

    The returned tokens are distributed exactly as sampling from the processed target distribution token by
    token (`scores` already carry temperature / top-k / top-p).
    """
    B, T = tree.tokens.shape
    probs = torch.softmax(scores.float(), dim=-1)  # (B, T, V)
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    paths = torch.full((B, tree.paths.shape[-1]), -1, dtype=torch.long)
    num_accepted = torch.zeros(B, dtype=torch.long)
    next_token = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        children = [[] for _ in range(T)]
        for i in range(1, T):
            children[parents[b][i]].append(i)
        node, path, budget = 0, [0], int(max_drafts[b])
        while True:
            p = probs[b, node]
            chosen = None
            for child in children[node] if len(path) <= budget else []:
                x = tokens[b][child]
                q = None if tree.draft_probs is None else tree.draft_probs[b, child].float()
                q_x = 1.0 if q is None else float(q[x])
                if torch.rand((), generator=generator).item() * q_x < float(p[x]):
                    chosen = child
                    break
                residual = p.clone() if q is None else (p - q).clamp(min=0)
                if q is None:
                    residual[x] = 0.0
                if residual.sum() > 0:  # p' == q exactly leaves nothing to reject to; keep p'
                    p = residual / residual.sum()
            if chosen is None:
                next_token[b] = torch.multinomial(p, 1, generator=generator).item()
                break
            node = chosen
            path.append(node)
        paths[b, : len(path)] = torch.tensor(path)
        num_accepted[b] = len(path) - 1
    device = tree.tokens.device
    return paths.to(device), num_accepted.to(device), next_token.to(device)
