"""Where a request's tensors live: moved once, in the shared adapter loop, to the model's device and dtype.

Plain PyTorch (no Triton), so that tests can run each component's predict on what `place` makes.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch

T = TypeVar("T")


def place(value: T, device: torch.device, dtype: torch.dtype) -> T:
    """`value` with every tensor inside it on `device`, floating ones in `dtype`.

    Walks tuples, lists, dicts and dataclasses (a decoded request is any of these); anything else
    is returned as it is. Tensors already in place are not copied.
    """
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, (list, tuple)):
        placed = [place(item, device, dtype) for item in value]
        if all(new is old for new, old in zip(placed, value, strict=True)):
            return value
        return type(value)(*placed) if hasattr(value, "_fields") else type(value)(placed)  # namedtuple or not
    if isinstance(value, dict):
        return {key: place(item, device, dtype) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f.name for f in dataclasses.fields(value) if f.init]
        moved = {name: place(getattr(value, name), device, dtype) for name in fields}
        moved = {name: item for name, item in moved.items() if item is not getattr(value, name)}
        return dataclasses.replace(value, **moved) if moved else value
    return value
