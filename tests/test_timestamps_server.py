"""Word timestamps through Triton: the ensembles' aligner step against the in-process aligner.

The tiny checkpoints' heads are random, so the times say nothing about the speech; what is checked
is that the served words are the in-process alignment of the served tokens on the encoder's own
pooled rows, and that they are well formed (test_align.py measures the timing accuracy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from granite_speech_triton.model.align import load_aligner
from granite_speech_triton.model.audio import Framing, LogMelFrontEnd
from granite_speech_triton.model.config import ARModelConfig, read_config_json
from granite_speech_triton.model.decoder import load_tokenizer
from granite_speech_triton.model.draft import ar_pooled_rows
from granite_speech_triton.model.encoder import load_encoder, pad_batch
from granite_speech_triton.model.nar import load_nar_config, load_nar_encoder
from granite_speech_triton.synth import espeak
from tests.triton_helpers import make_inputs

pytestmark = pytest.mark.server
OUTPUTS = ("TEXT", "TOKEN_IDS", "WORDS", "WORD_TIMES", "WORD_TOKENS")


def infer_words(url: str, model: str, audio: np.ndarray, **options) -> dict[str, np.ndarray]:
    client = grpcclient.InferenceServerClient(url)
    try:
        requested = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
        result = client.infer(model, make_inputs(audio, **options), outputs=requested, client_timeout=300)
    finally:
        client.close()
    return {name: result.as_numpy(name)[0] for name in OUTPUTS}


def ar_rows(checkpoint, audio: np.ndarray) -> torch.Tensor:
    cfg = ARModelConfig.from_dict(read_config_json(checkpoint)).encoder
    encoder = load_encoder(checkpoint, cfg)
    padded, lengths = pad_batch([LogMelFrontEnd(Framing.AR)(torch.from_numpy(audio))])
    with torch.inference_mode():
        rows, _ = ar_pooled_rows(encoder, encoder(padded, lengths, keep_hidden_states=True), lengths)
    return rows


def nar_rows(checkpoint, audio: np.ndarray) -> torch.Tensor:
    encoder = load_nar_encoder(checkpoint, load_nar_config(checkpoint))
    return encoder.encode(*pad_batch([LogMelFrontEnd(Framing.NAR)(torch.from_numpy(audio))])).pooled[0]


def check_words(served: dict[str, np.ndarray], expected, seconds: float) -> None:
    words = [w.decode() for w in served["WORDS"]]
    times = served["WORD_TIMES"]
    assert words  # random heads: often a single word without spaces
    assert "".join(words) == served["TEXT"][0].decode()
    assert int(served["WORD_TOKENS"].sum()) == len(served["TOKEN_IDS"])
    assert words == [w.text for w in expected]
    assert served["WORD_TOKENS"].tolist() == [w.num_tokens for w in expected]
    np.testing.assert_allclose(times, [(w.start_s, w.end_s) for w in expected], atol=1e-5)
    assert np.all(times[:, 0] < times[:, 1]) and np.all(times[1:, 0] >= times[:-1, 1] - 1e-6)
    assert times.min() >= 0 and times.max() <= seconds + 0.08


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return espeak("Granite speech runs on a Triton inference server.")


def test_nar_words_are_the_in_process_alignment(nar_server, tiny_nar_checkpoint, speech):
    served = infer_words(nar_server.grpc_url, "granite_speech_nar", speech, TIMESTAMPS=("BOOL", True))
    aligner = load_aligner(tiny_nar_checkpoint, "nar", load_tokenizer(tiny_nar_checkpoint))
    expected = aligner.align(nar_rows(tiny_nar_checkpoint, speech), served["TOKEN_IDS"].tolist())
    check_words(served, expected, speech.shape[0] / 16_000)


def test_ar_words_are_the_in_process_alignment(ar_server, tiny_ar_checkpoint, speech):
    served = infer_words(
        ar_server.grpc_url, "granite_speech", speech, TIMESTAMPS=("BOOL", True), MAX_NEW_TOKENS=("INT32", 24)
    )
    aligner = load_aligner(tiny_ar_checkpoint, "ar", load_tokenizer(tiny_ar_checkpoint))
    expected = aligner.align(ar_rows(tiny_ar_checkpoint, speech), served["TOKEN_IDS"].tolist())
    check_words(served, expected, speech.shape[0] / 16_000)


def test_without_timestamps_the_words_are_empty_and_the_text_unchanged(ar_server, speech):
    plain = infer_words(ar_server.grpc_url, "granite_speech", speech, MAX_NEW_TOKENS=("INT32", 24))
    timed = infer_words(
        ar_server.grpc_url, "granite_speech", speech, TIMESTAMPS=("BOOL", True), MAX_NEW_TOKENS=("INT32", 24)
    )
    assert plain["WORDS"].shape == (0,) and plain["WORD_TIMES"].shape == (0, 2) and plain["WORD_TOKENS"].shape == (0,)
    assert plain["TOKEN_IDS"].tolist() == timed["TOKEN_IDS"].tolist()


def test_a_translation_cannot_be_timestamped(ar_server, speech):
    with pytest.raises(grpcclient.InferenceServerException, match="TIMESTAMPS are only valid") as err:
        infer_words(
            ar_server.grpc_url,
            "granite_speech",
            speech,
            TASK=("BYTES", "translate"),
            TARGET_LANGUAGE=("BYTES", "fr"),
            TIMESTAMPS=("BOOL", True),
        )
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
