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
