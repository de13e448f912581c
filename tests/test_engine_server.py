"""The AR decoding engine on a real tritonserver: staggered arrivals, streaming, cancellation, deadlines."""

from __future__ import annotations

import json
import queue
import threading
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from audio_samples import mixed_lengths
from conftest import TEST_SETTINGS, RunningServer, start_server
from reference import CARD_INSTRUCTIONS, reference_generate
from triton_helpers import infer, make_inputs, metric

from granite_speech_triton.serving.repository import DeploySettings

pytestmark = pytest.mark.server
STREAM = "granite_speech_stream"
WAIT_S = 300  # generous bound for waiting on the server; no test relies on speed
ENGINE = {"model": "ar_llm_engine"}


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    return mixed_lengths()


class Stream:
    """One gRPC stream to the streaming pipeline; collects (final?, text, ids) per response."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error, time.monotonic())))
        self.last_at = 0.0  # when the latest response read by `next` arrived

    def send(self, audio: np.ndarray, **options) -> None:
        self.client.async_stream_infer(STREAM, make_inputs(audio, **options), enable_empty_final_response=True)

    def next(self) -> tuple[bool, str, list[int]]:
        result, error, self.last_at = self.responses.get(timeout=WAIT_S)
        if error is not None:
            raise error
        final = result.get_response().parameters["triton_final_response"].bool_param
        return final, result.as_numpy("TEXT")[0][0].decode(), result.as_numpy("TOKEN_IDS")[0].tolist()

    def until_final(self) -> list[tuple[bool, str, list[int]]]:
        seen = [self.next()]
        while not seen[-1][0]:
            seen.append(self.next())
        return seen

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def test_stream_grows_then_ends_with_the_unary_answer(ar_server, tiny_ar_checkpoint, audios):
    audio, tokens = audios[4], 24
    stream = Stream(ar_server.grpc_url)
    try:
        stream.send(audio, MAX_NEW_TOKENS=("INT32", tokens), PUNCTUATE=("BOOL", True))
        responses = stream.until_final()
    finally:
        stream.close()
    expected = reference_generate(tiny_ar_checkpoint, audio, CARD_INSTRUCTIONS["asr_punct"], tokens)
    *partials, (_, text, ids) = responses
    assert ids == expected
    assert (text, ids) == infer(ar_server.grpc_url, "granite_speech", audio, MAX_NEW_TOKENS=("INT32", tokens),
                                PUNCTUATE=("BOOL", True))  # fmt: skip
    assert partials, "no partial response before the final one"
    for (_, partial_text, partial_ids), (_, later_text, later_ids) in zip(partials, responses[1:], strict=False):
        assert later_ids[: len(partial_ids)] == partial_ids and len(later_ids) > len(partial_ids)
        assert later_text.startswith(partial_text)


def test_http_clients_stream_through_generate_stream(ar_server, audios):
    audio, tokens = audios[2], 10
    body = json.dumps({"AUDIO": audio.tolist(), "MAX_NEW_TOKENS": tokens}).encode()
    request = urllib.request.Request(f"http://{ar_server.http_url}/v2/models/{STREAM}/generate_stream", data=body)
    with urllib.request.urlopen(request, timeout=WAIT_S) as response:
        events = [json.loads(line[len(b"data: ") :]) for line in response if line.startswith(b"data: ")]
    for event in events:  # generate_stream writes a one-element tensor as a scalar
        event["TOKEN_IDS"] = event["TOKEN_IDS"] if isinstance(event["TOKEN_IDS"], list) else [event["TOKEN_IDS"]]
    assert len(events) >= 2
    assert (
        events[-1]["TOKEN_IDS"]
        == infer(ar_server.grpc_url, "granite_speech", audio, MAX_NEW_TOKENS=("INT32", tokens))[1]
    )
    assert all(events[i + 1]["TEXT"].startswith(events[i]["TEXT"]) for i in range(len(events) - 1))


@pytest.fixture(scope="module")
def static_server(tmp_path_factory: pytest.TempPathFactory, tiny_ar_checkpoint) -> Iterator[RunningServer]:
    """The AR pipeline with the engine's `scheduler=static` (a batch admitted only when the last ended)."""
    settings = DeploySettings(ar_checkpoint=str(tiny_ar_checkpoint), scheduler="static", **TEST_SETTINGS)
    yield from start_server(tmp_path_factory.mktemp("static-repo"), settings, ("ar",))


@pytest.mark.parametrize("server", ["ar_server", "static_server"])
def test_requests_arriving_while_others_decode_equal_transformers(server, request, tiny_ar_checkpoint, audios):
    """A long request streams; more requests (mixed lengths, budgets and tasks) are sent once it has
    produced tokens, then more once those have: every one gets transformers' tokens for it alone,
    whether they join the running batch (inflight) or wait for it to end (static)."""
    ar_server = request.getfixturevalue(server)
    long_audio = audios[7]
    stream = Stream(ar_server.grpc_url)
    late = [
        (audios[0], {"MAX_NEW_TOKENS": ("INT32", 3)}, "asr", 3),
        (audios[5], {"MAX_NEW_TOKENS": ("INT32", 40)}, "asr", 40),
        (
            audios[3],
            {"TASK": ("BYTES", "translate"), "TARGET_LANGUAGE": ("BYTES", "fr"), "MAX_NEW_TOKENS": ("INT32", 17)},
            "translate_fr",
            17,
        ),  # fmt: skip
        (audios[6], {"PUNCTUATE": ("BOOL", True), "MAX_NEW_TOKENS": ("INT32", 9)}, "asr_punct", 9),
    ]
    results: dict[int, tuple[str, list[int]]] = {}
    ended_at: dict[int, float] = {}

    def send(index: int) -> None:
        audio, options, _, _ = late[index]
        results[index] = infer(ar_server.grpc_url, "granite_speech", audio, **options)
        ended_at[index] = time.monotonic()

    try:
        stream.send(long_audio, MAX_NEW_TOKENS=("INT32", 120))
        stream.next()  # the long request is decoding
        first_wave = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
        for thread in first_wave:
            thread.start()
        for thread in first_wave:
            thread.join(WAIT_S)
        second_wave = [threading.Thread(target=send, args=(i,)) for i in (2, 3)]
        for thread in second_wave:
            thread.start()
        for thread in second_wave:
            thread.join(WAIT_S)
        long_ids = stream.until_final()[-1][2]
        long_ended_at = stream.last_at
    finally:
        stream.close()
    # The 3-token request joins the long one's batch in flight; under static it waits for its end.
    assert (ended_at[0] > long_ended_at) == (server == "static_server")
    assert long_ids == reference_generate(tiny_ar_checkpoint, long_audio, CARD_INSTRUCTIONS["asr"], 120)
    for index, (audio, _, instruction, tokens) in enumerate(late):
        assert results[index][1] == reference_generate(
            tiny_ar_checkpoint, audio, CARD_INSTRUCTIONS[instruction], tokens
        )


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_cancelled_stream_leaves_the_engine_at_the_next_step(ar_server, audios):
    cancelled_before = metric(
        ar_server.metrics_url, "granite_speech_engine_requests_total", reason="cancelled", **ENGINE
    )
    tokens_before = metric(ar_server.metrics_url, "granite_speech_generated_tokens_total", **ENGINE)
    stream = Stream(ar_server.grpc_url)
    stream.send(audios[7], MAX_NEW_TOKENS=("INT32", 256))
    stream.next()  # decoding has started
    stream.close(cancel=True)
    wait_for(
        lambda: (
            metric(ar_server.metrics_url, "granite_speech_engine_requests_total", reason="cancelled", **ENGINE)
            > cancelled_before
        ),
        "the engine to drop the cancelled request",
    )
    generated = metric(ar_server.metrics_url, "granite_speech_generated_tokens_total", **ENGINE) - tokens_before
    assert 0 < generated < 256, "the cancelled request ran to its budget"
    # the engine goes on serving, exactly
    _, alone = infer(ar_server.grpc_url, "granite_speech", audios[2], MAX_NEW_TOKENS=("INT32", 6))
    assert len(alone) == 6


def test_a_request_past_its_deadline_gets_cancelled_with_a_clear_error(ar_server, audios):
    expired = metric(ar_server.metrics_url, "granite_speech_engine_requests_total", reason="deadline", **ENGINE)
    with pytest.raises(grpcclient.InferenceServerException, match=r"deadline exceeded \(TIMEOUT_MS\)") as error:
        infer(ar_server.grpc_url, "granite_speech", audios[2], TIMEOUT_MS=("INT32", 1))
    assert error.value.status() == "StatusCode.CANCELLED"
    assert (
        metric(ar_server.metrics_url, "granite_speech_engine_requests_total", reason="deadline", **ENGINE)
        == expired + 1
    )
    with pytest.raises(grpcclient.InferenceServerException, match="TIMEOUT_MS must be in"):
        infer(ar_server.grpc_url, "granite_speech", audios[2], TIMEOUT_MS=("INT32", -5))
    _, ids = infer(
        ar_server.grpc_url, "granite_speech", audios[2], TIMEOUT_MS=("INT32", 600_000), MAX_NEW_TOKENS=("INT32", 4)
    )
    assert len(ids) == 4
