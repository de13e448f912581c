"""Audio front end shared by the AR and NAR models: log-mel features stacked to 160 dims.

Reproduces torchaudio's `MelSpectrogram(sample_rate=16000, n_fft=512, win_length=400,
hop_length=160, n_mels=80)` with plain torch, followed by Granite Speech's log compression
and frame stacking (MODEL_SPEC.md section 1).
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np
import torch

from .errors import RequestError

SAMPLE_RATE = 16_000  # Hz; the only rate the server accepts
N_FFT = 512  # samples (32 ms)
WIN_LENGTH = 400  # samples (25 ms), zero-padded to N_FFT and centred
HOP_LENGTH = 160  # samples (10 ms per mel frame)
N_MELS = 80
F_MAX = SAMPLE_RATE / 2  # Hz
STACK = 2  # mel frames stacked into one encoder frame (20 ms)
FEATURE_DIM = N_MELS * STACK  # 160
LOG_FLOOR = 1e-10  # power floor before log10
DYNAMIC_RANGE = 8.0  # log10 units kept below the utterance's maximum
MIN_SAMPLES = SAMPLE_RATE // 10  # 0.1 s: five NAR encoder frames, one projector row
MAX_PEAK = 2.0  # float audio lives in [-1, 1]; far beyond means integer PCM sent as float


class Framing(str, Enum):
    """How mel frames are paired into encoder frames.

    AR: drop the last mel frame when the count is odd (transformers' feature extractor).
    NAR: keep exactly 2 * (samples // 320) mel frames, truncating before the log/max step.
    """

    AR = "ar"
    NAR = "nar"


def _hz_to_mel(freq: float) -> float:
    return 2595.0 * math.log10(1.0 + freq / 700.0)


def _mel_to_hz(mels: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int = N_FFT // 2 + 1, n_mels: int = N_MELS) -> torch.Tensor:
    """Triangular HTK-scale filters without normalisation: [n_freqs, n_mels] (float32)."""
    all_freqs = torch.linspace(0, SAMPLE_RATE // 2, n_freqs)
    mel_points = torch.linspace(_hz_to_mel(0.0), _hz_to_mel(F_MAX), n_mels + 2)
    hz_points = _mel_to_hz(mel_points)
    widths = hz_points[1:] - hz_points[:-1]  # [n_mels + 1]
    slopes = hz_points.unsqueeze(0) - all_freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


class LogMelFrontEnd:
    """Waveform [samples] -> stacked log-mel features [frames, 160], one utterance at a time.

    Utterances are processed one by one because the log compression normalises by each
    utterance's own maximum; batching with padding would change it.
    """

    def __init__(self, framing: Framing, device: str | torch.device = "cpu") -> None:
        self.framing = Framing(framing)
        self.device = torch.device(device)
        self.window = torch.hann_window(WIN_LENGTH, periodic=True, device=self.device)
        self.filters = mel_filterbank().to(self.device)

    def mel_power(self, audio: torch.Tensor) -> torch.Tensor:
        """[samples] -> mel power spectrogram [frames, 80] with frames = 1 + samples // 160."""
        spec = torch.stft(
            audio,
            n_fft=N_FFT,
            hop_length=HOP_LENGTH,
            win_length=WIN_LENGTH,
            window=self.window,
            center=True,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )  # [257, frames]
        power = spec.abs().pow(2.0)
        return torch.matmul(power.transpose(0, 1), self.filters)  # [frames, 80]

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        """[samples] float32 -> [frames, 160] float32."""
        audio = audio.to(self.device, torch.float32)
        mel = self.mel_power(audio)  # [1 + samples // 160, 80]
        if self.framing is Framing.NAR:
            mel = mel[: STACK * nar_encoder_length(audio.shape[0])]
        logmel = mel.clamp(min=LOG_FLOOR).log10()
        logmel = torch.maximum(logmel, logmel.max() - DYNAMIC_RANGE) / 4.0 + 1.0
        if logmel.shape[0] % STACK:
            logmel = logmel[:-1]
        return logmel.reshape(-1, FEATURE_DIM)  # [frames // 2, 160]


def nar_encoder_length(num_samples: int) -> int:
    """Encoder frames the NAR model keeps for an utterance: samples // 320."""
    return num_samples // (HOP_LENGTH * STACK)


def ar_encoder_length(num_samples: int) -> int:
    """Encoder frames of the AR framing rule: (1 + samples // 160) // 2."""
    return (num_samples // HOP_LENGTH + 1) // STACK


def check_waveform(audio: np.ndarray, sample_rate: int, max_samples: int) -> torch.Tensor:
    """Validate one request's waveform and return it as a float32 tensor [samples].

    Raises RequestError naming the problem: wrong rate or rank, empty, too short or too long,
    non-finite samples, or integer-scaled samples. Digital silence is valid (see `is_silent`).
    """
    if sample_rate != SAMPLE_RATE:
        raise RequestError(f"SAMPLE_RATE {sample_rate} Hz is not supported; resample to {SAMPLE_RATE} Hz")
    if audio.ndim != 1:
        raise RequestError(f"AUDIO must be one mono waveform [samples], got shape {list(audio.shape)}")
    seconds = audio.shape[0] / SAMPLE_RATE
    if audio.shape[0] == 0:
        raise RequestError("AUDIO is empty")
    if audio.shape[0] < MIN_SAMPLES:
        raise RequestError(f"AUDIO is too short: {audio.shape[0]} samples; at least {MIN_SAMPLES} are needed")
    if audio.shape[0] > max_samples:
        raise RequestError(
            f"AUDIO is {seconds:.1f} s long; the limit is {max_samples / SAMPLE_RATE:.1f} s "
            "(max_audio_seconds): split longer audio"
        )
    if not np.isfinite(audio).all():
        raise RequestError("AUDIO contains NaN or infinite samples")
    peak = float(np.abs(audio).max())
    if peak > MAX_PEAK:
        raise RequestError(f"AUDIO peak {peak:g} is far outside [-1, 1]: send float samples, not integer PCM values")
    return torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))


def is_silent(audio: torch.Tensor) -> bool:
    """Digital silence: every sample is exactly zero. Its transcript is empty, without a model run;
    near-silence (any non-zero sample, however faint) is transcribed like any audio."""
    return not bool(audio.any())
