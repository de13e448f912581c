"""Overload on a real tritonserver with a deliberately tiny queue: the excess of a burst is answered
UNAVAILABLE at once, the rest is served exactly; the client retries UNAVAILABLE and nothing else.

No timing is asserted. The only assumption is that a burst of concurrent requests overflows a
queue of one, which a slow machine makes more likely, not less.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from audio_samples import synthetic
from conftest import TEST_SETTINGS, RunningServer, start_server
from granite_speech_client import SAMPLE_RATE, GraniteSpeechClient, ServerOverloadedError, ServerRejectedError
from triton_helpers import infer, infer_concurrently
from tritonclient.utils import InferenceServerException

from granite_speech_triton.serving.repository import DeploySettings

pytestmark = pytest.mark.server
MODEL = "granite_speech"
NEW_TOKENS = 32
COPIES = 4  # each audio appears this many times in a burst
QUEUE_FULL = "Exceeds maximum queue size"


@pytest.fixture(scope="module")
def bounded_server(tmp_path_factory: pytest.TempPathFactory, tiny_ar_checkpoint: Path) -> Iterator[RunningServer]:
    """One request per batch and at most one waiting in each component's queue."""
    values = {**TEST_SETTINGS, "max_batch_size": 1, "max_queue_size": 1, "max_queue_delay_us": 0}
    settings = DeploySettings(ar_checkpoint=str(tiny_ar_checkpoint), **values)
    yield from start_server(tmp_path_factory.mktemp("bounded-repo"), settings, ("ar",))


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    return [synthetic(2.0 + 0.5 * i, 20 + i) for i in range(6)]


@pytest.fixture(scope="module")
def solo(bounded_server: RunningServer, audios: list[np.ndarray]) -> list[tuple[str, list[int]]]:
    """Each audio alone: one request at a time never overflows the queue."""
    return [infer(bounded_server.grpc_url, MODEL, audio, MAX_NEW_TOKENS=("INT32", NEW_TOKENS)) for audio in audios]


def burst(audios: list[np.ndarray]) -> list[np.ndarray]:
    return [audios[i % len(audios)] for i in range(COPIES * len(audios))]


def test_a_full_queue_rejects_the_excess_with_unavailable_and_serves_the_rest_exactly(bounded_server, audios, solo):
    requests = [(audio, {"MAX_NEW_TOKENS": ("INT32", NEW_TOKENS)}) for audio in burst(audios)]
    results = infer_concurrently(bounded_server.grpc_url, MODEL, requests)
    served = rejected = 0
    for index, result in enumerate(results):
        if isinstance(result, grpcclient.InferenceServerException):
            assert result.status() == "StatusCode.UNAVAILABLE" and QUEUE_FULL in result.message(), result
            rejected += 1
        else:
            assert result == solo[index % len(audios)]
            served += 1
    assert served >= 1 and rejected >= 1, f"served {served}, rejected {rejected}"
    assert infer(bounded_server.grpc_url, MODEL, audios[0], MAX_NEW_TOKENS=("INT32", NEW_TOKENS)) == solo[0]


def record_attempts(monkeypatch: pytest.MonkeyPatch, module) -> list[str]:
    """Wrap tritonclient's real `infer` to note each attempt's outcome: "ok" or the error status."""
    outcomes: list[str] = []
    real = module.InferenceServerClient.infer

    def infer_and_record(self, *args, **kwargs):
        try:
            result = real(self, *args, **kwargs)
        except InferenceServerException as exc:
            outcomes.append(str(exc.status()))
            raise
        outcomes.append("ok")
        return result

    monkeypatch.setattr(module.InferenceServerClient, "infer", infer_and_record)
    return outcomes


def transcribe_burst(client: GraniteSpeechClient, audios: list[np.ndarray]) -> list:
    items = burst(audios)
    return client.transcribe_many(items, max_in_flight=len(items), sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS)


def check_items(items: list, solo: list) -> int:
    """Every item is its solo result or ServerOverloadedError; returns how many were overloaded."""
    for item in items:
        if item.ok:
            assert list(item.result.token_ids) == solo[item.index % len(solo)][1]
        else:
            assert isinstance(item.error, ServerOverloadedError), item.error
            assert QUEUE_FULL in str(item.error) and item.error.exit_code == 8
    return sum(not item.ok for item in items)


@pytest.mark.parametrize(("protocol", "module"), [("grpc", grpcclient), ("http", httpclient)])
def test_client_without_retries_reports_overload(bounded_server, audios, solo, monkeypatch, protocol, module):
    attempts = record_attempts(monkeypatch, module)
    url = bounded_server.grpc_url if protocol == "grpc" else bounded_server.http_url
    with GraniteSpeechClient(url, protocol, retries=0) as client:
        items = transcribe_burst(client, audios)
    overloaded = check_items(items, solo)
    assert 1 <= overloaded < len(items)
    assert len(attempts) == len(items), "retries=0: one attempt per request"


def test_client_retries_unavailable_with_backoff_and_nothing_else(bounded_server, audios, solo, monkeypatch):
    attempts = record_attempts(monkeypatch, grpcclient)
    with GraniteSpeechClient(bounded_server.grpc_url, retries=8, retry_backoff_s=0.05) as client:
        overloaded = check_items(transcribe_burst(client, audios), solo)
        rejected = attempts.count("StatusCode.UNAVAILABLE")
        assert rejected >= 1 and set(attempts) == {"ok", "StatusCode.UNAVAILABLE"}
        # Without retries every rejected attempt would be a failed request; each failed one had 9.
        assert rejected > overloaded and rejected >= 9 * overloaded
        attempts.clear()
        with pytest.raises(ServerRejectedError, match="MAX_NEW_TOKENS"):
            client.transcribe(audios[0], sample_rate=SAMPLE_RATE, max_new_tokens=1000)
    assert attempts == ["StatusCode.INVALID_ARGUMENT"], "INVALID_ARG is final: never retried"
