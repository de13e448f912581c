"""Smoke tests of the side-by-side benchmark (granite_speech_triton/bench.py): structure, never timings."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from audio_samples import SAMPLE_RATE, espeak, synthetic

from granite_speech_triton import bench
from granite_speech_triton.serving.repository import DeploySettings

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {"system", "label", "concurrency", "requests", "audio_seconds", "wall_s", "rtfx", "latency_p50_s",
            "latency_p95_s", "token_mismatches", "first_differences", "failures"}  # fmt: skip


def test_concurrency_levels_are_parsed_and_checked():
    assert bench.parse_levels("1,8,32") == (1, 8, 32)
    for bad in ("", "0,2", "one"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_levels(bad)


def test_first_difference_names_the_first_differing_token():
    assert bench.first_difference((1, 2, 3), [1, 2, 3]) is None
    assert bench.first_difference((1, 5, 3), [1, 2, 3]) == 1
    assert bench.first_difference((1, 2), [1, 2, 3]) == 2


def test_a_run_without_successful_requests_still_reports():
    summary = bench.Run("triton", "label", 4, 0.0, 1.0, [], token_mismatches=0, failures=3).to_dict()
    assert set(summary) == RUN_KEYS
    assert summary["requests"] == 3 and summary["rtfx"] == 0.0 and summary["latency_p50_s"] is None


def test_default_audio_set_is_real_speech_of_mixed_lengths(tmp_path: Path):
    clips = bench.load_clips(bench.synthesise_audio(tmp_path))
    seconds = sorted(clip.seconds for clip in clips)
    assert len(clips) == len(bench.SPEECH_SET)
    assert 0.5 < seconds[0] < 2.0 and 15.0 < seconds[-1] < 25.0
    assert all(clip.audio.dtype.name == "float32" and abs(clip.audio).max() > 0.05 for clip in clips)


@pytest.mark.server
def test_tiny_benchmark_writes_json_table_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    soundfile.write(audio_dir / "speech.wav", espeak("Granite speech runs on Triton."), SAMPLE_RATE)
    soundfile.write(audio_dir / "tone.wav", synthetic(2.7, 2), SAMPLE_RATE)
    argv = ["--tiny", "--variants", "ar", "--concurrency", "1,2", "--requests", "2", "--max-new-tokens", "4"]
    assert bench.main([*argv, "--audio-dir", str(audio_dir), "--out", str(tmp_path / "bench")]) == 0

    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["benchmark"]["concurrency"] == [1, 2]
    assert results["settings"]["ar_checkpoint"] == str(tmp_path / "bench" / "checkpoints" / "tiny-ar")
    assert [a["name"] for a in results["audio"]] == ["speech.wav", "tone.wav"]
    ar = results["results"]["ar"]
    assert set(ar["reference"]) == RUN_KEYS and "transformers" in ar["reference"]["label"]
    assert ar["reference"]["rtfx"] > 0 and ar["reference"]["requests"] == 2
    assert [run["concurrency"] for run in ar["triton"]] == [1, 2]
    for run in ar["triton"]:
        assert set(run) == RUN_KEYS | {"rtfx_vs_reference"}
        assert run["requests"] == 2 and run["failures"] == 0
        assert run["rtfx"] > 0 and run["rtfx_vs_reference"] > 0 and run["latency_p95_s"] >= run["latency_p50_s"]
        assert isinstance(run["token_mismatches"], int)  # counted, never fatal: exactness has its own tests

    printed = capsys.readouterr().out
    assert "RTFx" in printed and "x_ref" in printed and "in-process" in printed

    png = tmp_path / "bench" / "rtfx.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] > (100, 100)


def test_without_matplotlib_only_the_plot_is_missing(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails as if not installed
    reference = bench.Run("reference", "in-process", 1, 10.0, 2.0, [1.0, 1.0])
    result = bench.VariantResult(reference, [[1, 2]], [bench.Run("triton", "ensemble", 2, 10.0, 1.0, [0.5], 0)])
    args = argparse.Namespace(out=tmp_path, concurrency=(2,), requests=2, max_new_tokens=4, tiny=True)
    clips = [bench.Clip("a.wav", np.zeros(bench.SAMPLE_RATE, np.float32))]
    bench.report({"ar": result}, clips, DeploySettings(), args)
    printed = capsys.readouterr().out
    assert "RTFx" in printed and "x_ref" in printed
    assert json.loads((tmp_path / "results.json").read_text())["results"]["ar"]["triton"][0]["rtfx"] == 10.0
    assert "no plot: matplotlib is not installed (`make setup-dev`, or `pip install matplotlib`, adds it)" in printed
    assert not (tmp_path / "rtfx.png").exists()
