"""The few-row product kernel of `rows_kernel.c`: built on first use, loaded with ctypes.

On the 2-core AMD EPYC of docs/benchmarks.md oneMKL multiplies 8 rows by a 2048 -> 8192 weight
in about 5.7 ms, twice the time it takes to read the weight once, which is all a decode step
needs; the kernel takes 3.7 ms, and 4 rows (or one, padded to 4) cost less than oneMKL's
matrix-vector product for one row. The kernel needs an x86-64 CPU with AVX2 and FMA and a C
compiler (`$CC`, else `cc` or `gcc`) when first used; without them `library()` is None and the
engine keeps oneMKL (model/linear.py).

The shared library is compiled once per source and compiler into a cache folder
(`$XDG_CACHE_HOME/granite-speech-triton`, else `~/.cache/...`, else the temporary folder), under
a name that holds the source's hash; processes that build it at once each write their own file
and rename it into place.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("rows_kernel.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp")
ROW_MULTIPLE = 4  # the kernel takes rows in fours
K_MULTIPLE = 8  # and the inner dimension in eights (one AVX2 register)
BUILD_TIMEOUT_S = 120


def compiler() -> str | None:
    """The C compiler to build with: $CC, else cc or gcc on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cache_dir() -> Path:
    """A writable folder for the built library."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    for folder in (Path(base) / "granite-speech-triton", Path(tempfile.gettempdir()) / "granite-speech-triton"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise OSError("no writable cache folder for the rows kernel")


def build(cc: str) -> Path:
    """The library built from SOURCE with `cc` (reused when already built)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join((cc, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"rows_kernel-{digest}.so"
    if target.is_file():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    command = [cc, *FLAGS, str(SOURCE), "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")
    os.replace(partial, target)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot run here (the reason is logged once)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        log.info("rows kernel: not an x86-64 Linux host; oneMKL multiplies the decode steps")
        return None
    cc = compiler()
    if cc is None:
        log.warning("rows kernel: no C compiler ($CC, cc, gcc); oneMKL multiplies the decode steps")
        return None
    try:
        lib = ctypes.CDLL(str(build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("rows kernel: could not build or load it (%s); oneMKL multiplies the decode steps", exc)
        return None
    if not lib.rows_kernel_supported():
        log.info("rows kernel: this CPU lacks AVX2 or FMA; oneMKL multiplies the decode steps")
        return None
    lib.rows_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.rows_matmul.restype = ctypes.c_int
    return lib


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel multiplies rows like x's [..., K] by weight [N, K]^T, once they are padded
    to a multiple of ROW_MULTIPLE rows and laid out contiguously."""
    return (
        x.dtype == weight.dtype == torch.float32
        and x.device.type == weight.device.type == "cpu"
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and x.shape[-1] % K_MULTIPLE == 0
        and weight.is_contiguous()
    )


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel takes x [R, K] @ weight [N, K]^T as they are (no copies)."""
    return takes(x, weight) and x.dim() == 2 and x.shape[0] % ROW_MULTIPLE == 0 and x.is_contiguous()


def rows_matmul(x: torch.Tensor, weight: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """x [R, K] @ weight [N, K]^T -> [R, N] with the kernel; `fits(x, weight)` must hold."""
    lib = library()
    if lib is None or not fits(x, weight):
        raise ValueError("the rows kernel is not available here or does not take these tensors")
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    threads = threads or torch.get_num_threads()
    status = lib.rows_matmul(x.data_ptr(), weight.data_ptr(), out.data_ptr(), *x.shape, weight.shape[0], threads)
    if status != 0:
        raise ValueError(f"the rows kernel refused shapes {tuple(x.shape)} x {tuple(weight.shape)}")
    return out
