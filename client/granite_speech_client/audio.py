"""Audio on the client: decode, downmix, resample to 16 kHz, and split long audio at quiet points.

Only numpy, soundfile (decoding) and soxr (resampling); no torch.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import soxr

from .errors import AudioInputError

SAMPLE_RATE = 16_000  # Hz; the only rate the server accepts
MIN_SAMPLES = 257  # the server's lower bound (n_fft / 2 + 1 samples)
ENERGY_HOP_S = 0.010  # s; short-time energy is measured in 10 ms blocks
ENERGY_SMOOTH_BLOCKS = 3  # blocks summed into one 30 ms energy window
QUIET_FACTOR = 2.0  # a window is quiet when its energy is at most this times the quietest one's
SEARCH_S = 8.0  # s; a cut is searched in the last SEARCH_S seconds before the limit
OVERLAP_S = 0.2  # s; each piece starts this much before the previous cut
LIMIT_MARGIN_S = 0.5  # s; pieces stay this far below the server's limit

AudioSource = str | os.PathLike | bytes | bytearray | BinaryIO | np.ndarray


def load_audio(source: AudioSource, sample_rate: int | None = None) -> np.ndarray:
    """A file path, file bytes, binary file object or numpy array -> mono float32 [samples] at 16 kHz.

    Arrays are [samples] or [samples, channels] (soundfile's layout); `sample_rate` is required
    for them and ignored (must be None or match) for files, whose header gives the rate.
    """
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise AudioInputError("sample_rate is required when audio is a numpy array")
        samples, rate = _as_float(source), int(sample_rate)
    else:
        samples, rate = _decode(source)
    return to_mono_16k(samples, rate)


def _decode(source: str | os.PathLike | bytes | bytearray | BinaryIO) -> tuple[np.ndarray, int]:
    if isinstance(source, (bytes, bytearray)):
        name, source = "audio bytes", io.BytesIO(source)
    elif hasattr(source, "read"):
        name = "audio file"
    else:
        name = str(source)
        if not Path(source).is_file():
            raise AudioInputError(f"{name}: no such file")
    try:
        samples, rate = soundfile.read(source, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        detail = getattr(exc, "error_string", None) or str(exc)
        raise AudioInputError(f"{name}: not a readable audio file (wav, flac, ogg...): {detail}") from exc
    return samples, rate


def _as_float(array: np.ndarray) -> np.ndarray:
    """Integer PCM -> float in [-1, 1); float arrays -> float32."""
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        scale = float(info.max) + 1.0
        offset = 0.0 if info.min < 0 else scale / 2  # unsigned PCM (e.g. uint8) is centred on 2**(bits-1)
        return ((array.astype(np.float64) - offset) / (scale - offset)).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise AudioInputError(f"audio array must hold integer or float samples, got dtype {array.dtype}")


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """[samples] or [samples, channels] at any rate -> contiguous float32 [samples] at 16 kHz."""
    if samples.ndim == 2:
        samples = samples.mean(axis=1)  # downmix
    if samples.ndim != 1:
        raise AudioInputError(f"audio must be [samples] or [samples, channels], got shape {list(samples.shape)}")
    if sample_rate <= 0:
        raise AudioInputError(f"sample rate must be positive, got {sample_rate}")
    if samples.shape[0] == 0:
        raise AudioInputError("audio is empty")
    if sample_rate != SAMPLE_RATE:
        samples = soxr.resample(samples.astype(np.float32), sample_rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(samples, dtype=np.float32)


@dataclass(frozen=True)
class Span:
    """One piece of a long waveform: samples [start, end) at 16 kHz."""

    start: int
    end: int

    @property
    def seconds(self) -> tuple[float, float]:
        return self.start / SAMPLE_RATE, self.end / SAMPLE_RATE


def split_points(audio: np.ndarray, max_seconds: float) -> list[Span]:
    """Pieces no longer than `max_seconds - LIMIT_MARGIN_S`, cut at the quietest point near each limit.

    Each cut lies in the last SEARCH_S seconds a piece may span, at the middle of the quietest
    stretch there; the next piece starts OVERLAP_S before the cut so no word edge is lost.
    """
    max_len = int((max_seconds - LIMIT_MARGIN_S) * SAMPLE_RATE)
    overlap = int(OVERLAP_S * SAMPLE_RATE)
    if max_len <= 2 * overlap:
        raise ValueError(f"max_seconds {max_seconds} is too small to split audio")
    spans, start = [], 0
    while audio.shape[0] - start > max_len:
        search = min(int(SEARCH_S * SAMPLE_RATE), max_len // 2)
        cut = quietest_point(audio, start + max_len - search, start + max_len)
        spans.append(Span(start, cut))
        start = cut - overlap
    spans.append(Span(start, audio.shape[0]))
    return spans


def quietest_point(audio: np.ndarray, lo: int, hi: int) -> int:
    """The sample index in [lo, hi) at the middle of the longest quiet stretch.

    Quiet = 30 ms windows whose energy is within QUIET_FACTOR of the quietest window there, so
    the cut lands in the middle of the longest pause rather than in a short gap between words.
    """
    hop = int(ENERGY_HOP_S * SAMPLE_RATE)
    blocks = audio[lo : lo + (hi - lo) // hop * hop].astype(np.float64).reshape(-1, hop)
    window = np.ones(ENERGY_SMOOTH_BLOCKS)
    energy = np.convolve((blocks**2).sum(axis=1), window, mode="valid")  # [n_blocks - 2]; i covers blocks i..i+2
    quiet = np.concatenate(([0], energy <= energy.min() * QUIET_FACTOR + 1e-12, [0])).astype(np.int8)
    edges = np.flatnonzero(np.diff(quiet))  # alternating run starts and ends (exclusive)
    starts, ends = edges[0::2], edges[1::2]
    longest = int(np.argmax(ends - starts))
    first, last = int(starts[longest]), int(ends[longest]) - 1  # quiet windows first .. last
    return lo + (first + last + ENERGY_SMOOTH_BLOCKS) * hop // 2  # middle of blocks first .. last + 2


PROBE_SECONDS = 0.5  # length of the health check's request
PROBE_HZ = 440.0
PROBE_AMPLITUDE = 0.1


def probe_audio() -> np.ndarray:
    """The deep health check's audio: half a second of a quiet tone, [samples] at 16 kHz. Real
    signal on purpose: digital silence is answered without running the models."""
    t = np.arange(int(PROBE_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
    return (PROBE_AMPLITUDE * np.sin(2 * np.pi * PROBE_HZ * t)).astype(np.float32)


def is_digital_silence(audio: np.ndarray) -> bool:
    return not np.any(audio)
