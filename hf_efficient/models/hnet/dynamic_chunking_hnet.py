"""H-Net dynamic chunking: routing module, chunk (downsample), de-chunk (EMA smoothing + upsample), STE, ratio loss.

Paper: H-Net, "Dynamic Chunking for End-to-End Hierarchical Sequence Modeling" (Hwang, Wang, Gu, 2025,
arXiv:2507.07955), §2.2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .layers_hnet import HNetEMAScan, linear_scan

__all__ = ["HNetDeChunk", "HNetRouter", "chunk", "dechunk", "ratio_loss", "straight_through"]


class HNetRouter(nn.Module):
    """Boundary probability from the cosine dissimilarity of adjacent projected states (§2.2.1):

    `p_t = (1 - cos(W_q h_{t-1}, W_k h_t)) / 2`, `p = 1` at the first valid position of a sequence, boundary iff
    `p_t > 0.5`. `W_q` and `W_k` start at the identity.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(
        self,
        hidden: torch.Tensor,
        valid: torch.Tensor,
        last_hidden: torch.Tensor | None = None,
        has_history: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden (`torch.Tensor` of shape `(B, L, D)`): encoder output.
            valid (`torch.Tensor` of shape `(B, L)`): non-padding positions (one contiguous run per row).
            last_hidden (`torch.Tensor` of shape `(B, D)`, *optional*): encoder output before position 0 (cache).
            has_history (`torch.Tensor` of shape `(B,)`, *optional*): whether `last_hidden` is real.

        Returns:
            `tuple(torch.Tensor, torch.Tensor)`: boundary probabilities `p` (B, L) (0 at padding) and the boundary
            mask `b` (B, L).
        """
        batch = hidden.shape[0]
        if last_hidden is None:
            last_hidden = hidden.new_zeros(batch, hidden.shape[-1])
            has_history = valid.new_zeros(batch)
        queries = self.q_proj(torch.cat([last_hidden[:, None], hidden[:, :-1]], dim=1))  # (B, L, D): W_q h_{t-1}
        cos = F.cosine_similarity(queries, self.k_proj(hidden), dim=-1)  # (B, L)
        p = ((1 - cos) / 2).clamp(0.0, 1.0)
        prev_valid = torch.cat([has_history[:, None], valid[:, :-1]], dim=1)
        p = torch.where(prev_valid, p, 1.0)  # the first byte of every sequence opens a chunk
        p = torch.where(valid, p, 0.0)
        return p, (p > 0.5) & valid


def straight_through(confidence: torch.Tensor) -> torch.Tensor:
    """STE (§2.2.2): exactly 1 in the forward pass, identity gradient to `confidence` in the backward pass."""
    return torch.ones_like(confidence) + (confidence - confidence.detach())


def chunk(hidden: torch.Tensor, boundary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the boundary positions, packed to the left (downsampling).

    Args:
        hidden (`torch.Tensor` of shape `(B, L, D)`), boundary (`torch.Tensor` of shape `(B, L)`).

    Returns:
        `tuple`: chunk vectors (B, M, D), chunk validity (B, M) and their source positions (B, M), with M the
        largest number of boundaries in a row.
    """
    length = boundary.shape[1]
    key = (~boundary).long() * length + torch.arange(length, device=boundary.device)  # boundaries first, in order
    num = int(boundary.sum(1).max()) if boundary.numel() else 0
    index = key.argsort(dim=1)[:, :num]  # (B, M)
    chunks = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
    return chunks, boundary.gather(1, index), index


def dechunk(
    inner: torch.Tensor,
    chunk_prob: torch.Tensor,
    chunk_valid: torch.Tensor,
    boundary: torch.Tensor,
    last_value: torch.Tensor,
    scan: Callable[..., torch.Tensor] = linear_scan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EMA smoothing over chunks (`z̄_j = P_j ẑ_j + (1 - P_j) z̄_{j-1}`, a parallel scan in fp32) then upsampling
    (every byte takes the value of the latest chunk it belongs to), §2.2.3.

    Args:
        inner (`torch.Tensor` of shape `(B, M, D)`): inner-network output per chunk.
        chunk_prob (`torch.Tensor` of shape `(B, M)`): boundary probability of each chunk.
        chunk_valid (`torch.Tensor` of shape `(B, M)`): non-padding chunks.
        boundary (`torch.Tensor` of shape `(B, L)`): boundary mask of the byte positions.
        last_value (`torch.Tensor` of shape `(B, D)`): smoothed value before the first new chunk (cache).
        scan (`Callable`, *optional*, defaults to `linear_scan`): the EMA scan, e.g. a (kernelized) `HNetEMAScan`.

    Returns:
        `tuple`: upsampled values (B, L, D) and the smoothed value of the last chunk (B, D).
    """
    prob = chunk_prob.float().clamp(1e-4, 1 - 1e-4)[..., None]  # (B, M, 1)
    valid = chunk_valid[..., None]
    decay = torch.where(valid, 1 - prob, 1.0)
    smoothed = scan(decay, torch.where(valid, prob * inner.float(), 0.0), last_value.float())  # (B, M, D)
    new_last = smoothed[:, -1] if smoothed.shape[1] else last_value.float()
    index = boundary.long().cumsum(1) - 1  # (B, L): chunk of each byte, -1 = still in the cached chunk
    up = smoothed.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, inner.shape[-1])) if smoothed.shape[1] else 0
    up = torch.where((index >= 0)[..., None], up, last_value.float()[:, None])
    return up.to(inner.dtype), new_last.to(inner.dtype)


class HNetDeChunk(nn.Module):
    """`dechunk` with its EMA scan as a submodule (`HNetEMAScan`), so `kernels.kernelize` reaches the scan."""

    def __init__(self) -> None:
        super().__init__()
        self.scan = HNetEMAScan()

    def forward(
        self,
        inner: torch.Tensor,
        chunk_prob: torch.Tensor,
        chunk_valid: torch.Tensor,
        boundary: torch.Tensor,
        last_value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See `dechunk`: inner (B, M, D), chunk_prob/chunk_valid (B, M), boundary (B, L), last_value (B, D)."""
        return dechunk(inner, chunk_prob, chunk_valid, boundary, last_value, scan=self.scan)


def ratio_loss(prob: torch.Tensor, boundary: torch.Tensor, valid: torch.Tensor, target: float) -> torch.Tensor:
    """Ratio loss (§2.3.1): `N/(N-1) * ((N-1) F G + (1-F)(1-G))`, F = fraction of boundaries, G = mean probability.

    Equals 1 at its minimum F = G = 1/N (N = `target` bytes per chunk).
    """
    n = valid.sum().clamp(min=1)
    frac = (boundary & valid).sum() / n
    mean_prob = (prob * valid).sum() / n
    return target / (target - 1) * ((target - 1) * frac * mean_prob + (1 - frac) * (1 - mean_prob))
