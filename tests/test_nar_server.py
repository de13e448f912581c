"""The NAR ensemble on a real tritonserver: packed batches equal the unpacked in-process model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from audio_samples import espeak, fit_length, mixed_lengths, synthetic
from bad_inputs import BAD_REQUESTS, GOOD, NOT_UTF8
from triton_helpers import (
    assert_each_got_its_own_answer,
    batch_counts,
    infer,
    infer_concurrently,
    interleave,
    split_batches,
)

from granite_speech_triton.model.audio import Framing, LogMelFrontEnd
from granite_speech_triton.model.encoder import pad_batch
from granite_speech_triton.model.nar import load_nar_model

pytestmark = pytest.mark.server
MODEL = "granite_speech_nar"
NAR_MODELS = ("nar_feature_extractor", "nar_conformer_encoder", "nar_qformer_projector", "nar_head")


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    extra = [
        fit_length(espeak("Hallo Welt, wie geht es dir heute?", "de"), 3.3),
        synthetic(0.5, 9),
        np.full(16_000, 0.3, np.float32),  # the tiny model drafts nothing here: an empty DRAFT_IDS tensor
    ]
    return mixed_lengths() + extra


def reference_ids(checkpoint, audio: np.ndarray) -> list[int]:
    """One utterance through the in-process model: no batch, no packing."""
    model = load_nar_model(checkpoint)
    features = LogMelFrontEnd(Framing.NAR)(torch.from_numpy(audio))
    return model.transcribe_ids([features])[0]


def test_packed_batches_equal_unpacked_forward(nar_server, tiny_nar_checkpoint, audios):
    before = batch_counts(nar_server.http_url, "nar_head")
    results = infer_concurrently(nar_server.grpc_url, MODEL, [(a, {}) for a in audios])
    expected = [reference_ids(tiny_nar_checkpoint, a) for a in audios]
    for result, want in zip(results, expected, strict=True):
        assert not isinstance(result, Exception), str(result)
        assert result[1] == want
    assert len({tuple(ids) for ids in expected}) > 3, "tiny model outputs should depend on the input"
    features = LogMelFrontEnd(Framing.NAR)(torch.from_numpy(audios[-1]))
    assert load_nar_model(tiny_nar_checkpoint).encoder.encode(*pad_batch([features])).drafts == [[]]
    after = batch_counts(nar_server.http_url, "nar_head")
    packed = sum(n - before.get(size, 0) for size, n in after.items() if size > 1)
    assert packed > 0, f"nar_head never packed more than one request: {after}"


def test_only_the_requested_variant_is_loaded_then_both_serve_side_by_side(nar_server, audios):
    client = grpcclient.InferenceServerClient(nar_server.grpc_url)
    assert client.is_model_ready(MODEL) and client.is_model_ready("nar_head")
    assert not client.is_model_ready("granite_speech") and not client.is_model_ready("ar_llm_decoder")
    client.load_model("granite_speech")  # loads its steps too
    ar_text, _ = infer(nar_server.grpc_url, "granite_speech", audios[2], MAX_NEW_TOKENS=("INT32", 8))
    nar_text, _ = infer(nar_server.grpc_url, MODEL, audios[2], LANGUAGE=("BYTES", "fr"))
    assert isinstance(ar_text, str) and isinstance(nar_text, str)


NAR_BAD = [item for item in BAD_REQUESTS if not set(item[1]) - {"SAMPLE_RATE"}] + [
    (GOOD, {"LANGUAGE": ("BYTES", "ja")}, "unsupported LANGUAGE 'ja'"),
    (GOOD, {"TASK": ("BYTES", "translate")}, "unexpected inference input 'TASK'"),
    *NOT_UTF8,
]


def test_a_wave_of_bad_and_good_requests_gives_each_its_own_answer(nar_server, audios):
    good = [(audio, {"LANGUAGE": ("BYTES", "de")} if i % 3 == 0 else {}) for i, audio in enumerate(audios)]
    alone = [infer(nar_server.grpc_url, MODEL, audio, **opts) for audio, opts in good]
    wave = interleave(good, NAR_BAD)
    split_before = split_batches(nar_server.metrics_url, NAR_MODELS)
    results = infer_concurrently(nar_server.grpc_url, MODEL, [(a, o) for a, o, *_ in wave])
    assert_each_got_its_own_answer(wave, results, alone)
    assert split_batches(nar_server.metrics_url, NAR_MODELS) == split_before
    assert grpcclient.InferenceServerClient(nar_server.grpc_url).is_model_ready(MODEL)


def test_digital_silence_is_an_empty_result_without_running_the_head(nar_server, tiny_nar_checkpoint, audios):
    """All-zero audio answers empty TEXT and TOKEN_IDS, where the tiny head would have produced
    tokens; near-silence is transcribed like any audio."""
    silent = [np.zeros(n, np.float32) for n in (16_000, 48_000)]
    faint = (1e-4 * np.random.default_rng(6).standard_normal(32_000)).astype(np.float32)
    requests = [silent[0], audios[2], faint, silent[1]]
    results = infer_concurrently(nar_server.grpc_url, MODEL, [(audio, {}) for audio in requests])
    assert results[0] == results[3] == ("", [])
    assert all(reference_ids(tiny_nar_checkpoint, audio) for audio in silent), "the head would have answered"
    for index in (1, 2):
        assert results[index][1] == reference_ids(tiny_nar_checkpoint, requests[index])
