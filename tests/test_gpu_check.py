"""`make gpu-check` (granite_speech_triton/gpu_check.py) run on the CPU with tiny sizes, so that it cannot rot.

The same script, the same steps as on a GPU: checkpoints written, in-process references, both
ensembles served, the served ids compared (exact: float32), every benchmark level measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from granite_speech_triton import gpu_check
from granite_speech_triton.export.check import edit_distance


def test_synthetic_audio_spans_the_clip_lengths_and_passes_the_input_checks():
    clips = gpu_check.audio_set(5, seed=0)
    lengths = sorted(gpu_check.seconds(c) for c in clips)
    assert lengths[0] == pytest.approx(gpu_check.SHORTEST_CLIP_S) and lengths[-1] == pytest.approx(20.0)
    assert all(c.dtype == np.float32 and 0.5 < np.abs(c).max() <= 1.0 for c in clips)
    assert [gpu_check.ar_tokens(c) for c in clips] != [gpu_check.ar_tokens(clips[0])] * 5  # longer clips, more tokens


@pytest.mark.parametrize(
    ("a", "b", "distance"), [([], [], 0), ([1, 2, 3], [1, 3], 1), ([1, 2], [2, 1], 2), ([], [4], 1)]
)
def test_edit_distance(a, b, distance):
    assert edit_distance(a, b) == distance == edit_distance(b, a)


@pytest.mark.server
def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    sizes = ["--size", "tiny", "--device", "cpu", "--dtype", "float32", "--check-requests", "6"]
    levels = ["--concurrency", "1,3", "--requests-per-level", "4", "--max-batch-size", "4", "--longest-clip", "6"]
    argv = [*sizes, *levels, "--out", str(tmp_path)]
    assert gpu_check.main(argv) == 0  # float32: a single served id that differs fails the run

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["checkpoints"]) == {"ar", "nar"} and results["server_ready_s"] > 0
    for variant in ("ar", "nar"):
        check = results["check"][variant]
        assert check["requests"] == 6 and check["mismatched_requests"] == 0 and check["reference_tokens"] > 0
        levels = results["bench"][variant]
        assert [level["concurrency"] for level in levels] == [1, 3]
        for level in levels:
            assert level["requests"] == 4 and level["rtfx"] > 0 and level["latency_p95_s"] >= level["latency_p50_s"]
            assert level["peak_gpu_memory_gib"] is None  # no GPU here
    printed = capsys.readouterr().out
    assert "token mismatch rate 0.00%" in printed and "RTFx" in printed
