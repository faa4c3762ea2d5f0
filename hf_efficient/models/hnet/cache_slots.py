"""Batch-row and KV-slot helpers of the hierarchical byte models' generation caches (H-Net and HAT).

An inner network steps only the rows whose byte closed a chunk or word, so every cache tensor covers the full batch
and is read and written at a subset of rows. KV lives in `KVSlots`: per layer a (B, H, capacity, D) store whose
slot i of a row holds that row's i-th item (logical position i), so a call writes only its rows, in place, and
reads only their slots; capacity at least doubles when a row needs more.

HAT's folder links to this file, so that each model folder stays a flat set of files for remote code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["KVSlots", "filled_positions", "put_rows", "take_rows"]


def take_rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """`t[rows]` along the batch dimension, or `t` itself when `rows` is `None` (all rows)."""
    return t if rows is None else t.index_select(0, rows)


def put_rows(t: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """Out-of-place `t[rows] = value` (or `value` when `rows` is `None`)."""
    return value if rows is None else t.index_copy(0, rows, value.to(t.dtype))


def filled_positions(count: torch.Tensor, size: int) -> torch.Tensor:
    """Logical position (B, size) of the first `size` slots of rows holding `count` (B,) items; -1 where empty."""
    slot = torch.arange(size, device=count.device)
    return torch.where(slot < count[:, None], slot, -1)


class KVSlots:
    """Keys and values of `layers` attention layers for a batch, in compact per-row slots (see module docstring).

    A call first `place`s its new items (reserving room and locating their slots), then each layer `write`s its new
    keys and values there and `read`s the first `size` slots of the call's rows.
    """

    def __init__(
        self, layers: int, batch_size: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        shape = (batch_size, heads, 0, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]  # (B, H, capacity, D)
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def place(
        self, rows: torch.Tensor | None, count: torch.Tensor, valid: torch.Tensor, position: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Make room for a call's items and locate them.

        Args:
            rows (`torch.Tensor` of shape `(B',)`, *optional*): the batch rows of the call (all if `None`).
            count (`torch.Tensor` of shape `(B',)`): items each of those rows held before the call.
            valid (`torch.Tensor` of shape `(B', L)`): which new items are real (the others are padding).
            position (`torch.Tensor` of shape `(B', L)`): logical position of each valid item (= its slot).

        Returns:
            `tuple`: `key_position` (B', size), the logical position of every slot the rows read (-1 = empty);
            `flat` (B' * H * L,), where each new item goes (padding to a scratch slot past the row's items); `size`.
        """
        total = count + valid.sum(1)  # (B',) items per row after the call
        size = int(total.max()) if total.numel() else 0
        if size + 1 > self.capacity:  # + the scratch slot
            grow = max(size + 1, 2 * self.capacity) - self.capacity
            self.keys = [F.pad(t, (0, 0, 0, grow)) for t in self.keys]
            self.values = [F.pad(t, (0, 0, 0, grow)) for t in self.values]
        key_position = filled_positions(total, size)  # (B', size)
        batch_rows = rows if rows is not None else torch.arange(valid.shape[0], device=valid.device)
        target = torch.where(valid, position, total[:, None])  # (B', L)
        heads = self.keys[0].shape[1]
        head = torch.arange(heads, device=valid.device)[None, :, None]
        # (B', H, L) -> rows of a store viewed as (B * H * capacity, D)
        flat = ((batch_rows[:, None, None] * heads + head) * self.capacity + target[:, None, :]).flatten()
        return key_position, flat, size

    def write(self, layer: int, flat: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a call's new keys and values (B', H, L, D) of `layer` at `flat` (from `place`), in place."""
        for store, new in ((self.keys[layer], keys), (self.values[layer], values)):
            store.view(-1, store.shape[-1]).index_copy_(0, flat, new.reshape(flat.numel(), -1).to(store.dtype))

    def read(self, layer: int, rows: torch.Tensor | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B', H, size, D) of `layer` in the first `size` slots of rows `rows` (all if `None`)."""
        return take_rows(self.keys[layer][:, :, :size], rows), take_rows(self.values[layer][:, :, :size], rows)

    def layer_cache(self, layer: int, rows: torch.Tensor | None, flat: torch.Tensor, size: int) -> _LayerSlots:
        """The duck-typed `Cache` one HF attention layer of a call updates."""
        return _LayerSlots(self, layer, rows, flat, size)

    def apply_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every store `t` by `fn(t)` (batch reordering, selection, repetition, device moves)."""
        self.keys, self.values = [fn(t) for t in self.keys], [fn(t) for t in self.values]


class _LayerSlots:
    """`Cache.update` for one attention layer: writes the new KV into the slots of a call, returns the rows' KV."""

    def __init__(self, slots: KVSlots, layer: int, rows: torch.Tensor | None, flat: torch.Tensor, size: int) -> None:
        self.slots, self.layer, self.rows, self.flat, self.size = slots, layer, rows, flat, size

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.slots.write(self.layer, self.flat, key_states, value_states)
        return self.slots.read(self.layer, self.rows, self.size)
