"""The four decoding modes served: both protocols, the streaming pipeline, the client and the CLI,
each request exactly its reference (see test_decode_modes.py for the references)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from audio_samples import mixed_lengths
from cascade_reference import ASR, beam, cascade, prompt_embeddings
from granite_speech_client import Decoding, GraniteSpeechClient
from reference import reference_generate
from triton_helpers import infer, infer_concurrently, metric

pytestmark = pytest.mark.server
MODEL = "granite_speech"
NEW_TOKENS = 16
ENGINE = {"model": "ar_llm_engine"}


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    return mixed_lengths()[:6]


def test_every_mode_in_one_concurrent_wave_equals_its_reference(ar_server, tiny_ar_checkpoint, audios):
    """Greedy, beam (2 and 3 beams), speculative and cascade (accepting with threshold 0,
    rejecting with 1) requests sent together: each gets its own reference's tokens."""
    tokens = ("INT32", NEW_TOKENS)
    ckpt = tiny_ar_checkpoint
    modes = [
        ({}, lambda a: reference_generate(ckpt, a, ASR, NEW_TOKENS)),
        ({"DECODE_MODE": ("BYTES", "speculative")}, lambda a: reference_generate(ckpt, a, ASR, NEW_TOKENS)),
        ({"DECODE_MODE": ("BYTES", "beam")}, lambda a: beam(ckpt, embeds(ckpt, a), 2, NEW_TOKENS)),
        ({"DECODE_MODE": ("BYTES", "beam"), "NUM_BEAMS": ("INT32", 3)},
         lambda a: beam(ckpt, embeds(ckpt, a), 3, NEW_TOKENS)),
        ({"DECODE_MODE": ("BYTES", "cascade"), "CONFIDENCE": ("FP32", 0.0)},
         lambda a: cascade(ckpt, a, NEW_TOKENS, 0.0, 2).tokens),
        ({"DECODE_MODE": ("BYTES", "cascade"), "CONFIDENCE": ("FP32", 1.0)},
         lambda a: cascade(ckpt, a, NEW_TOKENS, 1.0, 2).tokens),
    ]  # fmt: skip
    drafts_before = {o: metric(ar_server.metrics_url, "granite_speech_engine_drafts_total", outcome=o, **ENGINE)
                     for o in ("accepted", "rejected")}  # fmt: skip
    requests, expected = [], []
    for index, audio in enumerate(audios):
        for options, reference in modes[index % 2 :: 2]:
            requests.append((audio, {**options, "MAX_NEW_TOKENS": tokens}))
            expected.append(reference(audio))
    results = infer_concurrently(ar_server.grpc_url, MODEL, requests)
    for (_, options), result, want in zip(requests, results, expected, strict=True):
        assert not isinstance(result, Exception), f"{options}: {result}"
        assert result[1] == want, options
    drafts = {o: metric(ar_server.metrics_url, "granite_speech_engine_drafts_total", outcome=o, **ENGINE) - before
              for o, before in drafts_before.items()}  # fmt: skip
    assert drafts["accepted"] >= 1 and drafts["rejected"] >= 3  # the CONFIDENCE 1.0 ones, and empty drafts


def embeds(checkpoint, audio: np.ndarray):
    return prompt_embeddings(checkpoint, audio, ASR)[0]


def test_modes_over_http_and_the_stream(ar_server, tiny_ar_checkpoint, audios):
    audio = audios[4]
    http = httpclient.InferenceServerClient(ar_server.http_url)
    inputs = [httpclient.InferInput("AUDIO", [1, audio.shape[0]], "FP32")]
    inputs[0].set_data_from_numpy(audio[None])
    for name, datatype, value in (("DECODE_MODE", "BYTES", b"beam"), ("MAX_NEW_TOKENS", "INT32", NEW_TOKENS)):
        inputs.append(httpclient.InferInput(name, [1, 1], datatype))
        inputs[-1].set_data_from_numpy(np.array([[value]], dtype=np.object_ if datatype == "BYTES" else np.int32))
    ids = http.infer(MODEL, inputs).as_numpy("TOKEN_IDS")[0].tolist()
    assert ids == beam(tiny_ar_checkpoint, embeds(tiny_ar_checkpoint, audio), 2, NEW_TOKENS)
    with GraniteSpeechClient(ar_server.grpc_url) as client:
        updates = list(client.transcribe_stream(audio, sample_rate=16_000, max_new_tokens=NEW_TOKENS,
                                                decoding="speculative"))  # fmt: skip
        assert list(updates[-1].token_ids) == reference_generate(tiny_ar_checkpoint, audio, ASR, NEW_TOKENS)
        beams = list(client.transcribe_stream(audio, sample_rate=16_000, max_new_tokens=NEW_TOKENS, decoding="beam"))
        assert len(beams) == 1 and list(beams[0].token_ids) == ids  # a beam search streams its final text only


def test_client_and_cli_take_every_mode(ar_server, tiny_ar_checkpoint, audios, tmp_path):
    import soundfile

    path = tmp_path / "speech.wav"
    soundfile.write(path, audios[3], 16_000)
    with GraniteSpeechClient(ar_server.http_url, "http") as client:
        by_mode = {
            mode: client.transcribe(path, max_new_tokens=NEW_TOKENS, decoding=Decoding(mode, num_beams=2))
            for mode in ("greedy", "beam", "cascade", "speculative")
        }
    assert by_mode["speculative"].token_ids == by_mode["greedy"].token_ids
    want = cascade(tiny_ar_checkpoint, audios[3], NEW_TOKENS, 0.4, 2).tokens
    assert list(by_mode["cascade"].token_ids) == want
    command = [sys.executable, "-m", "granite_speech_client", "transcribe", str(path), "--server", ar_server.grpc_url,
               "--decode-mode", "beam", "--num-beams", "2", "--max-new-tokens", str(NEW_TOKENS)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout == by_mode["beam"].text + "\n", done.stderr


def test_bad_mode_options_get_invalid_arg(ar_server, audios):
    audio = audios[2]
    cases = [
        ({"DECODE_MODE": ("BYTES", "nucleus")}, "unknown DECODE_MODE 'nucleus'"),
        ({"DECODE_MODE": ("BYTES", "beam"), "NUM_BEAMS": ("INT32", 9)}, "NUM_BEAMS must be in 1..4"),
        ({"DECODE_MODE": ("BYTES", "cascade"), "CONFIDENCE": ("FP32", 2.0)}, "CONFIDENCE must be in 0..1"),
        ({"DECODE_MODE": ("BYTES", "cascade"), "ENTROPY_GATE": ("FP32", -1.0)}, "ENTROPY_GATE"),
        ({"DECODE_MODE": ("BYTES", "cascade"), "TASK": ("BYTES", "translate"), "TARGET_LANGUAGE": ("BYTES", "fr")},
         "needs TASK 'transcribe'"),
    ]  # fmt: skip
    for options, message in cases:
        with pytest.raises(grpcclient.InferenceServerException, match=message) as error:
            infer(ar_server.grpc_url, MODEL, audio, **options)
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
