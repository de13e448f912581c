"""Synthetic speech from espeak-ng, for tests, the benchmark, the load test and samples."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import soxr

from .model.audio import SAMPLE_RATE


def espeak(text: str, voice: str = "en", sample_rate: int | None = SAMPLE_RATE) -> np.ndarray:
    """`text` spoken by espeak-ng as float32 mono, resampled to `sample_rate` (None: espeak's own 22.05 kHz)."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng; `make setup-dev` does it)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
        audio, rate = soundfile.read(path, dtype="float32")
    if sample_rate is not None and sample_rate != rate:
        audio = soxr.resample(audio, rate, sample_rate)
    return audio.astype(np.float32)


SPEECH_LEVEL = 0.01  # of a word's peak: quieter samples at its edges are silence


def spoken_words(
    words: list[str], gaps_s: list[float], voice: str = "en"
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Each word spoken alone and trimmed to its speech, joined by silences: `gaps_s[0]` before the first
    word, `gaps_s[i]` between word i-1 and word i, `gaps_s[len(words)]` after the last.

    Returns the 16 kHz audio and every word's (start, end) in seconds: known word boundaries.
    """
    if len(gaps_s) != len(words) + 1:
        raise ValueError(f"{len(words)} words need {len(words) + 1} gaps, got {len(gaps_s)}")
    parts, bounds, position = [], [], 0
    for word, gap in zip(words, gaps_s, strict=False):
        audio = espeak(word, voice)
        loud = np.flatnonzero(np.abs(audio) > SPEECH_LEVEL * np.abs(audio).max())
        speech = audio[loud[0] : loud[-1] + 1]
        silence = np.zeros(int(gap * SAMPLE_RATE), dtype=np.float32)
        parts += [silence, speech]
        position += silence.shape[0]
        bounds.append((position / SAMPLE_RATE, (position + speech.shape[0]) / SAMPLE_RATE))
        position += speech.shape[0]
    parts.append(np.zeros(int(gaps_s[-1] * SAMPLE_RATE), dtype=np.float32))
    return np.concatenate(parts), bounds
