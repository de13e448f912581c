"""Hour-long files through the OpenAI-compatible API: RTFx and peak memory (too slow for the suite).

    python -m granite_speech_triton.bench_long --tiny                # CPU, tiny random checkpoints
    python -m granite_speech_triton.bench_long --device cuda --dtype bfloat16 --ar-checkpoint DIR ...

Synthesises MINUTES of espeak-ng speech (sentences in random order, pauses of 0.3 to 1.5 s between
them) as one FLAC file, starts tritonserver and the API (`python -m granite_speech_api`, its own
process) on free ports, and sends the file once per variant through the official `openai` SDK as
a verbose_json transcription with word and segment timestamps. The API splits it at quiet points
into pieces under max_audio_seconds, Triton transcribes and aligns each, the API stitches them.

Reports per variant: wall time, RTFx (audio seconds / wall seconds), words and segments,
whether the words are in order and reach the end of the audio, and the peak resident memory of the
API process and of tritonserver with its Python backend stubs (the sum of each process's peak,
/proc VmHWM: an upper bound on their peak together). Writes OUT/results.json. This is a benchmark:
nothing here judges the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .bench import SENTENCES, environment, tiny_checkpoints
from .cli import parse_variants, settings_from
from .model.audio import SAMPLE_RATE
from .serving import server
from .serving.repository import DEVICES, DTYPES, PROJECT_ROOT, DeploySettings, render

MODELS = {"ar": "granite-speech-4.1-2b", "nar": "granite-speech-4.1-2b-nar"}
PAUSES_S = (0.3, 1.5)  # shortest and longest pause between two sentences
API_READY_TIMEOUT_S = 60.0


def synthesise(path: Path, minutes: float, seed: int = 0) -> float:
    """MINUTES of sentences with random pauses as a 16 kHz FLAC; returns its length in seconds."""
    import soundfile

    from .synth import espeak

    rng = np.random.default_rng(seed)
    spoken = [espeak(s, "fr" if s.startswith("Bonjour") else "en") for s in SENTENCES]
    parts, total = [], 0
    while total < minutes * 60 * SAMPLE_RATE:
        parts.append(spoken[rng.integers(len(spoken))])
        parts.append(np.zeros(int(rng.uniform(*PAUSES_S) * SAMPLE_RATE), np.float32))
        total += parts[-2].shape[0] + parts[-1].shape[0]
    audio = np.concatenate(parts)[: int(minutes * 60 * SAMPLE_RATE)]
    soundfile.write(path, audio, SAMPLE_RATE)
    return audio.shape[0] / SAMPLE_RATE


def peak_rss_mb(root: int) -> float:
    """Sum of the peak resident memory (VmHWM) of `root` and every process below it, in MiB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    total_kb, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


@contextlib.contextmanager
def triton(settings: DeploySettings, variants: tuple[str, ...], out: Path) -> Iterator[tuple[str, int]]:
    """tritonserver on free ports: yields (gRPC address, pid)."""
    http, grpc, metrics = server.free_port(), server.free_port(), server.free_port()
    options = server.ServerOptions(
        repositories=render(out / "repository", settings, variants),
        build_dir=PROJECT_ROOT / "build",
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
    )
    log_path = out / "server.log"
    print(f"starting tritonserver (log: {log_path}) ...", flush=True)
    process = server.start(options, log_path)
    try:
        server.wait_ready(http, process, log_path)
        yield f"127.0.0.1:{grpc}", process.pid
    finally:
        server.stop(process)


@contextlib.contextmanager
def api(triton_url: str, out: Path) -> Iterator[tuple[str, int]]:
    """The API in its own process: yields (base URL, pid) once /health answers."""
    port = server.free_port()
    command = [sys.executable, "-m", "granite_speech_api", "--set", f"triton_url={triton_url}", "--set", f"port={port}"]
    with (out / "api.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + API_READY_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the API did not start; see {out / 'api.log'}") from None
                time.sleep(0.5)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def transcribe(url: str, variant: str, path: Path, seconds: float) -> dict:
    """One verbose_json transcription with word and segment times, timed, and what it returned."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=4 * 3600)
    started = time.perf_counter()
    with path.open("rb") as file:
        result = client.audio.transcriptions.create(
            model=MODELS[variant],
            file=file,
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )
    wall = time.perf_counter() - started
    words, segments = result.words or [], result.segments or []
    ordered = all(a.end <= b.start + 1e-3 for a, b in zip(words, words[1:], strict=False))
    return {
        "audio_seconds": round(seconds, 1),
        "wall_seconds": round(wall, 1),
        "rtfx": round(seconds / wall, 1),
        "words": len(words),
        "segments": len(segments),
        "words_in_order": ordered,
        "last_word_end_s": words[-1].end if words else None,
        "duration_reported_s": result.duration,
    }


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoints = tiny_checkpoints(args.out / "checkpoints", args.variants) if args.tiny else {}
    explicit = {"ar_checkpoint": args.ar_checkpoint, "nar_checkpoint": args.nar_checkpoint, "device": args.device}
    explicit |= {"dtype": args.dtype, **checkpoints}
    settings = dataclasses.replace(settings_from(args.set), **{k: v for k, v in explicit.items() if v})
    path = args.out / "long.flac"
    print(f"synthesising {args.minutes:g} min of speech -> {path} ...", flush=True)
    seconds = synthesise(path, args.minutes)
    results = {}
    with triton(settings, args.variants, args.out) as (triton_url, triton_pid), api(triton_url, args.out) as (url, pid):
        for variant in args.variants:
            print(f"{variant}: sending {seconds:.0f} s ({path.stat().st_size / 2**20:.0f} MiB FLAC) ...", flush=True)
            results[variant] = transcribe(url, variant, path, seconds)
            print(json.dumps({variant: results[variant]}), flush=True)
        memory = {"api_peak_rss_mb": round(peak_rss_mb(pid)), "triton_peak_rss_mb": round(peak_rss_mb(triton_pid))}
    print(json.dumps(memory))
    document = {
        "settings": dataclasses.asdict(settings),
        "tiny": args.tiny,
        "minutes": args.minutes,
        "environment": environment() | {"cpus": os.cpu_count()},
        "results": results,
        "memory": memory,
    }
    (args.out / "results.json").write_text(json.dumps(document, indent=2))
    print(f"wrote {args.out / 'results.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the synthesised file (default 60)")
    parser.add_argument("--tiny", action="store_true", help="tiny random checkpoints in OUT/checkpoints")
    parser.add_argument("--ar-checkpoint", help="AR checkpoint directory or hub id")
    parser.add_argument("--nar-checkpoint", help="NAR checkpoint directory or hub id")
    parser.add_argument("--variants", type=parse_variants, default=("ar", "nar"), help="ar, nar or ar,nar (default)")
    parser.add_argument("--device", choices=DEVICES)
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any DeploySettings field")
    parser.add_argument("--out", type=Path, default=Path("build/bench-long"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
