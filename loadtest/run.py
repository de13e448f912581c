"""One command for a bounded, headless load test (wraps `locust --headless`).

    python -m loadtest.run --server 127.0.0.1:8000 --users 4 --spawn-rate 4 --run-time 20s \
        --audio-dir DIR --variant ar

Without --audio-dir, synthetic speech (espeak-ng, mixed lengths and sample rates) is written
to OUT/audio first. OUT (default loadtest/results) receives Locust's CSV and HTML reports
(locust_*.csv, locust.html) and ours (report.csv, report.html with RTFx and latency
percentiles per ensemble, texts.json); our summary is printed last. With --passes K the run
ends once every file was sent K times (--run-time is then only an upper bound). The exit code
is Locust's: 0 when no request failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .report import format_summary, read_rows
from .synth import make_audio_dir

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="127.0.0.1:8000", help="host:port of Triton (HTTP port for http)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--users", type=int, default=4, help="concurrent users (default 4)")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second (default 4)")
    parser.add_argument("--run-time", default="20s", help="duration, e.g. 20s, 5m (default 20s)")
    parser.add_argument(
        "--passes", type=int, default=0, help="send every file this often, then stop (0: until --run-time)"
    )
    parser.add_argument("--audio-dir", type=Path, default=None, help="wav/flac/ogg files (default: synthesize)")
    parser.add_argument("--variant", choices=("ar", "nar", "mix"), default="ar", help="mix: AR and NAR alternate")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="AR decode limit (0: server default)")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results", help="report folder")
    parser.add_argument("--stop-timeout", default="60", help="seconds users may finish their request at the end")
    parser.add_argument(
        "--bad-every", type=int, default=0, help="every Nth request of a user is a bad one, expected INVALID_ARG"
    )
    return parser


def locust_command(args: argparse.Namespace, audio_dir: Path) -> list[str]:
    out = args.out.resolve()
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        f"--users={args.users}",
        f"--spawn-rate={args.spawn_rate}",
        f"--run-time={args.run_time}",
        f"--stop-timeout={args.stop_timeout}",
        f"--host={args.server}",
        f"--csv={out / 'locust'}",
        f"--html={out / 'locust.html'}",
        f"--audio-dir={audio_dir.resolve()}",
        f"--variant={args.variant}",
        f"--protocol={args.protocol}",
        f"--max-new-tokens={args.max_new_tokens}",
        f"--passes={args.passes}",
        f"--report-dir={out}",
        f"--bad-every={args.bad_every}",
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    audio_dir = args.audio_dir
    if audio_dir is None:
        audio_dir = args.out / "audio"
        make_audio_dir(audio_dir)
    code = subprocess.run(locust_command(args, audio_dir), cwd=ROOT).returncode
    report = args.out / "report.csv"
    if report.is_file():
        print(f"\nload test summary ({args.users} users, {args.protocol}; reports in {args.out}):")
        print(format_summary(read_rows(report)), flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
