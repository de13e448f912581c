"""What the load test reports beyond Locust's own statistics.

Per ensemble: requests, failures, audio seconds processed, RTFx (audio seconds per second of
wall time), throughput and latency percentiles. Written as CSV and as a small HTML page; the
texts each file received are written too, so a test can check them against single requests.
"""

from __future__ import annotations

import csv
import html
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)
COLUMNS = (
    "ensemble",
    "requests",
    "failures",
    "audio_seconds",
    "wall_seconds",
    "rtfx",
    "requests_per_s",
    "latency_mean_ms",
    *(f"latency_p{p}_ms" for p in PERCENTILES),
    "latency_max_ms",
)


@dataclass
class EnsembleStats:
    latencies_ms: list[float] = field(default_factory=list)  # successful requests only
    failures: int = 0
    audio_seconds: float = 0.0

    def row(self, name: str, wall_s: float) -> dict[str, Any]:
        latencies = np.asarray(self.latencies_ms or [float("nan")])
        row = {
            "ensemble": name,
            "requests": len(self.latencies_ms) + self.failures,
            "failures": self.failures,
            "audio_seconds": round(self.audio_seconds, 3),
            "wall_seconds": round(wall_s, 3),
            "rtfx": round(self.audio_seconds / wall_s, 3) if wall_s > 0 else 0.0,
            "requests_per_s": round(len(self.latencies_ms) / wall_s, 3) if wall_s > 0 else 0.0,
            "latency_mean_ms": round(float(latencies.mean()), 1),
            "latency_max_ms": round(float(latencies.max()), 1),
        }
        for p in PERCENTILES:
            row[f"latency_p{p}_ms"] = round(float(np.percentile(latencies, p)), 1)
        return row


class LoadReport:
    """Collects Locust request events; `write` produces report.csv, report.html and texts.json."""

    def __init__(self) -> None:
        self.stats: dict[str, EnsembleStats] = defaultdict(EnsembleStats)
        self.texts: dict[str, Counter[str]] = defaultdict(Counter)  # file -> text -> times received
        self.started = self.stopped = 0.0

    def start(self) -> None:
        """A new test begins (the web UI may run several): forget the previous one."""
        self.stats.clear()
        self.texts.clear()
        self.started = time.monotonic()

    def stop(self) -> None:
        self.stopped = time.monotonic()

    def on_request(self, name: str, response_time: float, exception: BaseException | None, context: dict) -> None:
        stats = self.stats[name]
        if exception is not None:
            stats.failures += 1
            return
        stats.latencies_ms.append(response_time)
        stats.audio_seconds += context.get("audio_seconds", 0.0)
        if "file" in context:
            self.texts[context["file"]][context.get("text", "")] += 1

    def rows(self) -> list[dict[str, Any]]:
        wall = max(self.stopped - self.started, 0.0)
        rows = [stats.row(name, wall) for name, stats in sorted(self.stats.items())]
        if len(rows) > 1:
            total = EnsembleStats(
                [t for s in self.stats.values() for t in s.latencies_ms],
                sum(s.failures for s in self.stats.values()),
                sum(s.audio_seconds for s in self.stats.values()),
            )
            rows.append(total.row("all", wall))
        return rows

    def write(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        paths = [out / "report.csv", out / "report.html", out / "texts.json"]
        with paths[0].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        paths[1].write_text(render_html(rows))
        paths[2].write_text(
            json.dumps({k: dict(v) for k, v in sorted(self.texts.items())}, indent=1, ensure_ascii=False)
        )
        return paths


SUMMARY = (  # (column, heading) of the summary printed on the terminal
    ("ensemble", "ensemble"),
    ("requests", "requests"),
    ("failures", "failures"),
    ("audio_seconds", "audio_s"),
    ("rtfx", "RTFx"),
    ("latency_p50_ms", "p50_ms"),
    ("latency_p95_ms", "p95_ms"),
    ("latency_p99_ms", "p99_ms"),
)


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a report.csv that `LoadReport.write` made."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def align(cell: str, width: int, column: int) -> str:
    """The ensemble name to the left, numbers to the right."""
    return cell.ljust(width) if column == 0 else cell.rjust(width)


def format_summary(rows: list[dict[str, Any]]) -> str:
    """Requests, failures, RTFx and latency percentiles per ensemble, as an aligned text table."""
    table = [[heading for _, heading in SUMMARY], *([str(row[column]) for column, _ in SUMMARY] for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(SUMMARY))]
    lines = [
        "  ".join(align(cell, width, i) for i, (cell, width) in enumerate(zip(line, widths, strict=True)))
        for line in table
    ]
    return "\n".join([*lines, "RTFx = audio seconds transcribed per wall second, all users together"])


def render_html(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in COLUMNS) + "</tr>" for r in rows)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Granite Speech load test</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:4px 8px;text-align:right}</style></head><body>"
        "<h1>Granite Speech load test</h1>"
        "<p>RTFx = seconds of audio transcribed per second of wall time (all users together). "
        "Latencies are per request (one audio file), successful requests only.</p>"
        f"<table><tr>{head}</tr>{body}</table></body></html>\n"
    )
