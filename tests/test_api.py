"""The OpenAI-compatible API (api/granite_speech_api) through the official `openai` SDK, served by
uvicorn on a free port in front of the real tritonservers of the test session (tiny checkpoints).

The tiny models' text is meaningless: results are compared with granite_speech_client's on the same
audio and options, subtitles are parsed back with `srt` and `webvtt-py`, and times are checked for
order and range (test_align.py measures their accuracy).
"""

from __future__ import annotations

import io
import itertools
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import openai
import pytest
import soundfile
import srt
import uvicorn
import webvtt
from granite_speech_api import ApiSettings, create_app
from granite_speech_client import SAMPLE_RATE, GraniteSpeechClient

from granite_speech_triton.serving.server import free_port
from granite_speech_triton.synth import espeak

# the SDK marks translations.create deprecated; OpenAI's endpoint and its contract are unchanged
pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")]
AR, NAR = "granite-speech-4.1-2b", "granite-speech-4.1-2b-nar"
UPLOAD_LIMIT_MB = 4.0
MULTIPART = {"Content-Type": "multipart/form-data"}


@contextmanager
def running_api(triton_url: str, **settings) -> Iterator[str]:
    """The API app under uvicorn in a thread; yields its base URL."""
    api = ApiSettings(triton_url=triton_url, port=free_port(), max_upload_mb=UPLOAD_LIMIT_MB, **settings)
    server = uvicorn.Server(uvicorn.Config(create_app(api), host="127.0.0.1", port=api.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{api.port}"
    finally:
        server.should_exit = True
        thread.join()


@pytest.fixture(scope="module")
def ar_api(ar_server) -> Iterator[str]:
    with running_api(ar_server.grpc_url) as url:
        yield url


@pytest.fixture(scope="module")
def nar_api(nar_server) -> Iterator[str]:
    with running_api(nar_server.grpc_url) as url:
        yield url


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def wav_bytes(audio: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, format="WAV")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return espeak("hello world, this is a test of the speech system.")


@pytest.fixture(scope="module")
def ar_client(ar_server) -> Iterator[GraniteSpeechClient]:
    with GraniteSpeechClient(ar_server.grpc_url, timeout_s=600) as client:
        yield client


def check_timed(words: list, segments: list, text: str, seconds: float) -> None:
    """Words in order inside the audio; segments made of consecutive words, their texts the text's."""
    assert words and segments
    assert all(0 <= w.start < w.end <= seconds + 1e-3 for w in words)
    assert all(a.end <= b.start + 1e-3 for a, b in itertools.pairwise(words))
    assert " ".join(s.text for s in segments).split() == text.split() == [w.word for w in words if w.word]
    assert segments[0].start == words[0].start and segments[-1].end == words[-1].end
    assert [s.id for s in segments] == list(range(len(segments)))


# ---- transcriptions --------------------------------------------------------------------------


def test_transcription_json_and_text_equal_the_clients_result(ar_api, ar_client, speech):
    api = sdk(ar_api)
    result = api.audio.transcriptions.create(model=AR, file=("speech.wav", wav_bytes(speech)), language="en")
    expected = ar_client.transcribe(speech, sample_rate=SAMPLE_RATE, max_new_tokens=200)
    assert result.text == expected.text
    assert result.usage.type == "duration" and result.usage.seconds == int(np.ceil(speech.shape[0] / SAMPLE_RATE))
    text = api.audio.transcriptions.create(model=AR, file=("speech.wav", wav_bytes(speech)), response_format="text")
    assert text == expected.text + "\n"


def test_verbose_json_words_segments_and_subtitles_agree(ar_api, ar_client, speech):
    api = sdk(ar_api)
    file = ("speech.flac", wav_bytes(speech))
    verbose = api.audio.transcriptions.create(
        model=AR, file=file, response_format="verbose_json", timestamp_granularities=["word", "segment"]
    )
    seconds = speech.shape[0] / SAMPLE_RATE
    expected = ar_client.transcribe(speech, sample_rate=SAMPLE_RATE, max_new_tokens=200, timestamps=True)
    assert verbose.text == expected.text and verbose.task == "transcribe" and verbose.language == "english"
    assert verbose.duration == pytest.approx(seconds, abs=1e-3)
    assert [(w.start, w.end) for w in verbose.words] == [
        (round(w.start_s, 3), round(w.end_s, 3)) for w in expected.words
    ]
    check_timed(verbose.words, verbose.segments, verbose.text, seconds)
    assert [t for s in verbose.segments for t in s.tokens] == list(expected.token_ids)

    subtitles = api.audio.transcriptions.create(model=AR, file=file, response_format="srt")
    parsed = list(srt.parse(subtitles))
    assert [(p.index, p.content) for p in parsed] == [(s.id + 1, s.text) for s in verbose.segments]
    times = [(s.start, s.end) for s in verbose.segments]
    parsed_times = [t for p in parsed for t in (p.start.total_seconds(), p.end.total_seconds())]
    assert parsed_times == pytest.approx([t for pair in times for t in pair])

    captions = webvtt.from_buffer(
        io.StringIO(api.audio.transcriptions.create(model=AR, file=file, response_format="vtt"))
    )
    assert [c.text for c in captions] == [s.text for s in verbose.segments]
    assert [(c.start_in_seconds, c.end_in_seconds) for c in captions] == [(int(a), int(b)) for a, b in times]
    assert [c.start for c in captions] == [srt.timedelta_to_srt_timestamp(p.start).replace(",", ".") for p in parsed]

    only_words = api.audio.transcriptions.create(
        model=AR, file=file, response_format="verbose_json", timestamp_granularities=["word"]
    )
    assert only_words.words == verbose.words and only_words.segments is None


def test_streamed_deltas_add_up_to_the_transcript(ar_api, ar_client, speech):
    stream = sdk(ar_api).audio.transcriptions.create(model=AR, file=("s.wav", wav_bytes(speech)), stream=True)
    events = list(stream)
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1) and len(events) > 2
    assert events[-1].type == "transcript.text.done"
    expected = ar_client.transcribe(speech, sample_rate=SAMPLE_RATE, max_new_tokens=200).text
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == expected


def test_long_files_are_split_and_their_times_run_on(ar_api, ar_server, speech):
    """Longer than the server's 40 s: pieces cut at quiet points, words and subtitles on one clock."""
    pause = np.zeros(int(0.7 * SAMPLE_RATE), np.float32)
    audio = np.concatenate([np.concatenate([speech, pause])] * 16)  # about 54 s
    seconds = audio.shape[0] / SAMPLE_RATE
    assert seconds > ar_server.settings.max_audio_seconds
    verbose = sdk(ar_api).audio.transcriptions.create(
        model=AR, file=("long.wav", wav_bytes(audio)), response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )  # fmt: skip
    check_timed(verbose.words, verbose.segments, verbose.text, seconds)
    assert verbose.words[-1].end > ar_server.settings.max_audio_seconds  # the second piece's times run on
    parsed = list(srt.parse(sdk(ar_api).audio.transcriptions.create(model=AR, file=("long.wav", wav_bytes(audio)),
                                                                    response_format="srt")))  # fmt: skip
    assert parsed[-1].end.total_seconds() == pytest.approx(verbose.segments[-1].end)


# ---- translations ------------------------------------------------------------------------------


def test_translation_formats(ar_api, ar_client, speech):
    api = sdk(ar_api)
    file = ("speech.wav", wav_bytes(speech))
    result = api.audio.translations.create(model=AR, file=file, extra_body={"language": "fr"})
    expected = ar_client.translate(speech, sample_rate=SAMPLE_RATE, language="fr", target_language="en",
                                   max_new_tokens=200)  # fmt: skip
    assert result.text == expected.text
    french = api.audio.translations.create(
        model=AR, file=file, response_format="text", extra_body={"to_language": "fr"}
    )
    assert (
        french
        == ar_client.translate(speech, sample_rate=SAMPLE_RATE, target_language="fr", max_new_tokens=200).text + "\n"
    )
    verbose = api.audio.translations.create(model=AR, file=file, response_format="verbose_json",
                                            extra_body={"language": "fr"})  # fmt: skip
    assert verbose.task == "translate" and verbose.language == "english"
    # one piece (the audio is shorter than a translation segment): one segment over the whole audio
    assert [(s.start, s.end, s.text) for s in verbose.segments] == [(0.0, verbose.duration, expected.text.strip())]
    captions = webvtt.from_buffer(io.StringIO(api.audio.translations.create(
        model=AR, file=file, response_format="vtt", extra_body={"language": "fr"})))  # fmt: skip
    assert [c.text for c in captions] == [expected.text.strip()]


# ---- NAR ----------------------------------------------------------------------------------------


def test_nar_transcription_with_words_and_a_one_delta_stream(nar_api, nar_server, speech):
    api = sdk(nar_api)
    file = ("speech.wav", wav_bytes(speech))
    with GraniteSpeechClient(nar_server.grpc_url) as client:
        expected = client.transcribe(speech, sample_rate=SAMPLE_RATE, variant="nar", timestamps=True)
    verbose = api.audio.transcriptions.create(
        model=NAR, file=file, response_format="verbose_json", timestamp_granularities=["word", "segment"]
    )
    assert verbose.text == expected.text
    check_timed(verbose.words, verbose.segments, verbose.text, speech.shape[0] / SAMPLE_RATE)
    events = list(api.audio.transcriptions.create(model=NAR, file=file, stream=True))
    assert [(e.type, getattr(e, "delta", None) or e.text) for e in events] == [
        ("transcript.text.delta", expected.text),
        ("transcript.text.done", expected.text),
    ]
    assert [m.id for m in api.models.list()] == [NAR]  # only the NAR ensemble is loaded there
    with pytest.raises(openai.NotFoundError) as err:
        api.audio.transcriptions.create(model=AR, file=file)
    assert err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="punctuate is only supported by variant 'ar'"):
        api.audio.transcriptions.create(model=NAR, file=file, extra_body={"punctuate": "true"})


# ---- models, health, errors ---------------------------------------------------------------------


def test_models_and_health(ar_api):
    api = sdk(ar_api)
    assert [m.id for m in api.models.list()] == [AR]
    assert api.models.retrieve(AR).owned_by == "ibm-granite"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve(NAR)
    with urllib.request.urlopen(f"{ar_api}/health") as response:
        assert json.load(response) == {"status": "ok", "models": [AR]}


def test_health_is_503_without_triton():
    with running_api(f"127.0.0.1:{free_port()}") as url:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/health")
        assert err.value.code == 503 and json.load(err.value)["error"]["type"] == "server_error"
        with pytest.raises(openai.InternalServerError) as failed:
            sdk(url).audio.transcriptions.create(model=AR, file=("s.wav", wav_bytes(np.ones(SAMPLE_RATE) * 0.1)))
        assert failed.value.status_code == 503


ERRORS = [
    (dict(temperature=0.4), 400, "temperature", "temperature must be 0"),
    (dict(model="whisper-1"), 404, "model", "does not exist"),
    (dict(language="xx"), 400, "language", "language 'xx' is not supported"),
    (dict(response_format="json", timestamp_granularities=["word"]), 400, "timestamp_granularities", "verbose_json"),
    (dict(response_format="srt", stream=True), 400, "stream", "stream gives text only"),
    (dict(response_format="diarized_json"), 400, "response_format", "response_format must be one of"),
    (dict(model=NAR, prompt="Granite, Triton"), 400, "prompt", "only biases transcriptions"),
    (dict(extra_body={"decoding": "sampling"}), 400, None, "unknown decode mode 'sampling'"),
]


@pytest.mark.parametrize(("options", "status", "param", "message"), ERRORS)
def test_bad_fields_get_openai_errors(ar_api, speech, options, status, param, message):
    kwargs = {"model": AR, "file": ("speech.wav", wav_bytes(speech[: SAMPLE_RATE // 2]))} | options
    with pytest.raises(openai.APIStatusError) as err:
        sdk(ar_api).audio.transcriptions.create(**kwargs)
    assert err.value.status_code == status
    error = err.value.body
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error"


def test_bad_files_and_translations_get_openai_errors(ar_api, speech):
    api = sdk(ar_api)
    cases = [
        (lambda: api.audio.transcriptions.create(model=AR, file=("notes.txt", b"not audio at all")), 400, "file"),
        (
            lambda: api.audio.transcriptions.create(
                model=AR, file=("clip.m4a", b"\x00\x00\x00\x20ftypM4A " + bytes(64))
            ),
            400,
            "file",
        ),  # fmt: skip
        (
            lambda: api.audio.transcriptions.create(
                model=AR, file=("big.wav", bytes(int(UPLOAD_LIMIT_MB * 2**20) + 1))
            ),
            413,
            "file",
        ),  # fmt: skip
        (lambda: api.audio.translations.create(model=AR, file=("s.wav", wav_bytes(speech))), 400, "language"),
        (lambda: api.audio.translations.create(model=NAR, file=("s.wav", wav_bytes(speech))), 400, "model"),
    ]
    for call, status, param in cases:
        with pytest.raises(openai.APIStatusError) as err:
            call()
        assert (err.value.status_code, err.value.body["param"]) == (status, param), err.value.body
    with pytest.raises(openai.BadRequestError, match="not an audio file"):
        api.audio.transcriptions.create(model=AR, file=("notes.txt", b"not audio at all"))
    with pytest.raises(openai.BadRequestError, match="upload the audio"):
        api.post("/audio/transcriptions", body={"model": AR}, cast_to=object, options={"headers": MULTIPART})
