"""A short headless Locust run (`python -m loadtest.run`) against the real test server."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from granite_speech_client import GraniteSpeechClient

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 12


def test_short_load_run_has_no_failures_and_batch_invariant_texts(ar_server, tmp_path):
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "loadtest.run", "--server", ar_server.http_url, "--users", "4", "--spawn-rate", "4",
        "--run-time", "15s", "--variant", "ar", "--max-new-tokens", str(NEW_TOKENS), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with (out / "report.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["ensemble"] == "granite_speech" and int(row["failures"]) == 0 and int(row["requests"]) >= 8
    assert float(row["rtfx"]) > 0 and float(row["latency_p50_ms"]) <= float(row["latency_p99_ms"])
    with (out / "locust_stats.csv").open() as f:
        aggregated = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    assert aggregated["Failure Count"] == "0" and int(aggregated["Request Count"]) > 0  # Locust's own CSV
    assert "RTFx" in (out / "report.html").read_text() and (out / "locust.html").is_file()

    texts = json.loads((out / "texts.json").read_text())
    audio = sorted((out / "audio").iterdir())
    assert sorted(texts) == [p.name for p in audio], "every file was sent"
    assert sum(sum(counts.values()) for counts in texts.values()) == int(row["requests"])
    with GraniteSpeechClient(ar_server.http_url, "http") as client:
        for path in audio:
            alone = client.transcribe(path, max_new_tokens=NEW_TOKENS).text
            assert list(texts[path.name]) == [alone], f"{path.name}: texts under load differ from a single request"
