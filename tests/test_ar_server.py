"""The AR ensemble on a real tritonserver: exactness against transformers, batching, bad input."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from audio_samples import mixed_lengths
from bad_inputs import AR_ONLY_BAD, BAD_REQUESTS, GOOD, NOT_UTF8
from reference import CARD_INSTRUCTIONS, reference_generate
from triton_helpers import (
    assert_each_got_its_own_answer,
    batch_counts,
    infer,
    infer_concurrently,
    interleave,
    metric,
    split_batches,
)

pytestmark = pytest.mark.server
MODEL = "granite_speech"
AR_MODELS = (
    "ar_feature_extractor",
    "ar_conformer_encoder",
    "ar_qformer_projector",
)  # batched steps; the engine answers per request
NEW_TOKENS = 24
PHASES = ("prefill", "decode")

# (ensemble options, the card instruction the reference uses)
TASKS = [
    ({}, "asr"),
    ({"PUNCTUATE": ("BOOL", True)}, "asr_punct"),
    ({"TASK": ("BYTES", "translate"), "TARGET_LANGUAGE": ("BYTES", "fr")}, "translate_fr"),
    (
        {
            "TASK": ("BYTES", "translate"),
            "LANGUAGE": ("BYTES", "de"),
            "TARGET_LANGUAGE": ("BYTES", "en"),
            "PUNCTUATE": ("BOOL", True),
        },
        "translate_en_punct",
    ),
]


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    return mixed_lengths()


def test_concurrent_requests_equal_transformers_generate(ar_server, tiny_ar_checkpoint, audios):
    """Sixteen requests (8 audios x transcription and translation) batched together on the server
    return exactly the tokens of transformers' greedy generate run one audio at a time."""
    before = batch_counts(ar_server.http_url, "ar_conformer_encoder")
    multi_row_steps_before = multi_row_steps(ar_server.metrics_url)
    requests, expected = [], []
    for index, audio in enumerate(audios):
        for options, instruction in (TASKS[index % 2], TASKS[2 + index % 2]):
            requests.append((audio, {**options, "MAX_NEW_TOKENS": ("INT32", NEW_TOKENS)}))
            expected.append(reference_generate(tiny_ar_checkpoint, audio, CARD_INSTRUCTIONS[instruction], NEW_TOKENS))
    results = infer_concurrently(ar_server.grpc_url, MODEL, requests)
    for result, want in zip(results, expected, strict=True):
        assert not isinstance(result, Exception), str(result)
        assert result[1] == want
    assert len({tuple(r[1]) for r in results}) > 4, "tiny model outputs should depend on the input"
    after = batch_counts(ar_server.http_url, "ar_conformer_encoder")
    assert sum(n - before.get(size, 0) for size, n in after.items() if size > 1) > 0, "no encoder batch > 1"
    assert multi_row_steps(ar_server.metrics_url) > multi_row_steps_before, "the engine never decoded rows together"


def multi_row_steps(metrics_url: str) -> float:
    """Engine steps that decoded more than one request so far."""
    steps = metric(metrics_url, "granite_speech_engine_step_rows_count", model="ar_llm_engine")
    return steps - metric(metrics_url, "granite_speech_engine_step_rows_bucket", model="ar_llm_engine", le="1")


def test_default_options_and_keywords_match_reference(ar_server, tiny_ar_checkpoint, audios):
    """Default MAX_NEW_TOKENS (200, the card's) and keyword biasing prompts, sent alone."""
    audio = audios[2]
    text, ids = infer(ar_server.grpc_url, MODEL, audio)
    assert ids == reference_generate(tiny_ar_checkpoint, audio, CARD_INSTRUCTIONS["asr"], 200)
    assert isinstance(text, str) and text
    keywords = {"KEYWORDS": ("BYTES", "Granite, Triton"), "MAX_NEW_TOKENS": ("INT32", 16)}
    _, ids = infer(ar_server.grpc_url, MODEL, audio, **keywords)
    instruction = "transcribe the speech to text. Keywords: Granite, Triton"
    assert ids == reference_generate(tiny_ar_checkpoint, audio, instruction, 16)


def test_a_wave_of_bad_and_good_requests_gives_each_its_own_answer(ar_server, audios):
    """Every kind of bad request, sent together with good ones of every task: each good request
    gets exactly its solo tokens, each bad one INVALID_ARG with its own message, and no batch
    had to be split to isolate a failure (nobody was served one at a time)."""
    good = [(audio, {**TASKS[i % 4][0], "MAX_NEW_TOKENS": ("INT32", 12)}) for i, audio in enumerate(audios)]
    alone = [infer(ar_server.grpc_url, MODEL, audio, **opts) for audio, opts in good]
    wave = interleave(good, BAD_REQUESTS + NOT_UTF8 + AR_ONLY_BAD)
    split_before = split_batches(ar_server.metrics_url, AR_MODELS)
    results = infer_concurrently(ar_server.grpc_url, MODEL, [(a, o) for a, o, *_ in wave])
    assert_each_got_its_own_answer(wave, results, alone)
    assert split_batches(ar_server.metrics_url, AR_MODELS) == split_before
    client = grpcclient.InferenceServerClient(ar_server.grpc_url)
    assert client.is_server_live() and client.is_model_ready(MODEL)


def test_digital_silence_is_an_empty_result_without_running_the_llm(ar_server, tiny_ar_checkpoint, audios):
    """All-zero audio of any length and with any task answers empty TEXT and TOKEN_IDS. Greedy
    decoding emits at least one token (end-of-text if nothing else), so an empty TOKEN_IDS means
    the LLM never ran for it. Near-silence (one sample, or faint noise) is decoded like any audio."""
    faint = (1e-4 * np.random.default_rng(5).standard_normal(24_000)).astype(np.float32)
    one_sample = np.zeros(16_000, np.float32)
    one_sample[8_000] = 1e-3
    silent = [np.zeros(n, np.float32) for n in (1_600, 16_000, 160_000)]
    tokens = ("INT32", NEW_TOKENS)
    requests = [
        (silent[0], {"MAX_NEW_TOKENS": tokens}),
        (audios[2], {"MAX_NEW_TOKENS": tokens}),
        (silent[1], {**TASKS[2][0], "MAX_NEW_TOKENS": tokens}),
        (faint, {"MAX_NEW_TOKENS": tokens}),
        (silent[2], {"KEYWORDS": ("BYTES", "Granite")}),
        (one_sample, {"MAX_NEW_TOKENS": tokens}),
    ]
    results = infer_concurrently(ar_server.grpc_url, MODEL, requests)
    assert results[0] == results[2] == results[4] == ("", [])
    for index in (1, 3, 5):
        want = reference_generate(tiny_ar_checkpoint, requests[index][0], CARD_INSTRUCTIONS["asr"], NEW_TOKENS)
        assert results[index][1] == want and len(want) > 0


def test_audio_of_the_wrong_rank_is_refused_by_shape(ar_server):
    """AUDIO must be [1, samples]: Triton reads a rank-1 [samples] tensor as `samples` requests
    (the README and the ensemble config say so; the client refuses to send one)."""
    with pytest.raises(grpcclient.InferenceServerException, match="AUDIO"):
        infer(ar_server.grpc_url, MODEL, GOOD[None, None])
    rank_one = grpcclient.InferInput("AUDIO", [GOOD.shape[0]], "FP32")
    rank_one.set_data_from_numpy(GOOD)
    client = grpcclient.InferenceServerClient(ar_server.grpc_url)
    with pytest.raises(grpcclient.InferenceServerException, match="batch-size must be <= 16"):
        client.infer(MODEL, [rank_one])


def test_custom_metrics_count_audio_tokens_and_rejections(ar_server):
    url = ar_server.metrics_url
    engine = {"model": "ar_llm_engine"}
    before = metric(url, "granite_speech_audio_seconds_total", model="ar_feature_extractor")
    tokens = metric(url, "granite_speech_generated_tokens_total", **engine)
    rejected = metric(url, "granite_speech_rejected_requests_total", model="ar_feature_extractor")
    steps = metric(url, "granite_speech_engine_step_rows_count", **engine)
    first_tokens = metric(url, "granite_speech_engine_first_token_seconds_count", **engine)
    busy = {phase: metric(url, "granite_speech_engine_busy_seconds_total", phase=phase, **engine) for phase in PHASES}
    started = time.perf_counter()
    _, ids = infer(ar_server.grpc_url, MODEL, GOOD, MAX_NEW_TOKENS=("INT32", 5))
    wall = time.perf_counter() - started
    with pytest.raises(grpcclient.InferenceServerException):
        infer(ar_server.grpc_url, MODEL, GOOD, LANGUAGE=("BYTES", "xx"))
    after = metric(url, "granite_speech_audio_seconds_total", model="ar_feature_extractor")
    assert after - before == pytest.approx(GOOD.shape[0] / 16_000)
    assert metric(url, "granite_speech_generated_tokens_total", **engine) - tokens == len(ids)
    assert metric(url, "granite_speech_rejected_requests_total", model="ar_feature_extractor") - rejected == 1
    # 5 tokens: the first from the prefill, then 4 decode steps (or fewer when it ends by end of text)
    assert 1 <= metric(url, "granite_speech_engine_step_rows_count", **engine) - steps <= 5
    assert metric(url, "granite_speech_engine_first_token_seconds_count", **engine) - first_tokens == 1
    spent = {p: metric(url, "granite_speech_engine_busy_seconds_total", phase=p, **engine) - busy[p] for p in PHASES}
    assert spent["prefill"] > 0 and spent["decode"] >= 0  # no decode step when the first token ends it
    assert spent["prefill"] + spent["decode"] < wall
    assert metric(url, "granite_speech_kv_cache_bytes", **engine) > 0
    assert metric(url, "granite_speech_engine_tokens_per_second", **engine) >= 0
    assert metric(url, "granite_speech_batch_requests", model="ar_conformer_encoder") >= 1
