"""Turns on the CPU for the heavy stages of one server: one forward at a time, first come first served.

Each Triton Python model runs in its own process, and PyTorch gives each process as many threads as
the machine has cores. On a CPU host the Conformer encoder and the AR decoding engine then compute
at once, twice as many busy threads as cores, and each slows the other down by more than it gains
(measured in docs/benchmarks.md). With the lease, a stage computes only while it holds the lease,
with every core's thread, so the stages' work adds up instead of getting in each other's way.

Two `flock` locks on files make the lease, so it works across the stub processes and is released
by the kernel if one dies. The lease file is the CPU; the gate in front of it makes waiting fair: a
stage holds the gate while it waits for the lease, so the engine, which asks again right after each
step, cannot take it back before a waiting encoder has had its turn.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from types import TracebackType


class CpuLease:
    """A context manager: `with lease:` computes in this process's turn."""

    def __init__(self, path: Path) -> None:
        self.cpu = open(path, "a")  # noqa: SIM115 - held for the process's life, like the lock itself
        self.gate = open(path.with_name(path.name + ".gate"), "a")  # noqa: SIM115

    def __enter__(self) -> None:
        fcntl.flock(self.gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self.cpu, fcntl.LOCK_EX)
        finally:
            fcntl.flock(self.gate, fcntl.LOCK_UN)

    def __exit__(self, kind: type | None, value: BaseException | None, trace: TracebackType | None) -> None:
        fcntl.flock(self.cpu, fcntl.LOCK_UN)


def cpu_lease(path: str) -> contextlib.AbstractContextManager:
    """The lease on `path` (the `cpu_lease_file` parameter), or no lease when it is empty."""
    return CpuLease(Path(path)) if path else contextlib.nullcontext()
