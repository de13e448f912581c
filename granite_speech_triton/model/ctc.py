"""Greedy CTC collapse, the one implementation behind every CTC decode in the package.

Greedy CTC reads a frame-wise argmax: merge runs of equal ids first, then drop the blank. The
order matters: a blank between two equal ids keeps both ([a, _, a] -> [a, a]), a run without
one keeps a single copy ([a, a] -> [a]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .ragged import ragged_index


def ctc_keep(ids: Tensor, lengths: Tensor, blank: int) -> tuple[Tensor, Tensor]:
    """Greedy CTC collapse of segments stored back to back, as tensors (TorchScript compiles it).

    ids [sum lengths], lengths [S] -> (the kept ids, packed; kept per segment [S]). Runs never
    continue across a segment boundary, and the work stays on the ids' device.
    """
    new_run = torch.ones_like(ids, dtype=torch.bool)  # [N]
    new_run[1:] = ids[1:] != ids[:-1]
    starts = torch.cumsum(lengths, 0) - lengths
    new_run[starts[lengths > 0]] = True  # every segment starts a run
    keep = new_run & (ids != blank)
    owner, _ = ragged_index(lengths)
    return ids[keep], torch.bincount(owner[keep], minlength=lengths.shape[0])


def ctc_collapse_segments(ids: torch.Tensor, lengths: Sequence[int], blank: int) -> list[list[int]]:
    """`ctc_keep` on several sequences stored back to back in `ids` ([sum(lengths)]), as Python lists.

    Only the kept ids come back to the host, once for the whole batch.
    """
    ids = ids.reshape(-1)
    lengths = [int(n) for n in lengths]
    if ids.numel() != sum(lengths):
        raise ValueError(f"{ids.numel()} ids but segment lengths add up to {sum(lengths)}")
    kept, counts = ctc_keep(ids, torch.tensor(lengths, dtype=torch.long, device=ids.device), blank)
    kept_ids, out, offset = kept.tolist(), [], 0
    for count in counts.tolist():
        out.append(kept_ids[offset : offset + count])
        offset += count
    return out


def ctc_collapse(ids: Sequence[int] | torch.Tensor, blank: int) -> list[int]:
    """[a, a, _, a, b, b, _] -> [a, a, b]: merge repeated ids, then drop `blank`."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    return ctc_collapse_segments(ids, [ids.numel()], blank)[0]
