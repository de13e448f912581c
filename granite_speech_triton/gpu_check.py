"""`make gpu-check`: GPU readiness in one command, on one GPU with no network, results in one json.

    python -m granite_speech_triton.gpu_check            # real sizes, cuda, bfloat16 (one H100: ~5 minutes)
    python -m granite_speech_triton.gpu_check --size tiny --device cpu --dtype float32 --check-requests 6 \\
        --concurrency 1,2 --requests-per-level 4        # the test suite's run of the same script

1. writes random-weight AR and NAR checkpoints of `--size` (tiny.py), timing each;
2. runs the in-process models on the check set, one request at a time (AR: transformers'
   GraniteSpeechForConditionalGeneration.generate, greedy; NAR: NARModel.transcribe_ids);
3. serves both ensembles (`--device`, `--dtype`) and sends the same requests, many in flight:
   prints the token mismatch rate; in float32 every id must match (exit status 1 otherwise);
4. benchmarks both ensembles at each `--concurrency` level: RTFx, p50/p95 latency, peak GPU memory;
5. writes OUT/results.json.

Random weights never produce the end-of-text token, so every AR request asks for the tokens a
real transcript of its length has (TOKENS_PER_SECOND), not for the 200-token default. Needs
neither espeak-ng, soundfile nor tritonclient: the audio is synthetic and requests go over HTTP
(binary tensor extension) with the standard library.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .export.check import edit_distance
from .serving import server
from .serving.repository import ENSEMBLES, PROJECT_ROOT, DeploySettings, render
from .tiny import SIZES, make_ar_checkpoint, make_nar_checkpoint

SAMPLE_RATE = 16_000
TOKENS_PER_SECOND = 4  # a transcript's tokens per second of speech, roughly (English ASR, Granite tokenizer)
CHECK_IN_FLIGHT = 16  # requests in flight during the check: batches form, as in production
SHORTEST_CLIP_S = 1.0
LONGEST_CLIP_S = 20.0  # the default longest synthetic clip
CUDA_POOL_BYTES = 1 << 30  # Triton's CUDA memory pool, through which GPU tensors pass between steps
VARIANTS = ("ar", "nar")


# ---- audio --------------------------------------------------------------------------------------


def synthetic_clip(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Speech-like float32 audio: syllable-rate bursts of gliding tones over noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = rng.uniform(90, 250) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    voice = sum(np.sin(2 * np.pi * k * np.cumsum(pitch) / SAMPLE_RATE) / k for k in (1, 2, 3))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None)  # ~4 syllables/s
    audio = 0.2 * voice * envelope + 0.01 * rng.standard_normal(t.shape[0])
    return (0.9 * audio / np.abs(audio).max()).astype(np.float32)


def audio_set(count: int, seed: int, longest: float = LONGEST_CLIP_S) -> list[np.ndarray]:
    """`count` clips, lengths spread evenly from SHORTEST_CLIP_S to `longest` seconds, shuffled."""
    rng = np.random.default_rng(seed)
    lengths = rng.permutation(np.linspace(SHORTEST_CLIP_S, longest, num=count))
    return [synthetic_clip(float(seconds), rng) for seconds in lengths]


def seconds(audio: np.ndarray) -> float:
    return audio.shape[0] / SAMPLE_RATE


def ar_tokens(audio: np.ndarray) -> int:
    """MAX_NEW_TOKENS of an AR request: what a real transcript of this length needs."""
    return math.ceil(TOKENS_PER_SECOND * seconds(audio)) + 4


# ---- in-process references ------------------------------------------------------------------------


def reference_ids(variant: str, checkpoint: Path, device: str, dtype: torch.dtype, clips: list[np.ndarray]):
    """Token ids of the in-process model for each clip, one at a time; the model is freed after."""
    load = ar_reference if variant == "ar" else nar_reference
    transcribe = load(checkpoint, device, dtype)
    ids = [transcribe(clip) for clip in clips]
    del transcribe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ids


def ar_reference(checkpoint: Path, device: str, dtype: torch.dtype) -> Callable[[np.ndarray], list[int]]:
    from .model.prompts import SpeechRequest
    from .reference import TransformersReference

    reference = TransformersReference(checkpoint, device, dtype)
    instruction = SpeechRequest().instruction()
    return lambda clip: reference.generate(clip, instruction, ar_tokens(clip))


def nar_reference(checkpoint: Path, device: str, dtype: torch.dtype) -> Callable[[np.ndarray], list[int]]:
    from .model.audio import Framing, LogMelFrontEnd
    from .model.nar import load_nar_model

    model, front_end = load_nar_model(checkpoint, device, dtype), LogMelFrontEnd(Framing.NAR, device)
    return lambda clip: model.transcribe_ids([front_end(torch.from_numpy(clip)).to(dtype)])[0]


# ---- HTTP client (standard library) ------------------------------------------------------------


class EnsembleClient:
    """KServe v2 HTTP with the binary tensor extension: AUDIO as raw float32, TOKEN_IDS back as JSON."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()  # one keep-alive connection per thread

    def connection(self) -> http.client.HTTPConnection:
        if not hasattr(self.local, "connection"):
            self.local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        return self.local.connection

    def infer(self, variant: str, audio: np.ndarray) -> tuple[list[int], float]:
        """(token ids, latency in seconds) of one request."""
        inputs = [{"name": "AUDIO", "shape": [1, audio.shape[0]], "datatype": "FP32"}]
        inputs[0]["parameters"] = {"binary_data_size": audio.nbytes}
        if variant == "ar":
            inputs.append({"name": "MAX_NEW_TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [ar_tokens(audio)]})
        outputs = [{"name": "TOKEN_IDS", "parameters": {"binary_data": False}}]
        header = json.dumps({"inputs": inputs, "outputs": outputs}).encode()
        headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
        started = time.perf_counter()
        connection = self.connection()
        connection.request("POST", f"/v2/models/{ENSEMBLES[variant]}/infer", header + audio.tobytes(), headers)
        response = connection.getresponse()
        body = response.read()
        latency = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{ENSEMBLES[variant]} answered {response.status}: {body[:500]!r}")
        (ids,) = [o["data"] for o in json.loads(body)["outputs"] if o["name"] == "TOKEN_IDS"]
        return ids, latency

    def many(self, variant: str, clips: list[np.ndarray], in_flight: int) -> tuple[list, float]:
        """Every clip with `in_flight` requests outstanding: ([(ids, latency)] in clip order, wall seconds)."""
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=in_flight) as pool:
            results = list(pool.map(lambda clip: self.infer(variant, clip), clips))
        return results, time.perf_counter() - started


# ---- GPU memory ----------------------------------------------------------------------------------


@contextmanager
def peak_gpu_memory() -> Iterator[dict[str, float | None]]:
    """Samples the GPU's used memory (every process: the server's too) while the block runs."""
    peak: dict[str, float | None] = {"peak_gpu_memory_gib": None}
    if not torch.cuda.is_available():
        yield peak
        return
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            free, total = torch.cuda.mem_get_info(0)
            peak["peak_gpu_memory_gib"] = max(peak["peak_gpu_memory_gib"] or 0.0, (total - free) / 2**30)
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


# ---- the steps -----------------------------------------------------------------------------------


@dataclass
class CheckResult:
    """Served ids against the in-process model's, for the same requests."""

    requests: int
    mismatched_requests: int
    token_edits: int
    reference_tokens: int

    @property
    def token_mismatch_rate(self) -> float:
        return self.token_edits / max(self.reference_tokens, 1)

    def to_dict(self) -> dict:
        return {**asdict(self), "token_mismatch_rate": self.token_mismatch_rate}


@dataclass
class LevelResult:
    """One benchmark level: every request of the bench set with `concurrency` in flight."""

    concurrency: int
    requests: int
    audio_seconds: float
    wall_s: float
    latencies_s: list[float] = field(repr=False)
    peak_gpu_memory_gib: float | None

    def to_dict(self) -> dict:
        p50, p95 = np.percentile(self.latencies_s, [50, 95])
        values = {k: v for k, v in asdict(self).items() if k != "latencies_s"}
        return {**values, "rtfx": self.audio_seconds / self.wall_s, "latency_p50_s": p50, "latency_p95_s": p95}


def build_checkpoints(out: Path, size: str) -> tuple[dict[str, Path], dict]:
    makers = {"ar": make_ar_checkpoint, "nar": make_nar_checkpoint}
    paths, report = {}, {}
    for variant, make in makers.items():
        started = time.perf_counter()
        paths[variant] = make(out / f"{size}-{variant}", SIZES[size])
        size_bytes = sum(f.stat().st_size for f in paths[variant].iterdir())
        report[variant] = {"path": str(paths[variant]), "build_s": time.perf_counter() - started, "bytes": size_bytes}
        print(f"[{variant}] {size} checkpoint: {size_bytes / 1e9:.2f} GB in {report[variant]['build_s']:.1f} s")
    return paths, report


def check(client: EnsembleClient, variant: str, clips: list[np.ndarray], expected: list[list[int]]) -> CheckResult:
    results, _ = client.many(variant, clips, CHECK_IN_FLIGHT)
    served = [ids for ids, _ in results]
    edits = [edit_distance(s, e) for s, e in zip(served, expected, strict=True)]
    return CheckResult(len(clips), sum(e > 0 for e in edits), sum(edits), sum(len(e) for e in expected))


def bench(client: EnsembleClient, variant: str, clips: list[np.ndarray], level: int, count: int) -> LevelResult:
    requests = [clips[i % len(clips)] for i in range(count)]
    client.many(variant, requests[: min(count, level)], level)  # untimed: first batches of this shape
    with peak_gpu_memory() as memory:
        results, wall = client.many(variant, requests, level)
    audio = sum(seconds(clip) for clip in requests)
    return LevelResult(level, count, audio, wall, [latency for _, latency in results], memory["peak_gpu_memory_gib"])


@contextmanager
def serving(settings: DeploySettings, out: Path) -> Iterator[tuple[int, float]]:
    """Both ensembles on free ports; yields (HTTP port, seconds until ready)."""
    options = server.ServerOptions(
        repositories=render(out / "repository", settings, VARIANTS),
        build_dir=PROJECT_ROOT / "build",
        http_port=server.free_port(),
        grpc_port=server.free_port(),
        metrics_port=server.free_port(),
        extra_args=[f"--cuda-memory-pool-byte-size=0:{CUDA_POOL_BYTES}"] if settings.device == "cuda" else [],
    )
    started = time.perf_counter()
    with server.running(options, out / "server.log"):
        yield options.http_port, time.perf_counter() - started


# ---- report ----------------------------------------------------------------------------------------


def print_report(results: dict) -> None:
    for variant, result in results["check"].items():
        print(
            f"[{variant}] check: {result['mismatched_requests']}/{result['requests']} requests differ from the "
            f"in-process model, token mismatch rate {result['token_mismatch_rate']:.2%}"
        )
    print(f"{'variant':8}{'in flight':>10}{'requests':>10}{'RTFx':>10}{'p50 s':>9}{'p95 s':>9}{'GPU GiB':>9}")
    for variant, levels in results["bench"].items():
        for level in levels:
            memory = "-" if level["peak_gpu_memory_gib"] is None else f"{level['peak_gpu_memory_gib']:.1f}"
            print(
                f"{variant:8}{level['concurrency']:>10}{level['requests']:>10}{level['rtfx']:>10.1f}"
                f"{level['latency_p50_s']:>9.3f}{level['latency_p95_s']:>9.3f}{memory:>9}"
            )


def environment() -> dict:
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "gpu": gpu}  # fmt: skip


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    description = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m granite_speech_triton.gpu_check", description=description)
    parser.add_argument("--size", choices=sorted(SIZES), default="real", help="checkpoint dimensions (tiny.py)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--check-requests", type=int, default=48, help="requests compared with the in-process model")
    parser.add_argument("--concurrency", default="1,32,128", help="benchmark levels (requests in flight)")
    parser.add_argument("--requests-per-level", type=int, default=0, help="default: max(32, 2 x level)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="DeploySettings.max_batch_size")
    parser.add_argument("--longest-clip", type=float, default=LONGEST_CLIP_S, help="seconds (clips start at 1 s)")
    parser.add_argument("--out", type=Path, default=Path("build/gpu-check"))
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Every step; returns the results document (also written to OUT/results.json)."""
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [int(v) for v in args.concurrency.split(",")]
    checkpoints, built = build_checkpoints(args.out / "checkpoints", args.size)
    dtype = getattr(torch, args.dtype)
    check_clips = audio_set(args.check_requests, seed=1, longest=args.longest_clip)
    expected = {v: reference_ids(v, checkpoints[v], args.device, dtype, check_clips) for v in VARIANTS}
    settings = DeploySettings(
        ar_checkpoint=str(checkpoints["ar"]), nar_checkpoint=str(checkpoints["nar"]), device=args.device,
        dtype=args.dtype, max_batch_size=args.max_batch_size, max_audio_seconds=args.longest_clip + 1,
    )  # fmt: skip
    bench_clips = audio_set(32, seed=2, longest=args.longest_clip)
    results: dict = {"environment": environment(), "settings": asdict(settings), "checkpoints": built}
    with serving(settings, args.out) as (port, ready_s):
        client = EnsembleClient(port)
        results["server_ready_s"] = ready_s
        results["check"] = {v: check(client, v, check_clips, expected[v]).to_dict() for v in VARIANTS}
        results["bench"] = {
            v: [bench(client, v, bench_clips, n, args.requests_per_level or max(32, 2 * n)).to_dict() for n in levels]
            for v in VARIANTS
        }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print_report(results)
    print(f"wrote {args.out / 'results.json'}")
    if args.dtype == "float32" and any(r["mismatched_requests"] for r in results["check"].values()):
        print("error: in float32 the served ids must equal the in-process model's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
