"""Synthetic speech for load tests: espeak-ng utterances of mixed lengths and sample rates.

python -m loadtest.synth --out build/loadtest-audio --count 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile

from granite_speech_triton.synth import espeak

SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "speech recognition turns spoken words into written text",
    "please transcribe this short recording for the load test",
    "granite speech runs on the triton inference server",
    "every request carries audio of a different length",
    "the weather today is sunny with a light breeze from the west",
)
SAMPLE_RATES = (16_000, 8_000, 22_050, 44_100, 48_000)  # Hz; the client resamples all but 16 kHz
ESPEAK_RATE = 22_050  # Hz, espeak-ng's own output rate
MAX_REPEATS = 4  # sentences per file: 1 .. MAX_REPEATS (about 2 to 12 s of speech)


def speak(text: str, path: Path, sample_rate: int | None = None, voice: str = "en") -> Path:
    """Write `text` spoken by espeak-ng to `path` (wav), resampled to `sample_rate` if given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, espeak(text, voice, sample_rate), sample_rate or ESPEAK_RATE)
    return path


def make_audio_dir(out: Path, count: int = 8, seed: int = 0) -> list[Path]:
    """`count` wav files of 1..MAX_REPEATS sentences at rotating sample rates; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        repeats = 1 + i % MAX_REPEATS
        words = " ".join(SENTENCES[j] for j in rng.choice(len(SENTENCES), repeats, replace=False))
        rate = SAMPLE_RATES[i % len(SAMPLE_RATES)]
        paths.append(speak(words, out / f"speech_{i:02d}_{repeats}x_{rate}hz.wav", rate))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the wav files to")
    parser.add_argument("--count", type=int, default=8, help="number of files (default 8)")
    args = parser.parse_args(argv)
    for path in make_audio_dir(args.out, args.count):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
