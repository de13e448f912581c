"""Checking an exported module against the eager one it was made from, on unseen lengths."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TOLERANCES = {  # (atol, rtol) between exported and eager float outputs, per dtype
    "float32": (1e-4, 1e-4),
    "bfloat16": (5e-2, 5e-2),
    "float16": (1e-2, 1e-2),
}
# Integer outputs (draft and transcript ids) must be equal in float32. In half precision the exported
# graph may round differently from the eager one and flip a near-tie argmax: the token error rate
# (edit distance over reference tokens, all verification requests together) is reported and may not
# exceed this bound. Both sides run in the same dtype, so it measures the export alone.
HALF_PRECISION_ID_ERROR_BOUND = 0.02
VERIFY_FRAMES = ((457, 3, 201), (16,))  # lengths none of the trace examples use


class ExportError(RuntimeError):
    """An exported module does not reproduce its eager counterpart."""


@dataclass
class Built:
    """An exported module with the eager function it must reproduce on the same inputs."""

    module: torch.jit.ScriptModule
    reference: Callable[[list[list[Tensor]]], list[list[Tensor]]]  # per-request inputs -> per-request outputs
    example: Callable[[list[int], torch.Generator], list[list[Tensor]]]  # frame counts -> per-request inputs
    scatter: tuple[int | None, ...]  # per output: the input whose rows split it per request; None: [B, M]
    metadata: dict


@dataclass
class IdErrors:
    """Token edits between exported and eager ids, over every id output checked."""

    edits: int = 0
    reference_tokens: int = 0

    def add(self, out: list[int], ref: list[int]) -> None:
        self.edits += edit_distance(out, ref)
        self.reference_tokens += len(ref)

    @property
    def rate(self) -> float:
        return self.edits / max(self.reference_tokens, 1)


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance between two id sequences."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def triton_batch(requests: list[list[Tensor]]) -> list[Tensor]:
    """What Triton's PyTorch backend passes for a ragged batch: every input flattened and concatenated,
    then one BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO offsets tensor [B + 1] (int32) per input."""
    flat = [torch.cat([r[i].reshape(-1) for r in requests]) for i in range(len(requests[0]))]
    offsets = []
    for i in range(len(requests[0])):
        counts = torch.tensor([r[i].numel() for r in requests], dtype=torch.int32, device=flat[i].device)
        offsets.append(F.pad(torch.cumsum(counts, 0, dtype=torch.int32), (1, 0)))
    return flat + offsets


def split_outputs(
    outputs: Tensor | tuple[Tensor, ...], requests: list[list[Tensor]], scatter: tuple[int | None, ...]
) -> list[list[Tensor]]:
    """A module's packed (or [B, M] padded) outputs -> each request's own, as Triton hands them out."""
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    per_request: list[list[Tensor]] = [[] for _ in requests]
    for out, source in zip(outputs, scatter, strict=True):
        pieces = list(out) if source is None else list(out.split([r[source].shape[0] for r in requests]))
        for request, piece in zip(per_request, pieces, strict=True):
            request.append(piece)
    return per_request


def compare(out: Tensor, ref: Tensor, label: str, dtype_name: str, id_errors: IdErrors) -> None:
    """One output of one request, exported vs eager; ids after dropping the -1 padding."""
    if not ref.is_floating_point():
        out_ids, ref_ids = out[out >= 0].tolist(), ref[ref >= 0].tolist()
        if dtype_name == "float32" and out_ids != ref_ids:
            raise ExportError(f"{label}: exported ids {out_ids} != eager {ref_ids}")
        id_errors.add(out_ids, ref_ids)
        return
    atol, rtol = TOLERANCES[dtype_name]
    try:
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    except AssertionError as exc:
        raise ExportError(f"{label}: exported module differs from the eager one: {exc}") from exc


def verify(built: Built, dtype_name: str, seed: int = 0) -> IdErrors:
    """Run the exported module and the eager one on batches whose lengths no trace example used.

    Returns the id errors counted (none in float32, where ids must be equal); fails beyond
    HALF_PRECISION_ID_ERROR_BOUND.
    """
    gen = torch.Generator().manual_seed(seed)
    id_errors = IdErrors()
    for frames in VERIFY_FRAMES:
        requests = built.example(list(frames), gen)
        label = f"batch of {list(frames)} frames"
        with torch.no_grad(), torch.jit.optimized_execution(False):  # as served: DISABLE_OPTIMIZED_EXECUTION
            try:
                outputs = built.module(*triton_batch(requests))
            except RuntimeError as exc:  # e.g. a size that tracing kept as a constant
                raise ExportError(f"{label}: the exported module fails: {exc}") from exc
        got = split_outputs(outputs, requests, built.scatter)
        for index, (outs, refs) in enumerate(zip(got, built.reference(requests), strict=True)):
            for out, ref in zip(outs, refs, strict=True):
                compare(out, ref, f"{label}, request {index}", dtype_name, id_errors)
    if id_errors.rate > HALF_PRECISION_ID_ERROR_BOUND:
        raise ExportError(
            f"{dtype_name} export: id error rate {id_errors.rate:.2%} ({id_errors.edits} edits over "
            f"{id_errors.reference_tokens} tokens) exceeds {HALF_PRECISION_ID_ERROR_BOUND:.0%}"
        )
    return id_errors
