"""Two devices on one CPU: a check that model code never mixes a request's host tensors with the model's.

On a GPU, an op that combines a host tensor with a GPU tensor fails ("Expected all tensors to be on
the same device"); on a CPU-only machine nothing fails, so that class of bug hides until the first
GPU run. `DeviceDiscipline` brings it back on the CPU: every tensor carries a side, HOST (what a
Triton adapter decodes from a request, and what torch creates without a `device=`) or DEVICE (the
model's parameters and buffers, what `.to(device=...)` and `device=` factories make, and what is
computed from them), and an op that mixes the two sides raises `DeviceMixError`, as CUDA would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

HOST, DEVICE = "host", "device"
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}  # CUDA accepts host index tensors
TO_HOST = {torch.Tensor.cpu, torch.Tensor.numpy}


class DeviceMixError(RuntimeError):
    """An op combined host tensors with device tensors: it would fail on a GPU."""


class DeviceDiscipline(TorchFunctionMode):
    """Tracks the side of every tensor that torch functions see while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.sides: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def mark(self, value: object, side: str) -> None:
        """Put every tensor inside `value` (nested lists, tuples, dicts) on `side`."""
        for tensor in _tensors(value):
            self.sides[tensor] = side

    def side(self, tensor: torch.Tensor) -> str | None:
        return self.sides.get(tensor)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = list(_tensors((args, kwargs)))
        sides = {self.sides.get(t) for t in tensors if _counts(func, t, self.sides.get(t))} - {None}
        if len(sides) > 1 and func is not torch.Tensor.copy_:
            raise DeviceMixError(f"{getattr(func, '__name__', func)} mixes host and device tensors")
        out = func(*args, **kwargs)
        side = _result_side(func, args, kwargs, tensors, sides, self.sides)
        if side is not None:
            self.mark(out, side)
        return out


def _tensors(value: object) -> Iterator[torch.Tensor]:
    return (t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))


def _counts(func, tensor: torch.Tensor, side: str | None) -> bool:
    """Whether a tensor argument must be on the op's device: CUDA lets 0-dim host tensors (scalars)
    and host index tensors through."""
    if tensor.dim() == 0:
        return False
    return not (func in INDEXING and side == HOST and not tensor.is_floating_point())


def _result_side(func, args, kwargs, tensors, sides, known) -> str | None:
    if func in TO_HOST:
        return HOST
    if func is torch.Tensor.to and _names_a_device(args[1:], kwargs):
        return DEVICE  # a transfer (on one CPU, every .to(device) stands for host -> device)
    if func is torch.Tensor.copy_:
        return known.get(args[0])
    if not tensors:  # a factory: torch.tensor, arange, zeros, ...
        return DEVICE if kwargs.get("device") is not None else HOST
    return next(iter(sides)) if sides else None


def _names_a_device(args: tuple, kwargs: dict) -> bool:
    values = [*args, kwargs.get("device")]
    return any(isinstance(v, (torch.device, str, torch.Tensor)) for v in values if v is not None)
