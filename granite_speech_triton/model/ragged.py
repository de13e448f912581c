"""Several sequences stored end to end ("packed"): the index arithmetic behind every ragged batch.

Shared by the eager model and the TorchScript modules of `export`, so both run the same code:
every function here is plain tensor code that TorchScript compiles.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ragged_index(lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Lengths [B] -> (sequence, position within it) of each packed element, both [sum lengths]."""
    sequences = torch.arange(lengths.shape[0], device=lengths.device)
    owner = torch.repeat_interleave(sequences, lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(owner.shape[0], device=lengths.device) - starts[owner]
    return owner, position


def join_segments(first: Tensor, first_lengths: Tensor, second: Tensor, second_lengths: Tensor) -> Tensor:
    """Two packed batches [sum A, D] and [sum S, D] -> per sequence [first_i ; second_i], packed [sum A+S, D]."""
    lengths = first_lengths + second_lengths
    starts = torch.cumsum(lengths, 0) - lengths
    out = first.new_zeros([int(lengths.sum()), first.shape[1]])
    owner, position = ragged_index(first_lengths)
    out[starts[owner] + position] = first
    owner, position = ragged_index(second_lengths)
    out[starts[owner] + first_lengths[owner] + position] = second
    return out


def take_second(joined: Tensor, first_lengths: Tensor, second_lengths: Tensor) -> Tensor:
    """The inverse half of `join_segments`: the `second` rows of each sequence, packed [sum S, ...]."""
    lengths = first_lengths + second_lengths
    starts = torch.cumsum(lengths, 0) - lengths
    owner, position = ragged_index(second_lengths)
    return joined[starts[owner] + first_lengths[owner] + position]


def pack_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's total length stays within `budget`.

    A sequence longer than the budget gets a group of its own.
    """
    groups: list[list[int]] = []
    total = budget + 1
    for index, length in enumerate(lengths):
        if total + length > budget:
            group: list[int] = []
            groups.append(group)
            total = 0
        groups[-1].append(index)
        total += length
    return groups
