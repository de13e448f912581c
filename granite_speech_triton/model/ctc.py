"""Greedy CTC collapse, the one implementation behind every CTC decode in the package.

Greedy CTC reads a frame-wise argmax: merge runs of equal ids first, then drop the blank. The
order matters: a blank between two equal ids keeps both ([a, _, a] -> [a, a]), a run without
one keeps a single copy ([a, a] -> [a]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ctc_collapse_segments(ids: torch.Tensor, lengths: Sequence[int], blank: int) -> list[list[int]]:
    """Collapse several sequences stored back to back in `ids` ([sum(lengths)]) in one pass.

    Runs never continue across a segment boundary. The work stays on the tensor's device and
    only the kept ids come back to the host, once for the whole batch.
    """
    ids = ids.reshape(-1)
    lengths = [int(n) for n in lengths]
    if ids.numel() != sum(lengths):
        raise ValueError(f"{ids.numel()} ids but segment lengths add up to {sum(lengths)}")
    sizes = torch.tensor(lengths, dtype=torch.long, device=ids.device)  # [S]
    new_run = torch.ones_like(ids, dtype=torch.bool)  # [N]
    new_run[1:] = ids[1:] != ids[:-1]
    starts = sizes.cumsum(0) - sizes
    new_run[starts[starts < ids.numel()]] = True  # every segment starts a run
    keep = new_run & (ids != blank)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=ids.device), sizes)  # [N]
    counts = torch.bincount(segment[keep], minlength=len(lengths)).tolist()
    kept = ids[keep].tolist()
    out, offset = [], 0
    for count in counts:
        out.append(kept[offset : offset + count])
        offset += count
    return out


def ctc_collapse(ids: Sequence[int] | torch.Tensor, blank: int) -> list[int]:
    """[a, a, _, a, b, b, _] -> [a, a, b]: merge repeated ids, then drop `blank`."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    return ctc_collapse_segments(ids, [ids.numel()], blank)[0]
