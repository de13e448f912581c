"""The API's segments, subtitles and settings, without a server."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
import srt
import webvtt
from granite_speech_api import ApiSettings
from granite_speech_api import cli as api_cli
from granite_speech_api.app import UploadLimit
from granite_speech_api.errors import ApiError
from granite_speech_api.formats import MAX_SEGMENT_CHARS, PAUSE_S, Segment, segments_from_words, vtt
from granite_speech_api.formats import srt as to_srt
from granite_speech_client import Word


def words(*items: tuple[str, float, float]) -> list[Word]:
    return [Word(text, start, end, (i,)) for i, (text, start, end) in enumerate(items)]


def test_segments_end_at_sentences_pauses_and_length():
    timed = words((" Hello", 0.0, 0.4), (" there.", 0.5, 0.9), (" New", 1.0, 1.2), (" one", 1.3, 1.5),
                  (" after", 1.5 + PAUSE_S, 2.8), (" a", 2.9, 3.0), (" pause", 3.0, 3.3))  # fmt: skip
    segments = segments_from_words(timed)
    assert [(s.text, s.start_s, s.end_s, s.token_ids) for s in segments] == [
        ("Hello there.", 0.0, 0.9, (0, 1)),
        ("New one", 1.0, 1.5, (2, 3)),
        ("after a pause", 2.5, 3.3, (4, 5, 6)),
    ]
    long = segments_from_words(words(*[(" word", i * 0.3, i * 0.3 + 0.2) for i in range(40)]))
    assert len(long) > 1 and all(len(s.text) <= MAX_SEGMENT_CHARS for s in long)
    assert " ".join(s.text for s in long).split() == ["word"] * 40


def test_subtitles_parse_back_with_their_times():
    segments = [Segment(0.0, 1.234, "first line", (1,)), Segment(3661.5, 3663.0, "an hour later", (2,))]
    parsed = list(srt.parse(to_srt(segments)))
    assert [(p.index, p.content, p.start.total_seconds(), p.end.total_seconds()) for p in parsed] == [
        (1, "first line", 0.0, 1.234),
        (2, "an hour later", 3661.5, 3663.0),
    ]
    captions = webvtt.from_buffer(io.StringIO(vtt(segments)))
    assert [(c.start, c.end, c.text) for c in captions] == [
        ("00:00:00.000", "00:00:01.234", "first line"),
        ("01:01:01.500", "01:01:03.000", "an hour later"),
    ]


def test_settings_from_strings_and_environment(monkeypatch):
    monkeypatch.setenv("GSA_PORT", "9090")
    settings = ApiSettings.from_environment({"triton_url": "triton:8001"})
    assert (settings.port, settings.triton_url, settings.max_upload_bytes) == (9090, "triton:8001", 200 * 2**20)
    with pytest.raises(ValueError, match="unknown setting"):
        ApiSettings.from_strings({"max_upload": "1"})
    with pytest.raises(ValueError, match="protocol"):
        ApiSettings(protocol="websocket")
    with pytest.raises(ValueError, match="drain_timeout_s"):
        ApiSettings(drain_timeout_s=-1)


def test_the_api_drains_its_requests_for_drain_timeout_s_on_sigterm(monkeypatch):
    """uvicorn's graceful shutdown (no new connections, requests in flight finish) gets the setting."""
    started = {}
    monkeypatch.setattr(api_cli.uvicorn, "run", lambda app, **kwargs: started.update(kwargs))
    api_cli.main(["--set", "drain_timeout_s=45", "--set", "port=9091"])
    assert started["timeout_graceful_shutdown"] == 45.0 and started["port"] == 9091


def test_upload_limit_refuses_a_large_body_by_its_header_or_as_it_arrives():
    """Content-Length over the limit: 413 before the app runs; a chunked body (no length): the app's
    read fails with the 413 error as soon as the limit is passed."""
    chunk = bytes(1000)

    async def reader(scope, receive, send):
        while (await receive()).get("more_body"):
            pass

    def scope(length: int | None) -> dict:
        headers = [] if length is None else [(b"content-length", str(length).encode())]
        return {"type": "http", "headers": headers}

    async def run(length: int | None, chunks: int) -> list[dict]:
        messages = iter([{"type": "http.request", "body": chunk, "more_body": i + 1 < chunks} for i in range(chunks)])
        sent: list[dict] = []

        async def receive() -> dict:
            return next(messages)

        async def send(message: dict) -> None:
            sent.append(message)

        await UploadLimit(reader, max_bytes=5500)(scope(length), receive, send)
        return sent

    sent = asyncio.run(run(6000, 6))
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"]["code"] == "upload_too_large"
    with pytest.raises(ApiError) as err:
        asyncio.run(run(None, 6))
    assert err.value.status == 413
    assert asyncio.run(run(None, 5)) == []  # 5000 bytes pass
