"""What one decode step of the AR engine costs by the number of rows, with the LLM's linear layers
as `nn.Linear` (x @ W^T), as `RowsLinear` (oneMKL's W @ x^T for 2-64 rows) and as
`KernelRowsLinear` (the rows kernel, where it runs here), side by side in one run.

    python -m granite_speech_triton.bench_step --ar-checkpoint build/real-ar [--rows 1,2,4,8,16]

Each row first holds a prefilled prompt of `--prompt` positions; a step's time is the median of
`--repeats` steps from that same state. Each form's logits are compared with nn.Linear's (largest
difference).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .bench import environment, parse_levels
from .model import rows_kernel
from .model.decoder import load_ar_decoder
from .model.engine import EngineConfig
from .model.linear import KernelRowsLinear, RowsLinear
from .model.runner import GraniteRunner, PrefillInput
from .model.weights import parse_dtype, resolve_checkpoint
from .serving.repository import DEVICES, DTYPES

PLAIN = "x @ W^T (nn.Linear)"
FORMS = {PLAIN: nn.Linear, "W @ x^T (RowsLinear)": RowsLinear, "rows kernel (KernelRowsLinear)": KernelRowsLinear}


def forms_here() -> dict[str, type[nn.Linear]]:
    """The forms this host runs: the rows kernel only where it builds and the CPU has AVX2 and FMA."""
    kernel = rows_kernel.library() is not None
    return {name: form for name, form in FORMS.items() if kernel or form is not KernelRowsLinear}


def set_linear_form(module: nn.Module, form: type[nn.Linear]) -> None:
    """Every linear layer of `module` computes as `form` (the parameters stay)."""
    for layer in module.modules():
        if type(layer) in FORMS.values():
            layer.__class__ = form


def prefill_rows(runner: GraniteRunner, rows: int, prompt: int) -> None:
    """Fill rows 0..rows-1 of the KV pool with a prompt of `prompt` text positions each."""
    token = min({0, 1, 2} - {runner.audio_token_index})
    empty = torch.zeros(0, runner.llm.config.hidden_size, device=runner.device, dtype=runner.llm.dtype)
    runner.pool.reserve(rows, prompt + 64)
    runner.prefill([PrefillInput([token] * prompt, empty, [], row, [prompt - 1]) for row in range(rows)])


def time_steps(runner: GraniteRunner, rows: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of a decode step of `rows` rows, each from the same KV state; its logits."""
    saved = runner.pool.lengths.clone()
    seconds, logits = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        logits = runner.decode([7] * rows, [True] * rows)
        seconds.append(time.perf_counter() - started)
        runner.pool.lengths.copy_(saved)
    return statistics.median(seconds), logits


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = resolve_checkpoint(args.ar_checkpoint)
    decoder = load_ar_decoder(path, args.device, parse_dtype(args.dtype), EngineConfig(max_rows=max(args.rows)))
    runner = decoder.engine.runner
    prefill_rows(runner, max(args.rows), args.prompt)
    table = []
    for rows in args.rows:
        row: dict[str, Any] = {"rows": rows}
        logits = {}
        for name, form in forms_here().items():
            set_linear_form(runner.llm, form)
            row[name], logits[name] = time_steps(runner, rows, args.repeats)
        row["max_logit_difference"] = {
            name: float((logits[PLAIN] - logits[name]).abs().max()) for name in logits if name != PLAIN
        }
        table.append(row)
        times = ", ".join(f"{name} {row[name]:.3f} s ({row[PLAIN] / row[name]:.2f}x)" for name in logits)
        differences = ", ".join(f"{diff:.1e}" for diff in row["max_logit_difference"].values())
        print(f"{rows:3d} rows: {times}; max |logit difference| from nn.Linear {differences}", flush=True)
    result = {"checkpoint": str(args.ar_checkpoint), "prompt": args.prompt, "repeats": args.repeats}
    result |= {"device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads()}
    result |= {"steps": table, "environment": environment()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser = argparse.ArgumentParser(prog="python -m granite_speech_triton.bench_step", description=description)
    parser.add_argument("--ar-checkpoint", required=True, help="AR checkpoint directory or hub id")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--rows", type=parse_levels, default=(1, 2, 4, 8, 16), help="default 1,2,4,8,16")
    parser.add_argument("--prompt", type=int, default=200, help="prefilled positions per row (default 200)")
    parser.add_argument("--repeats", type=int, default=5, help="steps timed per point (default 5)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
