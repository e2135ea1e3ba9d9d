"""A static (pre-allocated) KV cache for decoding: written in place, never past its capacity.

Why: the plan-aware cache of :mod:`adaptive_mllm.engine` grows by concatenation, so every decoded token
copies every cached key and value once more and allocates new tensors; that rules out capturing a decode
step (a CUDA graph replays fixed addresses and shapes). Here each row group's keys and values live in one
buffer ``[b, kv_heads_kept, allocated, head_dim]``, the plan's layers / kv heads only, as the growing cache.
A step writes its token at the current length. The capacity is the prefill length + the tokens to decode;
captured steps allocate all of it at prefill, eager steps the prefill + :data:`FIRST_DECODE_ROOM` tokens, the
room for decoded tokens doubled when full (never past the capacity): an answer allowed 1,024 tokens (ScienceQA,
MMBench) that stops after one does not hold memory for the other 1,023, and a long one copies its cache a few
times, not per token.

Two ways to read it, one per kind of decode step:

- ``fixed_shapes=False`` (eager steps): the write is a slice assignment at a host integer and attention
  reads the valid prefix, a view ``[:, :, :length]`` (no compute on unused slots);
- ``fixed_shapes=True`` (captured steps: CUDA graphs, torch.compile): the write is an ``index_copy_`` at a
  device position and attention reads the whole buffer, the unused slots masked out by the key mask
  (``False`` there), so every step has the same shapes and addresses.

The key masks ([B, allocated] bool, real tokens) are static too; after an in-LLM token drop (FastV) the
layers behind it have their own, shorter, side (:class:`Cursor`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FIRST_DECODE_ROOM = 64  # decoded tokens an eager-step cache has room for before it first doubles


class CacheFull(ValueError):
    """A request needs more positions than the static cache allocated."""


@dataclass
class Cursor:
    """Where the next token goes on one side of an in-LLM drop: ``length`` on the host (eager steps, checks)
    and the same number as a device tensor ``position`` [1] (captured steps read it in place)."""

    length: int
    capacity: int
    key_mask: torch.Tensor  # [B, capacity] bool, True = a real token already written (or being written)
    position: torch.Tensor  # [1] long, the slot of the token being written
    prefill_length: int = field(init=False)
    first_capacity: int = field(init=False)  # allocated at the prefill: a rewind goes back to it

    def __post_init__(self) -> None:
        self.prefill_length = self.length
        self.first_capacity = self.capacity

    @classmethod
    def from_prefill(cls, key_mask: torch.Tensor, capacity: int) -> Cursor:
        """The prefill's real-token mask [B, T] copied into a [B, capacity] buffer; fails when T > capacity."""
        batch, length = key_mask.shape
        _check_fits(capacity, length)
        buffer = torch.zeros(batch, capacity, dtype=torch.bool, device=key_mask.device)
        buffer[:, :length] = key_mask
        return cls(length, capacity, buffer, torch.full((1,), length, dtype=torch.long, device=key_mask.device))

    def grow(self, limit: int) -> None:
        """Twice the room for decoded tokens, at most ``limit`` positions (eager steps only: captured steps hold the
        addresses they were captured with); the buffers of :class:`StaticKV` follow at their next write."""
        room = self.capacity - self.prefill_length
        capacity = min(limit, self.prefill_length + max(2 * room, room + 1))
        buffer = self.key_mask.new_zeros(self.key_mask.shape[0], capacity)
        buffer[:, : self.capacity] = self.key_mask
        self.key_mask, self.capacity = buffer, capacity

    def advance(self) -> None:
        """Make room for one new token per row (all real): the mask is written, the position moves."""
        _check_fits(self.capacity, self.length + 1)
        self.key_mask[:, self.length] = True
        self.position.fill_(self.length)
        self.length += 1

    def rewind(self) -> None:
        """Back to the prefill's length and allocation (the decoded tokens forgotten): a benchmark decodes the same
        prefill again, and times the growth a real answer pays."""
        if self.capacity > self.first_capacity:
            self.key_mask, self.capacity = self.key_mask[:, : self.first_capacity].clone(), self.first_capacity
        self.key_mask[:, self.prefill_length :] = False
        self.length = self.prefill_length
        self.position.fill_(self.length)

    def valid_mask(self, fixed_shapes: bool) -> torch.Tensor:
        """[B, T_k] the keys a step attends to: the whole buffer (fixed shapes) or the valid prefix."""
        return self.key_mask if fixed_shapes else self.key_mask[:, : self.length]


@dataclass
class StaticKV:
    """One row group's keys and values in pre-allocated buffers [b, kv_heads_kept, capacity, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor
    cursor: Cursor
    fixed_shapes: bool

    @classmethod
    def from_prefill(cls, keys: torch.Tensor, values: torch.Tensor, cursor: Cursor, fixed_shapes: bool) -> StaticKV:
        """Buffers of ``cursor.capacity`` positions holding the prefill's keys / values [b, kv, T, D] first."""
        length = keys.shape[2]
        if length != cursor.length:
            raise ValueError(f"the prefill cached {length} positions here, its key mask says {cursor.length}")
        size = (keys.shape[0], keys.shape[1], cursor.capacity, keys.shape[3])
        key_buffer, value_buffer = keys.new_zeros(size), values.new_zeros(size)
        key_buffer[:, :, :length] = keys
        value_buffer[:, :, :length] = values
        return cls(key_buffer, value_buffer, cursor, fixed_shapes)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's keys / values [b, kv, 1, D] in place at the cursor (already advanced); returns
        what attention reads: the whole buffers (fixed shapes) or views of the valid prefix."""
        if self.fixed_shapes:
            self.keys.index_copy_(2, self.cursor.position, keys)
            self.values.index_copy_(2, self.cursor.position, values)
            return self.keys, self.values
        if self.keys.shape[2] != self.cursor.capacity:  # the cursor grew (or was rewound): so do the buffers
            self.keys, self.values = _resized(self.keys, self.cursor.capacity), _resized(self.values, self.cursor.capacity)
        end = self.cursor.length
        self.keys[:, :, end - keys.shape[2] : end] = keys
        self.values[:, :, end - values.shape[2] : end] = values
        return self.keys[:, :, :end], self.values[:, :, :end]


@dataclass
class StaticState:
    """The static side of a plan-aware cache: one cursor per side of an in-LLM drop, and the mode."""

    capacity: int  # positions per row at most (prefill + tokens to decode); the cursors may hold fewer yet
    fixed_shapes: bool
    cursor: Cursor  # the layers that see every token
    selected: Cursor | None = None  # the layers behind an in-LLM drop: only the kept tokens

    @classmethod
    def from_prefill(
        cls, key_mask: torch.Tensor, capacity: int, fixed_shapes: bool, selected_mask: torch.Tensor | None = None
    ) -> StaticState:
        """Cursors over the prefill's key masks [B, T] (and [B, T'] behind a drop), with room for all ``capacity``
        positions (fixed shapes) or for :data:`FIRST_DECODE_ROOM` decoded tokens; CacheFull when T > capacity."""
        _check_fits(capacity, key_mask.shape[1])

        def cursor(mask: torch.Tensor) -> Cursor:
            return Cursor.from_prefill(mask, capacity if fixed_shapes else min(capacity, mask.shape[1] + FIRST_DECODE_ROOM))

        return cls(capacity, fixed_shapes, cursor(key_mask), None if selected_mask is None else cursor(selected_mask))

    def advance(self) -> None:
        """Room for one decoded token on every side (a full eager-step side doubles its room, up to the capacity); a clear
        error before anything is written when the capacity is reached."""
        _check_fits(self.capacity, self.cursor.length + 1)
        for side in (self.cursor, self.selected):
            if side is not None:
                if side.length + 1 > side.capacity:
                    side.grow(self.capacity)
                side.advance()

    def rewind(self) -> None:
        self.cursor.rewind()
        if self.selected is not None:
            self.selected.rewind()


def _resized(buffer: torch.Tensor, capacity: int) -> torch.Tensor:
    """``buffer`` [b, kv, positions, D] with ``capacity`` positions, the first ones kept."""
    resized = buffer.new_zeros(*buffer.shape[:2], capacity, buffer.shape[3])
    kept = min(capacity, buffer.shape[2])
    resized[:, :, :kept] = buffer[:, :, :kept]
    return resized


def _check_fits(capacity: int, requested: int) -> None:
    if requested > capacity:
        raise CacheFull(
            f"the static KV cache holds {capacity} positions per row, this request needs {requested}: allocate it "
            "for the prompt plus the tokens to decode (or decode with `decode: eager`)"
        )
