"""Triton's flat ragged batches, as the exported modules receive and return them (TorchScript compiles these).

Triton's PyTorch backend does not pad: a ragged input arrives as one flat tensor, the requests'
elements end to end, with `<INPUT>_OFFSETS` [B + 1] element offsets beside it (see the package
docstring). The model's own packing (model/ragged.py) does the rest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.ragged import ragged_index


def segment_lengths(offsets: Tensor, width: int) -> Tensor:
    """Element offsets [B + 1] of a flat ragged input -> rows per request [B] (rows of `width` elements)."""
    offsets = offsets.to(torch.long)
    return torch.div(offsets[1:] - offsets[:-1], width, rounding_mode="floor")


def pad_packed(rows: Tensor, owner: Tensor, position: Tensor, lengths: Tensor) -> Tensor:
    """Packed rows [N, F] -> zero-padded [B, max(lengths), F]."""
    longest = int(lengths.max()) if lengths.numel() > 0 else 0
    padded = rows.new_zeros([lengths.shape[0], longest, rows.shape[1]])
    padded[owner, position] = rows
    return padded


def pack_windows(rows: Tensor, lengths: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Packed rows [N, H] -> (windows [sum ceil(len / window), window, H] zero-padded per request, windows [B])."""
    counts = torch.div(lengths + window - 1, window, rounding_mode="floor")
    first = torch.cumsum(counts, 0) - counts
    owner, position = ragged_index(lengths)
    windows = rows.new_zeros([int(counts.sum()), window, rows.shape[1]])
    windows[first[owner] + torch.div(position, window, rounding_mode="floor"), position % window] = rows
    return windows, counts


def take_leading(rows: Tensor, available: Tensor, keep: Tensor) -> Tensor:
    """Packed rows, `available` [B] per request -> the first `keep` [B] rows of each request, packed."""
    starts = torch.cumsum(available, 0) - available
    owner, position = ragged_index(keep)
    return rows[starts[owner] + position]


def drop_negative(ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Packed ids with -1 padding -> (the non-negative ids packed, count per request [B])."""
    owner, _ = ragged_index(lengths)
    keep = ids >= 0
    return ids[keep], torch.bincount(owner[keep], minlength=lengths.shape[0])


def place_padded(values: Tensor, counts: Tensor, slots: Tensor, fill: int) -> Tensor:
    """Packed values (counts [B] per request) -> packed [sum slots], each request's values first, `fill` after."""
    out = torch.full([int(slots.sum())], fill, dtype=values.dtype, device=values.device)
    owner, position = ragged_index(counts)
    starts = torch.cumsum(slots, 0) - slots
    out[starts[owner] + position] = values
    return out


def check_rows(name: str, expected: Tensor, offsets: Tensor) -> None:
    """Fail the batch if a shape-only input (AUDIO_ROWS) does not announce `expected` [B] rows per request."""
    announced = segment_lengths(offsets, 1)
    if not bool(torch.equal(announced, expected)):
        raise RuntimeError(name + " must have one element per projector output row (the checkpoint window's rule)")
