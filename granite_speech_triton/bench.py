"""Side-by-side benchmark (issue 5): the in-process reference against our Triton ensembles.

    granite-speech-triton bench --tiny                           # CPU smoke run, tiny checkpoints
    granite-speech-triton bench --device cuda --dtype bfloat16   # the real checkpoints (hub ids)

One run, one checkpoint per variant, one audio set (default: espeak-ng speech plus longer
concatenations of it, about 1 to 20 s; or every wav file of --audio-dir):
  (a) the in-process reference, one request at a time, timed end to end (log-mel features included):
      AR:  transformers' GraniteSpeechForConditionalGeneration.generate, greedy;
      NAR: this package's own NARModel.transcribe_ids, unbatched (transformers has no NAR class).
  (b) the Triton ensembles, with each --concurrency level of requests in flight; the audio set is
      cycled to --requests requests per level.
RTFx = audio seconds / wall seconds. Prints a table, writes OUT/results.json, then OUT/rtfx.png (when
matplotlib is installed: `make setup-dev` brings it; without it only the plot is missing).
Served token ids are compared with the reference's for the same audio and the mismatches counted
(never fatal). This is a benchmark, not a test: nothing here judges the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cli import add_port_arguments, parse_variants, port_map, settings_from
from .serving import server
from .serving.repository import DEVICES, DTYPES, ENSEMBLES, PROJECT_ROOT, DeploySettings, render

SAMPLE_RATE = 16_000  # Hz, what the ensembles take
DEFAULT_CONCURRENCY = (1, 8, 32)
DEFAULT_REQUESTS = 64  # per concurrency level: 8 passes over the default audio set
DEFAULT_MAX_NEW_TOKENS = 200  # the model card's, and the server's default
GAP_S = 0.3  # silence between concatenated utterances
# The default audio set, about 1 to 19 s: (file stem, espeak-ng voice, sentences spoken one after another).
SENTENCES = (
    "Hello world.",
    "Granite speech runs on a Triton inference server.",
    "The quick brown fox jumps over the lazy dog, twice, before breakfast.",
    "Speech recognition turns spoken words into written text, one request at a time or many at once.",
    "Bonjour tout le monde, le renard brun saute par dessus le chien paresseux.",
)
SPEECH_SET = (
    ("hello", "en", (0,)),
    ("granite", "en", (1,)),
    ("fox", "en", (2,)),
    ("bonjour", "fr", (4,)),
    ("recognition", "en", (3,)),
    ("concat_2", "en", (1, 2)),
    ("concat_3", "en", (1, 2, 3)),
    ("concat_4", "en", (3, 2, 1, 2)),
)
REFERENCE_LABELS = {
    "ar": "transformers GraniteSpeechForConditionalGeneration.generate, in-process, one at a time",
    "nar": "granite_speech_triton NARModel.transcribe_ids (no transformers class), in-process, one at a time",
}
TRITON_LABEL = "Triton ensemble {ensemble} over gRPC"

Transcriber = Callable[[np.ndarray], list[int]]  # one 16 kHz waveform -> generated token ids


@dataclass(frozen=True)
class Clip:
    """One audio of the set."""

    name: str
    audio: np.ndarray  # float32 [samples] at 16 kHz

    @property
    def seconds(self) -> float:
        return self.audio.shape[0] / SAMPLE_RATE


@dataclass
class Run:
    """One measured pass: the reference, or the server at one concurrency level."""

    system: str  # reference | triton
    label: str
    concurrency: int
    audio_seconds: float
    wall_s: float
    latencies_s: list[float]
    token_mismatches: int | None = None  # served ids != reference ids (triton runs only)
    first_differences: dict[str, int] = field(default_factory=dict)  # mismatched clip -> first differing token
    failures: int = 0  # requests that returned an error (left out of the latencies)

    @property
    def rtfx(self) -> float:
        return self.audio_seconds / self.wall_s

    def to_dict(self) -> dict[str, Any]:
        p50, p95 = (float(p) for p in np.percentile(self.latencies_s, [50, 95])) if self.latencies_s else (None, None)
        values = dataclasses.asdict(self)
        del values["latencies_s"]
        requests = len(self.latencies_s) + self.failures
        return {**values, "requests": requests, "rtfx": self.rtfx, "latency_p50_s": p50, "latency_p95_s": p95}


@dataclass
class VariantResult:
    reference: Run
    reference_ids: list[list[int]]  # per clip
    triton: list[Run] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        runs = [{**run.to_dict(), "rtfx_vs_reference": run.rtfx / self.reference.rtfx} for run in self.triton]
        return {"reference": self.reference.to_dict(), "triton": runs}


# ---- options --------------------------------------------------------------------------------


def parse_levels(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32); every level at least 1."""
    try:
        levels = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"concurrency must be comma-separated integers, got {text!r}") from exc
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be at least 1, got {text!r}")
    return levels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by `python -m granite_speech_triton.bench` and the CLI)."""
    parser.add_argument("--ar-checkpoint", help="AR checkpoint directory or hub id (default: the 2b on the hub)")
    parser.add_argument("--nar-checkpoint", help="NAR checkpoint directory or hub id (default: the 2b-nar on the hub)")
    parser.add_argument(
        "--tiny", action="store_true", help="make tiny random checkpoints in OUT/checkpoints and use them"
    )
    parser.add_argument("--variants", type=parse_variants, default=("ar", "nar"), help="ar, nar or ar,nar (default)")
    parser.add_argument("--device", choices=DEVICES, help="server and reference device (default cpu)")
    parser.add_argument("--dtype", choices=DTYPES, help="server and reference dtype (default float32)")
    parser.add_argument("--concurrency", type=parse_levels, default=DEFAULT_CONCURRENCY, help="default 1,8,32")
    parser.add_argument("--audio-dir", type=Path, help="wav files to use (default: synthesise speech)")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="requests per concurrency level")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="AR decode limit")
    parser.add_argument("--out", type=Path, default=Path("build/bench"), help="results.json, rtfx.png, logs")
    parser.add_argument("--max-batch-size", type=int, help="DeploySettings.max_batch_size")
    parser.add_argument("--max-queue-delay-us", type=int, help="DeploySettings.max_queue_delay_us")
    parser.add_argument("--instance-count", type=int, help="DeploySettings.instance_count")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any DeploySettings field")
    add_port_arguments(parser, (0, 0, 0))  # 0: a free port


def deploy_settings(args: argparse.Namespace, checkpoints: dict[str, str]) -> DeploySettings:
    """GST_* environment, then --set pairs, then the explicit options, then `checkpoints` (--tiny)."""
    explicit = {
        "ar_checkpoint": args.ar_checkpoint,
        "nar_checkpoint": args.nar_checkpoint,
        "device": args.device,
        "dtype": args.dtype,
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_us": args.max_queue_delay_us,
        "instance_count": args.instance_count,
        **checkpoints,
    }
    settings = dataclasses.replace(settings_from(args.set), **{k: v for k, v in explicit.items() if v is not None})
    if args.max_new_tokens > settings.max_new_tokens_limit:
        raise SystemExit(f"--max-new-tokens {args.max_new_tokens} exceeds max_new_tokens_limit")
    return settings


def tiny_checkpoints(folder: Path, variants: Sequence[str]) -> dict[str, str]:
    from .tiny import make_tiny_ar_checkpoint, make_tiny_nar_checkpoint

    makers = {"ar": make_tiny_ar_checkpoint, "nar": make_tiny_nar_checkpoint}
    return {f"{v}_checkpoint": str(makers[v](folder / f"tiny-{v}")) for v in variants}


# ---- audio ----------------------------------------------------------------------------------


def synthesise_audio(folder: Path) -> Path:
    """Write the default mixed-length set (real speech, ~1 to 20 s) as 16 kHz wav files."""
    import soundfile

    from .synth import espeak

    folder.mkdir(parents=True, exist_ok=True)
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), dtype=np.float32)
    for index, (stem, voice, sentences) in enumerate(SPEECH_SET):
        parts = [espeak(SENTENCES[i], voice) for i in sentences]
        audio = np.concatenate([piece for part in parts for piece in (part, gap)][:-1])
        soundfile.write(folder / f"{index:02d}_{stem}.wav", audio, SAMPLE_RATE)
    return folder


def load_clips(folder: Path) -> list[Clip]:
    """Every *.wav of `folder` (sorted by name), as mono 16 kHz."""
    from granite_speech_client.audio import load_audio

    paths = sorted(folder.glob("*.wav"))
    if not paths:
        raise SystemExit(f"no .wav files in {folder}")
    return [Clip(path.name, load_audio(path)) for path in paths]


# ---- (a) the in-process reference ----------------------------------------------------------


def ar_reference(checkpoint: Path, settings: DeploySettings, max_new_tokens: int) -> Transcriber:
    """transformers' GraniteSpeechForConditionalGeneration with our (torchaudio-exact) front end."""
    from .model.prompts import SpeechRequest
    from .model.weights import parse_dtype
    from .reference import TransformersReference

    reference = TransformersReference(checkpoint, settings.device, parse_dtype(settings.dtype))
    instruction = SpeechRequest().instruction()

    def transcribe(audio: np.ndarray) -> list[int]:
        new = reference.generate(audio, instruction, max_new_tokens)
        reference.tokenizer.decode(new, skip_special_tokens=True)  # the server returns text too
        return new

    return transcribe


def nar_reference(checkpoint: Path, settings: DeploySettings) -> Transcriber:
    """Our NARModel in-process, unbatched: the NAR model has no transformers implementation."""
    import torch

    from .model.audio import Framing, LogMelFrontEnd
    from .model.decoder import load_tokenizer
    from .model.nar import load_nar_model
    from .model.weights import parse_dtype

    dtype, device = parse_dtype(settings.dtype), settings.device
    model, tokenizer = load_nar_model(checkpoint, device, dtype), load_tokenizer(checkpoint)
    front_end = LogMelFrontEnd(Framing.NAR, device)

    def transcribe(audio: np.ndarray) -> list[int]:
        features = front_end(torch.from_numpy(audio)).to(dtype)  # [frames, 160]
        ids = model.transcribe_ids([features])[0]
        tokenizer.decode(ids, skip_special_tokens=True)
        return ids

    return transcribe


def load_reference(variant: str, settings: DeploySettings, max_new_tokens: int) -> Transcriber:
    from .model.weights import resolve_checkpoint

    if variant == "ar":
        return ar_reference(resolve_checkpoint(settings.ar_checkpoint), settings, max_new_tokens)
    return nar_reference(resolve_checkpoint(settings.nar_checkpoint, settings.nar_revision or None), settings)


def run_reference(variant: str, transcribe: Transcriber, clips: list[Clip]) -> VariantResult:
    """Each clip once, one at a time, after an untimed pass over the set (first calls per shape are slow)."""
    for clip in clips:
        transcribe(clip.audio)
    latencies, ids = [], []
    started = time.perf_counter()
    for clip in clips:
        t0 = time.perf_counter()
        ids.append(transcribe(clip.audio))
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    seconds = sum(clip.seconds for clip in clips)
    return VariantResult(Run("reference", REFERENCE_LABELS[variant], 1, seconds, wall, latencies), ids)


def reference_results(
    variants: Sequence[str], settings: DeploySettings, clips: list[Clip], max_new_tokens: int
) -> dict[str, VariantResult]:
    """Run every variant's reference, freeing its model before the next one (and before the server)."""
    import gc

    import torch

    results = {}
    for variant in variants:
        print(f"[{variant}] in-process reference ...", flush=True)
        results[variant] = run_reference(variant, load_reference(variant, settings, max_new_tokens), clips)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


# ---- (b) the Triton ensembles ----------------------------------------------------------------


def chosen_ports(args: argparse.Namespace) -> dict[str, int]:
    """--http-port, --grpc-port, --metrics-port, each 0 replaced by a free port; checked at once."""
    ports = {name: port or server.free_port() for name, port in port_map(args).items()}
    server.check_ports("127.0.0.1", ports)
    return ports


@contextlib.contextmanager
def serving(settings: DeploySettings, variants: tuple[str, ...], out: Path, ports: dict[str, int]) -> Iterator[str]:
    """Render the repositories, start tritonserver on `ports`, yield its gRPC address, stop it."""
    options = server.ServerOptions(
        repositories=render(out / "repository", settings, variants),
        build_dir=PROJECT_ROOT / "build",
        http_port=ports["HTTP"],
        grpc_port=ports["gRPC"],
        metrics_port=ports["metrics"],
    )
    with server.running(options, out / "server.log"):
        yield f"127.0.0.1:{options.grpc_port}"


def first_difference(served: Sequence[int], expected: Sequence[int]) -> int | None:
    """Index of the first token where two id lists differ (None when equal)."""
    common = min(len(served), len(expected))
    position = next((i for i in range(common) if served[i] != expected[i]), common)
    return None if position == common and len(served) == len(expected) else position


def run_level(
    client, variant: str, clips: list[Clip], concurrency: int, max_new_tokens: int, expected: list[list[int]]
) -> Run:
    """Send `clips` with `concurrency` requests in flight; expected[i] = the reference ids of clips[i]."""
    audios = [clip.audio for clip in clips]
    options = {"variant": variant, "max_new_tokens": max_new_tokens if variant == "ar" else None}
    started = time.perf_counter()
    items = client.transcribe_many(audios, max_in_flight=concurrency, sample_rate=SAMPLE_RATE, **options)
    wall = time.perf_counter() - started
    done = [item for item in items if item.ok]
    for item in [item for item in items if not item.ok][:3]:
        print(f"  request {item.index} ({clips[item.index].name}) failed: {item.error}", file=sys.stderr)
    checks = [(clips[item.index].name, first_difference(item.result.token_ids, expected[item.index])) for item in done]
    differences = {name: position for name, position in checks if position is not None}
    mismatches = sum(position is not None for _, position in checks)
    label = TRITON_LABEL.format(ensemble=ENSEMBLES[variant])
    seconds = sum(clips[item.index].seconds for item in done)
    latencies = [item.result.latency_s for item in done]
    return Run("triton", label, concurrency, seconds, wall, latencies, mismatches, differences, len(items) - len(done))


def triton_results(url: str, results: dict[str, VariantResult], clips: list[Clip], args: argparse.Namespace) -> None:
    """Measure every variant at every concurrency level; appends to results[variant].triton."""
    from granite_speech_client import GraniteSpeechClient

    cycled = [clips[i % len(clips)] for i in range(args.requests)]
    with GraniteSpeechClient(url, "grpc") as client:
        for variant, result in results.items():
            expected = [result.reference_ids[i % len(clips)] for i in range(args.requests)]
            # Untimed warm-up: every clip once, as many in flight as the highest level.
            run_level(client, variant, clips, max(args.concurrency), args.max_new_tokens, result.reference_ids)
            for level in args.concurrency:
                print(f"[{variant}] triton, concurrency {level} ...", flush=True)
                run = run_level(client, variant, cycled, level, args.max_new_tokens, expected)
                result.triton.append(run)


# ---- report -----------------------------------------------------------------------------------

COLUMNS = ("variant", "system", "conc", "requests", "audio_s", "wall_s", "RTFx", "p50_s", "p95_s", "x_ref", "mismatch")


def number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_row(variant: str, system: str, run: dict[str, Any], ratio: float, mismatches: str) -> tuple[str, ...]:
    """One printed row from a Run.to_dict()."""
    numbers = (
        number(run["audio_seconds"], 1),
        number(run["wall_s"], 2),
        number(run["rtfx"], 2),
        number(run["latency_p50_s"], 3),
        number(run["latency_p95_s"], 3),
        number(ratio, 2),
    )
    return (variant, system, str(run["concurrency"]), str(run["requests"]), *numbers, mismatches)


def table_rows(results: dict[str, VariantResult]) -> list[tuple[str, ...]]:
    rows = []
    for variant, result in results.items():
        rows.append(table_row(variant, "in-process", result.reference.to_dict(), 1.0, "-"))
        for run in result.to_dict()["triton"]:
            rows.append(table_row(variant, "triton", run, run["rtfx_vs_reference"], str(run["token_mismatches"])))
    return rows


def align(cell: str, width: int, column: int) -> str:
    """Text columns (variant, system) to the left, numbers to the right."""
    return cell.ljust(width) if column < 2 else cell.rjust(width)


def format_table(results: dict[str, VariantResult]) -> str:
    rows = [COLUMNS, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(align(cell, w, i) for i, (cell, w) in enumerate(zip(row, widths, strict=True))) for row in rows]
    notes = [f"{variant} in-process = {result.reference.label}" for variant, result in results.items()]
    return "\n".join([*lines, "", *notes, "x_ref = Triton RTFx / in-process RTFx; mismatch = served ids != reference"])


def environment() -> dict[str, Any]:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
        "gpu": gpu,
    }


def write_json(
    path: Path, results: dict[str, VariantResult], clips: list[Clip], settings: DeploySettings, args: argparse.Namespace
) -> None:
    benchmark = {
        "variants": list(results),
        "concurrency": list(args.concurrency),
        "requests": args.requests,
        "max_new_tokens": args.max_new_tokens,
        "tiny": args.tiny,
    }
    document = {
        "settings": dataclasses.asdict(settings),
        "benchmark": benchmark,
        "audio": [{"name": clip.name, "seconds": clip.seconds} for clip in clips],
        "environment": environment(),
        "results": {variant: result.to_dict() for variant, result in results.items()},
    }
    path.write_text(json.dumps(document, indent=2))


def plot(path: Path, results: dict[str, VariantResult], settings: DeploySettings) -> bool:
    """RTFx against concurrency per variant, each reference as a dashed horizontal line.

    Returns False (having said so) when matplotlib is not installed: the plot is all it costs.
    """
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("no plot: matplotlib is not installed (`make setup-dev`, or `pip install matplotlib`, adds it)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, (variant, result) in enumerate(results.items()):
        color = f"C{index}"
        levels = [run.concurrency for run in result.triton]
        ax.plot(levels, [run.rtfx for run in result.triton], "o-", color=color, label=f"{variant}: Triton")
        ax.axhline(result.reference.rtfx, color=color, linestyle="--", label=f"{variant}: in-process, one at a time")
    levels = sorted({run.concurrency for result in results.values() for run in result.triton})
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(level) for level in levels])
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("RTFx (audio s / wall s)")
    ax.set_ylim(bottom=0)
    names = ", ".join(Path(getattr(settings, f"{variant}_checkpoint")).name for variant in results)
    ax.set_title(f"Granite Speech: Triton vs in-process ({names}; {settings.device}, {settings.dtype})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- main -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; returns an exit code (0 even when tokens differ: that is reported)."""
    if args.requests < 1:
        raise SystemExit("--requests must be at least 1")
    ports = chosen_ports(args)  # before any model loads
    args.out.mkdir(parents=True, exist_ok=True)
    settings = deploy_settings(args, tiny_checkpoints(args.out / "checkpoints", args.variants) if args.tiny else {})
    clips = load_clips(args.audio_dir or synthesise_audio(args.out / "audio"))
    print(f"{len(clips)} clips, {sum(c.seconds for c in clips):.1f} s of audio; {settings.device} {settings.dtype}")
    if args.requests % len(clips):
        print(f"note: --requests {args.requests} is not a multiple of {len(clips)} clips: the audio mixes differ")
    results = reference_results(args.variants, settings, clips, args.max_new_tokens)
    with serving(settings, args.variants, args.out, ports) as url:
        triton_results(url, results, clips, args)
    report(results, clips, settings, args)
    return 0


def report(
    results: dict[str, VariantResult], clips: list[Clip], settings: DeploySettings, args: argparse.Namespace
) -> None:
    """The table, then results.json, then the plot (the one part that needs an optional library)."""
    print(format_table(results))
    write_json(args.out / "results.json", results, clips, settings, args)
    print(f"wrote {args.out / 'results.json'}")
    if plot(args.out / "rtfx.png", results, settings):
        print(f"wrote {args.out / 'rtfx.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="granite-speech-triton bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    from .cli import main as cli_main  # its error handling: a taken port is one line, not a traceback

    sys.exit(cli_main(["bench", *sys.argv[1:]]))
