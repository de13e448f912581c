"""Benchmark of the AR decoding engine: in-process transformers vs Triton with scheduler=static and inflight,
and the decoding modes side by side.

    python -m granite_speech_triton.bench_engine --ar-checkpoint DIR            # e.g. a real-size checkpoint
    python -m granite_speech_triton.bench_engine --tiny                         # CPU smoke run
    python -m granite_speech_triton.bench_engine --ar-checkpoint DIR --device cuda --dtype bfloat16

Every system serves the same request list: the audio set cycled to --requests requests, each with
its own MAX_NEW_TOKENS drawn from --tokens (default 8-64), so rows end at different steps.
  in-process: transformers' GraniteSpeechForConditionalGeneration.generate, one request at a time;
  static:     the served AR pipeline, engine admitting a batch only when the previous one has ended;
  inflight:   the served AR pipeline, engine admitting requests at every step.
Served requests stream (granite_speech_stream over gRPC) with each --concurrency level in flight;
time to first token (TTFT) = until the first partial response (in-process: the first new token).
Reported: RTFx, throughput ratio to in-process, p50/p95 latency and TTFT, generated tokens per
second, and token mismatches against the in-process tokens of the same request (must be 0).

--modes greedy,beam,cascade,speculative serves every mode (inflight, the highest concurrency) and
adds LLM forward passes per request (from the engine's metrics). Random weights reject every
real draft, so --planted also runs the engine in-process with each request's draft planted as its
own greedy answer (the best case): speculative then needs one pass per request, and the cascade
(confidence 0) accepts the draft.
Writes OUT/engine_results.json. A benchmark, not a test: nothing here judges the timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .bench import Clip, environment, load_clips, parse_levels, serving, synthesise_audio, tiny_checkpoints
from .cli import settings_from
from .serving.repository import DEVICES, DTYPES
from .serving.server import free_port

SAMPLE_RATE = 16_000
DEFAULT_LEVELS = (1, 8, 16)
SCHEDULERS = ("static", "inflight")


@dataclass(frozen=True)
class Request:
    clip: Clip
    max_new_tokens: int


@dataclass(frozen=True)
class Outcome:
    """One request as measured: when it started, saw its first token, ended, and what it produced."""

    started: float
    first_token: float
    ended: float
    token_ids: tuple[int, ...]
    error: str = ""  # a failed request: reported, left out of the timings


@dataclass
class Run:
    system: str  # in-process | static | inflight
    concurrency: int
    audio_seconds: float
    wall_s: float
    outcomes: list[Outcome]
    mismatches: int | None = None
    passes_per_request: float | None = None  # LLM forward passes (decoding-mode runs)

    def to_dict(self) -> dict[str, Any]:
        done = [o for o in self.outcomes if not o.error] or [Outcome(0.0, 0.0, 0.0, ())]
        latencies = [o.ended - o.started for o in done]
        ttfts = [o.first_token - o.started for o in done]
        tokens = sum(len(o.token_ids) for o in done)
        return {
            "system": self.system,
            "concurrency": self.concurrency,
            "requests": len(self.outcomes),
            "failures": sum(bool(o.error) for o in self.outcomes),
            "audio_seconds": self.audio_seconds,
            "wall_s": self.wall_s,
            "rtfx": self.audio_seconds / self.wall_s,
            "tokens_per_s": tokens / self.wall_s,
            "latency_p50_s": float(np.percentile(latencies, 50)),
            "latency_p95_s": float(np.percentile(latencies, 95)),
            "ttft_p50_s": float(np.percentile(ttfts, 50)),
            "ttft_p95_s": float(np.percentile(ttfts, 95)),
            "token_mismatches": self.mismatches,
            "passes_per_request": self.passes_per_request,
        }


def make_requests(clips: list[Clip], count: int, tokens: tuple[int, int], seed: int = 0) -> list[Request]:
    """The clips cycled to `count` requests, each with a budget drawn uniformly from `tokens`."""
    budgets = np.random.default_rng(seed).integers(tokens[0], tokens[1] + 1, count)
    return [Request(clips[i % len(clips)], int(b)) for i, b in enumerate(budgets)]


class FirstTokenClock:
    """A transformers streamer that notes when the first new token arrives (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token = 0.0

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token = time.perf_counter()

    def end(self) -> None:
        pass


def run_in_process(checkpoint: str, device: str, dtype: str, requests: list[Request]) -> Run:
    """transformers one request at a time, after an untimed pass over the clips."""
    from .model.prompts import SpeechRequest
    from .model.weights import parse_dtype, resolve_checkpoint
    from .reference import TransformersReference

    reference = TransformersReference(resolve_checkpoint(checkpoint), device, parse_dtype(dtype))
    instruction = SpeechRequest().instruction()
    for request in {r.clip.name: r for r in requests}.values():
        reference.generate(request.clip.audio, instruction, 2)
    outcomes = []
    started = time.perf_counter()
    for request in requests:
        clock, t0 = FirstTokenClock(), time.perf_counter()
        ids = reference.generate(request.clip.audio, instruction, request.max_new_tokens, streamer=clock)
        reference.tokenizer.decode(ids, skip_special_tokens=True)  # the server returns text too
        outcomes.append(Outcome(t0, clock.first_token, time.perf_counter(), tuple(ids)))
    return Run("in-process", 1, sum(r.clip.seconds for r in requests), time.perf_counter() - started, outcomes)


def stream_one(client, request: Request, mode: str) -> Outcome:
    started = time.perf_counter()
    first = 0.0
    ids: tuple[int, ...] = ()
    updates = client.transcribe_stream(
        request.clip.audio, sample_rate=SAMPLE_RATE, max_new_tokens=request.max_new_tokens, decoding=mode
    )
    try:
        for update in updates:
            first = first or time.perf_counter()
            ids = update.token_ids
    except Exception as exc:  # a benchmark reports failures; it does not stop at the first
        return Outcome(started, first, time.perf_counter(), ids, f"{type(exc).__name__}: {exc}")
    return Outcome(started, first, time.perf_counter(), ids)


def run_served(url: str, system: str, requests: list[Request], level: int, mode: str = "greedy") -> Run:
    from granite_speech_client import GraniteSpeechClient

    with GraniteSpeechClient(url, "grpc", timeout_s=3600) as client, ThreadPoolExecutor(level) as pool:
        started = time.perf_counter()
        outcomes = list(pool.map(lambda r: stream_one(client, r, mode), requests))
        wall = time.perf_counter() - started
    return Run(system, level, sum(r.clip.seconds for r in requests), wall, outcomes)


def engine_counts(metrics_url: str) -> tuple[float, float]:
    """(LLM passes, requests) the engine has counted so far."""
    import urllib.request

    with urllib.request.urlopen(metrics_url) as response:
        lines = response.read().decode().splitlines()
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in lines if "ar_llm_engine" in line}
    return values.get("granite_speech_engine_passes_sum", 0.0), values.get("granite_speech_engine_passes_count", 0.0)


def run_modes(url: str, metrics_url: str, requests: list[Request], level: int, modes: list[str]) -> list[Run]:
    """Every decoding mode served over the same requests; passes per request from the engine's metrics."""
    runs = []
    for mode in modes:
        print(f"mode {mode}, {level} in flight ...", flush=True)
        passes, count = engine_counts(metrics_url)
        run = run_served(url, f"inflight {mode}", requests, level, mode)
        passes_after, count_after = engine_counts(metrics_url)
        run.passes_per_request = (passes_after - passes) / max(count_after - count, 1)
        runs.append(run)
    return runs


def audio_rows(checkpoint: Path, device: str, dtype, requests: list[Request]) -> dict:
    """Our encoder and projector in-process: each clip's audio rows for the LLM."""
    import torch

    from .model.audio import Framing, LogMelFrontEnd
    from .model.config import ARModelConfig, read_config_json
    from .model.encoder import encode_batch, load_encoder
    from .model.projector import load_projector

    cfg = ARModelConfig.from_dict(read_config_json(checkpoint))
    encoder = load_encoder(checkpoint, cfg.encoder, device, dtype)
    projector = load_projector(checkpoint, cfg.projector, device, dtype)
    front_end = LogMelFrontEnd(Framing.AR, device)
    with torch.inference_mode():
        return {
            r.clip.name: projector(encode_batch(encoder, [front_end(torch.from_numpy(r.clip.audio))]))[0]
            for r in requests
        }


def run_planted(checkpoint: str, device: str, dtype: str, requests: list[Request], reference: Run) -> list[Run]:
    """The engine in-process, all requests submitted at once: greedy; speculative and cascade
    (confidence 0) with each request's draft planted as its own greedy answer (the best case)."""
    from .model.decoder import load_ar_decoder
    from .model.engine import EngineConfig, Mode
    from .model.prompts import SpeechRequest
    from .model.weights import parse_dtype, resolve_checkpoint

    path, torch_dtype = resolve_checkpoint(checkpoint), parse_dtype(dtype)
    rows = audio_rows(path, device, torch_dtype, requests)
    decoder = load_ar_decoder(path, device, torch_dtype, EngineConfig(max_rows=len(requests)))
    eos = decoder.engine.eos
    runs = []
    for mode in (Mode.GREEDY, Mode.SPECULATIVE, Mode.CASCADE):
        seqs = []
        for request, want in zip(requests, reference.outcomes, strict=True):
            seq = decoder.sequence(
                SpeechRequest(max_new_tokens=request.max_new_tokens, confidence=0.0), rows[request.clip.name]
            )
            seq.mode = mode
            seq.draft_ids = [t for t in want.token_ids if t not in eos] if mode is not Mode.GREEDY else []
            seqs.append(seq)
        system = f"in-process {mode.value}" + (", planted draft" if mode is not Mode.GREEDY else "")
        print(f"{system} ...", flush=True)
        started, submitted = time.perf_counter(), decoder.engine.clock()
        decoder.engine.generate(seqs)
        wall = time.perf_counter() - started
        outcomes = [
            Outcome(started, started + s.first_token_at - submitted, started + wall, tuple(s.tokens)) for s in seqs
        ]
        run = Run(system, len(requests), sum(r.clip.seconds for r in requests), wall, outcomes)
        run.passes_per_request = sum(s.passes for s in seqs) / len(seqs)
        strip = mode is Mode.CASCADE  # an accepted draft carries no end-of-text token
        expected = [tuple(t for t in o.token_ids if not (strip and t in eos)) for o in reference.outcomes]
        run.mismatches = sum(o.token_ids != e for o, e in zip(run.outcomes, expected, strict=True))
        runs.append(run)
    return runs


def count_mismatches(run: Run, reference: Run) -> int:
    """Served requests whose tokens differ from the reference's (failed ones are counted as failures)."""
    pairs = zip(run.outcomes, reference.outcomes, strict=True)
    return sum(a.token_ids != b.token_ids for a, b in pairs if not a.error)


COLUMNS = (
    "system",
    "conc",
    "requests",
    "RTFx",
    "x_in-process",
    "tok/s",
    "p50_s",
    "p95_s",
    "ttft_p50",
    "ttft_p95",
    "passes/req",
    "fail",
    "mismatch",
)


def format_table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["rtfx"]
    cells = [COLUMNS]
    for row in rows:
        cells.append(
            (
                row["system"],
                str(row["concurrency"]),
                str(row["requests"]),
                f"{row['rtfx']:.2f}",
                f"{row['rtfx'] / base:.2f}",
                f"{row['tokens_per_s']:.1f}",
                f"{row['latency_p50_s']:.2f}",
                f"{row['latency_p95_s']:.2f}",
                f"{row['ttft_p50_s']:.2f}",
                f"{row['ttft_p95_s']:.2f}",
                "-" if row["passes_per_request"] is None else f"{row['passes_per_request']:.1f}",
                str(row["failures"]),
                "-" if row["token_mismatches"] is None else str(row["token_mismatches"]),
            )
        )
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ar-checkpoint", help="AR checkpoint directory or hub id")
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint in OUT/checkpoints")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--concurrency", type=parse_levels, default=DEFAULT_LEVELS, help="default 1,8,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (default 16)")
    parser.add_argument("--tokens", default="8-64", help="MAX_NEW_TOKENS range per request (default 8-64)")
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS), help="static,inflight (default both)")
    parser.add_argument(
        "--modes",
        default="",
        help="decoding modes to serve side by side (inflight), e.g. greedy,beam,cascade,speculative",
    )
    parser.add_argument("--planted", action="store_true", help="in-process draft modes with planted drafts (best case)")
    parser.add_argument("--audio-dir", type=Path, help="wav files to use (default: synthesise speech)")
    parser.add_argument("--out", type=Path, default=Path("build/bench-engine"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any DeploySettings field")


def run(args: argparse.Namespace) -> int:
    low, _, high = args.tokens.partition("-")
    tokens = (int(low), int(high or low))
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = (
        tiny_checkpoints(args.out / "checkpoints", ["ar"])["ar_checkpoint"] if args.tiny else args.ar_checkpoint
    )
    if not checkpoint:
        raise SystemExit("--ar-checkpoint DIR or --tiny")
    clips = load_clips(args.audio_dir or synthesise_audio(args.out / "audio"))
    requests = make_requests(clips, args.requests, tokens)
    print(f"{len(requests)} requests over {len(clips)} clips, MAX_NEW_TOKENS {tokens[0]}-{tokens[1]}; "
          f"{args.device} {args.dtype}", flush=True)  # fmt: skip
    report = Report(args.out / "engine_results.json", checkpoint, requests)
    print("in-process reference ...", flush=True)
    reference = run_in_process(checkpoint, args.device, args.dtype, requests)
    report.add(reference)
    modes = [m for m in args.modes.split(",") if m]
    for scheduler in args.schedulers.split(","):
        settings = dataclasses.replace(
            settings_from(args.set),
            ar_checkpoint=checkpoint,
            device=args.device,
            dtype=args.dtype,
            scheduler=scheduler,
            max_decode_rows=max(args.concurrency) * (4 if modes else 1),  # beams take a row each
            max_batch_size=max(args.concurrency),
        )
        ports = {name: free_port() for name in ("HTTP", "gRPC", "metrics")}
        with serving(settings, ("ar",), args.out / scheduler, ports) as url:
            run_served(url, scheduler, requests[: len(clips)], max(args.concurrency))  # warm-up, untimed
            for level in args.concurrency:
                print(f"{scheduler}, {level} in flight ...", flush=True)
                served = run_served(url, scheduler, requests, level)
                served.mismatches = count_mismatches(served, reference)
                report.add(served)
            if scheduler == "inflight" and modes:
                metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
                for run in run_modes(url, metrics_url, requests, max(args.concurrency), modes):
                    exact = run.system.endswith(("greedy", "speculative"))
                    run.mismatches = count_mismatches(run, reference) if exact else None
                    report.add(run)
    if args.planted:
        for run in run_planted(checkpoint, args.device, args.dtype, requests, reference):
            report.add(run)
    print(report.table)
    print(f"wrote {report.path}")
    return 0


class Report:
    """The rows so far, written to `path` after each run (a long benchmark keeps what it measured)."""

    def __init__(self, path: Path, checkpoint: str, requests: list[Request]) -> None:
        self.path, self.checkpoint, self.requests = path, checkpoint, requests
        self.rows: list[dict[str, Any]] = []
        self.table = ""

    def add(self, run: Run) -> None:
        self.rows.append(run.to_dict())
        self.table = format_table(self.rows)
        document = {
            "rows": self.rows,
            "requests": [{"clip": r.clip.name, "max_new_tokens": r.max_new_tokens} for r in self.requests],
            "environment": environment(),
            "checkpoint": self.checkpoint,
            "table": self.table,
        }
        self.path.write_text(json.dumps(document, indent=2, default=str))
        print(self.table.splitlines()[-1], flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m granite_speech_triton.bench_engine", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
