"""A short headless Locust run (`python -m loadtest.run`) against the real test server.

Deterministic whatever the machine's speed: the users share the files out and `--passes 1` ends
the run once each was sent exactly once (`--run-time` is only a generous upper bound).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from granite_speech_client import GraniteSpeechClient

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 12
USERS = 3  # does not divide the 8 files: shares of 3, 3 and 2


def test_one_pass_sends_every_file_once_without_failures_and_batch_invariant_texts(ar_server, tmp_path):
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "loadtest.run", "--server", ar_server.http_url, "--users", str(USERS),
        "--spawn-rate", str(USERS), "--passes", "1", "--run-time", "20m", "--variant", "ar",
        "--max-new-tokens", str(NEW_TOKENS), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    audio = sorted((out / "audio").iterdir())
    texts = json.loads((out / "texts.json").read_text())
    assert {name: sum(counts.values()) for name, counts in texts.items()} == {p.name: 1 for p in audio}
    with (out / "report.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["ensemble"] == "granite_speech" and int(row["failures"]) == 0 and int(row["requests"]) == len(audio)
    assert float(row["rtfx"]) > 0 and float(row["latency_p50_ms"]) <= float(row["latency_p99_ms"])
    with (out / "locust_stats.csv").open() as f:
        aggregated = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    assert aggregated["Failure Count"] == "0" and int(aggregated["Request Count"]) == len(audio)  # Locust's own CSV
    assert "RTFx" in (out / "report.html").read_text() and (out / "locust.html").is_file()

    # The summary on the terminal: the last lines of the output, one row per ensemble.
    summary = done.stdout[done.stdout.index("load test summary") :].splitlines()
    assert summary[1].split() == ["ensemble", "requests", "failures", "audio_s", "RTFx", "p50_ms", "p95_ms", "p99_ms"]
    assert summary[2].split() == [row[c] for c in ("ensemble", "requests", "failures", "audio_seconds", "rtfx")] + [
        row[f"latency_p{p}_ms"] for p in (50, 95, 99)
    ]
    assert re.match(r"RTFx = audio seconds", summary[3])

    with GraniteSpeechClient(ar_server.http_url, "http") as client:
        for path in audio:
            alone = client.transcribe(path, max_new_tokens=NEW_TOKENS).text
            assert list(texts[path.name]) == [alone], f"{path.name}: texts under load differ from a single request"
