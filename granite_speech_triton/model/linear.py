"""Linear layers for the decoding engine's few-row products on the CPU.

A decode step multiplies a handful of rows (one per live request) by every weight matrix of the
LLM. `nn.Linear` computes that as x @ W^T, and the CPU BLAS that PyTorch ships (oneMKL) is slow
at that shape: on the 2-core AMD EPYC of docs/benchmarks.md, 16 rows through a 2048 -> 8192
projection took about 3x as long as W @ x^T, the same product with the weight as the left
operand, and a decode step of 2 rows took twice as long as one of 1 row. `RowsLinear` takes the
W @ x^T form for 2 to `MAX_ROWS` rows and leaves one row (a matrix-vector product, already
fast) and long inputs (prefills: the x @ W^T form is as fast or faster there) to `nn.Linear`.

oneMKL is also uneven in the row count itself: on the same CPU, 16 rows through a 2048 -> 8192
projection cost 7.7 ms and 15 rows 15.9 ms, 4 rows 3.8 ms and 3 rows 5.3 ms (median of 5; its
fast kernels take a multiple of 4 or 8 columns). `RowsLinear` therefore pads the rows with zeros
to such a count and drops the padding's outputs.

Where it can run (x86-64 with AVX2 and FMA, a C compiler at first use), `KernelRowsLinear` does
better than either oneMKL form: its kernel (model/rows_kernel.c) reads each weight row once and
multiplies it with all the rows, so a step of 1 to `KERNEL_MAX_ROWS` rows costs little more than
reading the weights (docs/benchmarks.md, run H).

All forms compute the same dot products; the summation order inside a dot product differs, which
changes float32 results in the last bits, as any change of batch size already does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import rows_kernel

MAX_ROWS = 64  # above this many rows, x @ W^T is as fast (measured up to 2048 rows)


def padded_rows(rows: int) -> int:
    """The row count oneMKL multiplies fastest that holds `rows`: 4 for 2-4, else a multiple of 8."""
    return 4 if rows <= 4 else -(-rows // 8) * 8


def row_count(x: torch.Tensor) -> int:
    """The rows of x [..., in]: all its leading dimensions flattened."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def multiply_rows(
    x: torch.Tensor, padded: int, product: Callable[[torch.Tensor], torch.Tensor], bias: torch.Tensor | None
) -> torch.Tensor:
    """x [..., in] as rows, zero-padded to `padded` rows, through `product` ([padded, in] -> [padded,
    out]); the padding's outputs dropped and the bias added -> [..., out]."""
    rows = row_count(x)
    flat = x.reshape(rows, x.shape[-1])
    if padded > rows:
        flat = torch.nn.functional.pad(flat, (0, 0, 0, padded - rows))
    out = product(flat.contiguous())[:rows].contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


class RowsLinear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) that multiplies 2..MAX_ROWS rows as W @ x^T,
    padded to `padded_rows`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = row_count(x)
        if not 2 <= rows <= MAX_ROWS:
            return super().forward(x)
        return multiply_rows(x, padded_rows(rows), lambda flat: torch.mm(self.weight, flat.T).T, self.bias)


KERNEL_MAX_ROWS = 24  # above this many rows oneMKL's W @ x^T is as fast (measured up to 64)


class KernelRowsLinear(RowsLinear):
    """RowsLinear that multiplies 1..KERNEL_MAX_ROWS rows with the rows kernel (model/rows_kernel.py),
    padded to a multiple of four; other inputs, and weights the kernel does not take, go to RowsLinear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = row_count(x)
        if not 1 <= rows <= KERNEL_MAX_ROWS or not rows_kernel.takes(x, self.weight):
            return super().forward(x)
        padded = -(-rows // rows_kernel.ROW_MULTIPLE) * rows_kernel.ROW_MULTIPLE
        return multiply_rows(x, padded, lambda flat: rows_kernel.rows_matmul(flat, self.weight), self.bias)


def use_rows_linears(module: nn.Module, kernel: bool = True) -> nn.Module:
    """Make every plain nn.Linear of `module` a few-row linear when it lives on the CPU; returns `module`.

    The layers become KernelRowsLinear where `kernel` is asked for and the kernel runs here, else
    RowsLinear. On a GPU the BLAS handles few rows well, and nothing changes."""
    layers = [m for m in module.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"]
    few_rows = KernelRowsLinear if layers and kernel and rows_kernel.library() is not None else RowsLinear
    for layer in layers:
        layer.__class__ = few_rows
    return module
