"""The scan itself (`ema_scan`); `layers.EMAScan` wraps it for `kernels.kernelize`."""

from __future__ import annotations

import torch

__all__ = ["ema_scan"]

# Below this many elements of `b` the buffers' fixed cost (a clone, two empty tensors, a prefix copy per step) is not
# repaid: on CPU the two paths cross at about 32k elements (B=4, L=128, C=64). Both give identical results.
BUFFERED_MIN_ELEMENTS = 1 << 15


def ema_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """Inclusive scan of `h_t = a_t * h_{t-1} + b_t` along axis 1.

    Args:
        a (`torch.Tensor` of shape `(B, L, C)` or `(B, L, 1)`): decay.
        b (`torch.Tensor` of shape `(B, L, C)`): input.
        h0 (`torch.Tensor` of shape `(B, C)`, *optional*): state before position 0 (zeros if `None`).

    Returns:
        `torch.Tensor` of shape `(B, L, C)`: every `h_t`, identical to the reference scan.
    """
    needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, h0))
    same_dtype = a.dtype == b.dtype and (h0 is None or h0.dtype == b.dtype)
    if b.shape[1] <= 1 or b.numel() < BUFFERED_MIN_ELEMENTS or needs_graph or not same_dtype:
        # `out=` buffers cannot record autograd, and mixed dtypes promote step by step: take the reference path
        return _scan_concatenating(a, b, h0)
    return _scan_buffered(a, b, h0)


def _scan_buffered(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    length = b.shape[1]
    out = b.clone()  # (B, L, C): h after the steps so far
    if h0 is not None:
        out[:, :1] = b[:, :1] + a[:, :1] * h0[:, None]
    spare = torch.empty_like(out)
    decay, decay_buffers = a, None  # `a` belongs to the caller: composed decays go to our own buffers
    shift = 1
    while shift < length:
        # h_t <- h_t + a_t * h_{t-s}: the product first, then the sum (IEEE addition commutes, so the bits match
        # the reference's `b + a * b_prev`)
        spare[:, :shift] = out[:, :shift]
        torch.mul(decay[:, shift:], out[:, :-shift], out=spare[:, shift:])
        spare[:, shift:] += out[:, shift:]
        out, spare = spare, out
        if 2 * shift < length:  # the last step's composed decay would never be read
            if decay_buffers is None:
                decay_buffers = (torch.empty_like(a), torch.empty_like(a))
            target = decay_buffers[0] if decay is not decay_buffers[0] else decay_buffers[1]
            target[:, :shift] = decay[:, :shift]
            torch.mul(decay[:, shift:], decay[:, :-shift], out=target[:, shift:])  # a_t <- a_t * a_{t-s}
            decay = target
        shift *= 2
    return out


def _scan_concatenating(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """The reference algorithm, step for step (autograd, mixed dtypes, sequences of length 0 or 1)."""
    shift, length = 1, b.shape[1]
    if h0 is not None and length > 0:
        first = b[:, :1] + a[:, :1] * h0[:, None]
        b = first if length == 1 else torch.cat([first, b[:, 1:]], dim=1)
    while shift < length:
        b = torch.cat([b[:, :shift], b[:, shift:] + a[:, shift:] * b[:, :-shift]], dim=1)
        a = torch.cat([a[:, :shift], a[:, shift:] * a[:, :-shift]], dim=1)
        shift *= 2
    return b
