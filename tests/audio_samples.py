"""Test audio: speech synthesised with espeak-ng and deterministic synthetic signals."""

from __future__ import annotations

import numpy as np

from granite_speech_triton.synth import espeak

SAMPLE_RATE = 16_000
SENTENCES = [
    "Granite speech runs on a Triton inference server.",
    "The quick brown fox jumps over the lazy dog, twice, before breakfast.",
    "Bonjour tout le monde.",
]


def synthetic(seconds: float, seed: int) -> np.ndarray:
    """A chirp in noise, `seconds` long, deterministic per seed."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * (150 + 40 * seed + 300 * t / max(seconds, 1e-3)) * t)
    return (tone + 0.05 * rng.standard_normal(t.shape[0])).astype(np.float32)


def fit_length(audio: np.ndarray, seconds: float) -> np.ndarray:
    """Repeat or cut `audio` to exactly `seconds`."""
    n = int(seconds * SAMPLE_RATE)
    reps = -(-n // audio.shape[0])
    return np.tile(audio, reps)[:n].astype(np.float32)


def mixed_lengths() -> list[np.ndarray]:
    """Eight audios from 0.3 s to 30 s; half are real synthesised speech."""
    speech = [espeak(s, voice) for s, voice in zip(SENTENCES, ("en", "en", "fr"), strict=True)]
    return [
        synthetic(0.3, 1),
        fit_length(speech[2], 0.8),
        speech[0],
        synthetic(2.7, 2),
        fit_length(speech[1], 5.3),
        synthetic(9.1, 3),
        fit_length(np.concatenate(speech), 17.4),
        fit_length(np.concatenate([speech[1], synthetic(1.0, 4)]), 30.0),
    ]
