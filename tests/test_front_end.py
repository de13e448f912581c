"""The plain-torch front end equals torchaudio's MelSpectrogram path (committed fixture)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from granite_speech_triton.model.audio import (
    MIN_SAMPLES,
    Framing,
    LogMelFrontEnd,
    ar_encoder_length,
    check_waveform,
    is_silent,
    nar_encoder_length,
)
from granite_speech_triton.model.errors import RequestError

# Made once with the real torchaudio 2.9.1 by tests/fixtures/make_mel_fixture.py (its docstring
# has the exact commands): AR features from transformers' GraniteSpeechFeatureExtractor, NAR
# features from torchaudio.transforms.MelSpectrogram with the NAR framing rule.
FIXTURE = Path(__file__).parent / "fixtures" / "mel_reference.npz"
LENGTHS = [4_800, 16_000, 16_161, 24_321]


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as data:
        return dict(data)


@pytest.mark.parametrize("framing", list(Framing))
@pytest.mark.parametrize("num_samples", LENGTHS)
def test_features_equal_torchaudio(reference, framing: Framing, num_samples: int):
    audio = torch.from_numpy(reference[f"audio_{num_samples}"])
    features = LogMelFrontEnd(framing)(audio).numpy()
    expected = reference[f"{framing.value}_{num_samples}"]
    assert features.shape == expected.shape
    np.testing.assert_allclose(features, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_samples", LENGTHS)
def test_frame_counts_follow_the_framing_rules(num_samples: int):
    audio = torch.randn(num_samples)
    assert LogMelFrontEnd(Framing.AR)(audio).shape == (ar_encoder_length(num_samples), 160)
    assert LogMelFrontEnd(Framing.NAR)(audio).shape == (nar_encoder_length(num_samples), 160)


def test_the_two_rules_differ_by_one_frame_when_counts_are_odd():
    # 16_161 samples: 102 mel frames -> AR keeps 51 encoder frames, NAR 2 * (16_161 // 320) = 50
    assert (ar_encoder_length(16_161), nar_encoder_length(16_161)) == (51, 50)


@pytest.mark.parametrize(
    ("audio", "rate", "message"),
    [
        (np.zeros(0, np.float32), 16_000, "empty"),
        (np.ones(MIN_SAMPLES - 1, np.float32) * 0.1, 16_000, "too short"),
        (np.full(16_000, np.nan, np.float32), 16_000, "NaN"),
        (np.ones((2, 16_000), np.float32) * 0.1, 16_000, "mono"),
        (np.ones(16_000, np.float32) * 1000, 16_000, "integer PCM"),
        (np.ones(16_000, np.float32) * 0.1, 44_100, "44100 Hz"),
        (np.ones(16_001 * 2, np.float32) * 0.1, 16_000, "limit is 2.0 s"),
    ],
)
def test_bad_waveforms_are_rejected_with_a_reason(audio, rate, message):
    with pytest.raises(RequestError, match=message):
        check_waveform(audio, rate, max_samples=32_000)


def test_good_waveform_passes_unchanged():
    audio = (np.random.default_rng(0).standard_normal(8_000) * 0.1).astype(np.float32)
    assert torch.equal(check_waveform(audio, 16_000, 32_000), torch.from_numpy(audio))


def test_digital_silence_is_valid_and_marked_near_silence_is_not():
    silence = check_waveform(np.zeros(16_000, np.float32), 16_000, 32_000)
    assert is_silent(silence)
    faint = np.zeros(16_000, np.float32)
    faint[123] = -1e-7
    assert not is_silent(check_waveform(faint, 16_000, 32_000))
