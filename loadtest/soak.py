"""Soak: a long mixed load on a running server, watching the memory of its processes.

    python -m loadtest.soak --server 127.0.0.1:8000 --duration 10m --warmup 2m --users 4 --bad-every 10

Runs the load test (`loadtest.run`: Locust, the AR and NAR ensembles alternating request by
request, audio of mixed lengths and sample rates, every --bad-every-th request a bad one that must
be answered INVALID_ARG) for --duration, and samples the resident memory (VmRSS) of tritonserver and
of every Python backend stub, by model, every --sample-every seconds. It runs on the server's
machine: the server is the tritonserver process listening on the --server port.

Prints the load test's summary (failures per ensemble; `invalid_requests` counts the bad requests,
a failure being one not answered INVALID_ARG with its own message) and the memory of each process
at the start, after --warmup and at the end, with the growth after warm-up; writes soak.json and
rss.csv (every sample) to --out. Exit code: 0 when no request failed and the server kept running
(the memory target, less than 5 % growth after warm-up, is reported, not enforced).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from locust.util.timespan import parse_timespan

from granite_speech_triton.serving.supervisor import children, stub_model

from .report import format_summary, read_rows
from .run import ROOT, build_parser, locust_command
from .synth import make_audio_dir

GROWTH_TARGET = 5.0  # % of RSS growth after warm-up that the soak aims below
MIB = 1024.0  # VmRSS is in KiB


def find_server(http_port: int) -> int:
    """The pid of the tritonserver listening on `http_port` on this machine."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
            continue
        if argv[0].endswith("tritonserver") and f"--http-port={http_port}" in argv:
            return int(entry.name)
    raise SystemExit(
        f"no tritonserver with --http-port={http_port} on this machine: run the soak where the server runs"
    )


def server_processes(server_pid: int) -> dict[str, int]:
    """{"tritonserver": pid, "<model> stub": pid, ...}; a model's second instance is "<model> stub #2"."""
    found = {"tritonserver": server_pid}
    for pid in sorted(children(server_pid)):
        if model := stub_model(pid):
            name, n = f"{model} stub", 1
            while name in found:
                n += 1
                name = f"{model} stub #{n}"
            found[name] = pid
    return found


def rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / MIB
    return None


def sample(processes: dict[str, int]) -> dict[str, float | None]:
    return {name: rss_mib(pid) for name, pid in processes.items()}


def build_soak_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="127.0.0.1:8000", help="host:port of Triton's HTTP port (this machine)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--grpc-port", type=int, default=0, help="with --protocol grpc: the gRPC port")
    parser.add_argument("--duration", default="10m", help="how long the load runs, e.g. 10m, 1h")
    parser.add_argument("--warmup", default="2m", help="memory growth is measured from this point on")
    parser.add_argument("--sample-every", type=float, default=30.0, help="seconds between memory samples")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--bad-every", type=int, default=10, help="every Nth request of a user is a bad one")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="AR decode limit (0: server default)")
    parser.add_argument("--count", type=int, default=12, help="synthetic audio files (without --audio-dir)")
    parser.add_argument("--audio-dir", type=Path, default=None, help="wav/flac/ogg files (default: synthesize)")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "soak", help="report folder")
    return parser


def load_arguments(args: argparse.Namespace, audio_dir: Path) -> argparse.Namespace:
    """The `loadtest.run` arguments of the soak's load."""
    host, port = args.server.rsplit(":", 1)
    target = f"{host}:{args.grpc_port}" if args.protocol == "grpc" else args.server
    return build_parser().parse_args(
        [
            f"--server={target}",
            f"--protocol={args.protocol}",
            f"--users={args.users}",
            f"--spawn-rate={args.users}",
            f"--run-time={args.duration}",
            "--variant=mix",
            f"--bad-every={args.bad_every}",
            f"--max-new-tokens={args.max_new_tokens}",
            f"--audio-dir={audio_dir}",
            f"--out={args.out}",
        ]
    )


def growth(before: float | None, after: float | None) -> float | None:
    return None if not before or after is None else 100.0 * (after - before) / before


def memory_table(points: dict[str, dict[str, float | None]]) -> list[dict[str, object]]:
    """One row per process and a total: RSS (MiB) at start, after warm-up, at the end, growth after warm-up."""
    names = list(points["start"])
    rows = []
    for name in [*names, "total"]:
        values = {
            point: (sum(v for v in sample.values() if v) if name == "total" else sample.get(name))
            for point, sample in points.items()
        }
        rows.append({"process": name, **values, "growth_after_warmup_%": growth(values["warmup"], values["end"])})
    return rows


def format_memory(rows: list[dict[str, object]]) -> str:
    def cell(value: object) -> str:
        return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)

    header = ["process", "start_MiB", "warmup_MiB", "end_MiB", "growth_after_warmup_%"]
    keys = ["process", "start", "warmup", "end", "growth_after_warmup_%"]
    table = [header, *([cell(row[k]) for k in keys] for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in table
    )


def run_load(args: argparse.Namespace, processes: dict[str, int], warmup_s: float) -> tuple[int, dict, list]:
    """Run the load while sampling memory: (Locust's exit code, the three points, every sample)."""
    audio_dir = args.audio_dir
    if audio_dir is None:
        audio_dir = args.out / "audio"
        make_audio_dir(audio_dir, args.count)
    points = {"start": sample(processes)}
    started = time.monotonic()
    series = [(0.0, points["start"])]
    load = subprocess.Popen(locust_command(load_arguments(args, audio_dir), audio_dir), cwd=ROOT)
    while load.poll() is None:
        time.sleep(min(args.sample_every, 1.0))
        elapsed = time.monotonic() - started
        if elapsed - series[-1][0] >= args.sample_every:
            series.append((elapsed, sample(processes)))
        if "warmup" not in points and elapsed >= warmup_s:
            points["warmup"] = sample(processes)
    points.setdefault("warmup", series[-1][1])  # a run shorter than its warm-up
    points["end"] = sample(processes)
    series.append((time.monotonic() - started, points["end"]))
    return load.returncode, points, series


def write_reports(out: Path, result: dict, series: list) -> None:
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    names = list(series[0][1])
    with (out / "rss.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seconds", *names])
        writer.writerows([round(t, 1), *(round(s[n], 1) if s.get(n) else "" for n in names)] for t, s in series)


def print_summary(args: argparse.Namespace, rows: list[dict], memory: list[dict], failed: int) -> None:
    where = f"{args.users} users, {args.protocol}, AR and NAR mixed, reports in {args.out}"
    print(f"\nsoak summary ({args.duration}, {where}):")
    print(format_summary(rows) if rows else "no load report: the load test did not run")
    print(f"\nresident memory (VmRSS) of the server's processes:\n{format_memory(memory)}")
    total = memory[-1]["growth_after_warmup_%"]
    verdict = "met" if total is not None and total < GROWTH_TARGET else "missed"
    total_text = "-" if total is None else f"{total:+.1f} %"
    print(f"failed requests: {failed}; growth after warm-up: {total_text} (target < {GROWTH_TARGET:g} %: {verdict})")


def main(argv: list[str] | None = None) -> int:
    args = build_soak_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    processes = server_processes(find_server(int(args.server.rsplit(":", 1)[1])))
    code, points, series = run_load(args, processes, parse_timespan(args.warmup))
    restarted = any(rss_mib(pid) is None for pid in processes.values())
    rows = read_rows(args.out / "report.csv") if (args.out / "report.csv").is_file() else []
    memory = memory_table(points)
    failed = sum(int(row["failures"]) for row in rows if row["ensemble"] != "all")
    result = {"duration": args.duration, "warmup": args.warmup, "load": rows, "memory": memory, "restarted": restarted}
    write_reports(args.out, result, series)
    print_summary(args, rows, memory, failed)
    if restarted:
        print("a server process ended during the soak (a stage died and the launcher restarted the server?)")
    return 0 if code == 0 and failed == 0 and rows and not restarted else 1


if __name__ == "__main__":
    sys.exit(main())
