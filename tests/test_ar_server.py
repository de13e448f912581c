"""The AR ensemble on a real tritonserver: exactness against transformers, batching, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from audio_samples import mixed_lengths
from bad_inputs import BAD_REQUESTS, GOOD
from reference import CARD_INSTRUCTIONS, reference_generate
from triton_helpers import batch_counts, infer, infer_concurrently

pytestmark = pytest.mark.server
MODEL = "granite_speech"
NEW_TOKENS = 24

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
    before = {m: batch_counts(ar_server.http_url, m) for m in ("ar_conformer_encoder", "ar_llm_decoder")}
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
    for model, counts_before in before.items():
        after = batch_counts(ar_server.http_url, model)
        multi = sum(n - counts_before.get(size, 0) for size, n in after.items() if size > 1)
        assert multi > 0, f"{model} never executed a batch of more than one request: {after}"


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


def test_bad_requests_fail_clearly_without_hurting_batch_mates(ar_server, audios):
    good = [(audio, {"MAX_NEW_TOKENS": ("INT32", 12)}) for audio in audios[:5]]
    alone = [infer(ar_server.grpc_url, MODEL, audio, **opts) for audio, opts in good]
    mixed = [item for pair in zip(good, BAD_REQUESTS[:5], strict=True) for item in pair] + BAD_REQUESTS[5:]
    results = infer_concurrently(ar_server.grpc_url, MODEL, [(a, o) for a, o, *_ in mixed])
    good_results = [r for item, r in zip(mixed, results, strict=True) if len(item) == 2]
    assert good_results == alone
    for item, result in zip(mixed, results, strict=True):
        if len(item) == 3:
            assert isinstance(result, grpcclient.InferenceServerException), f"{item[2]!r} was accepted"
            assert item[2] in result.message(), result.message()
    client = grpcclient.InferenceServerClient(ar_server.grpc_url)
    assert client.is_server_live() and client.is_model_ready(MODEL)


def test_three_dimensional_audio_is_rejected_by_shape(ar_server):
    with pytest.raises(grpcclient.InferenceServerException, match="AUDIO"):
        infer(ar_server.grpc_url, MODEL, GOOD[None, None])


def metric_value(metrics_url: str, name: str, model: str) -> float:
    import urllib.request

    with urllib.request.urlopen(metrics_url) as response:
        text = response.read().decode()
    prefix = f'{name}{{model="{model}"}} '
    values = [float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]
    assert values, f"{name} for {model} not exported"
    return values[0]


def test_custom_metrics_count_audio_tokens_and_rejections(ar_server):
    before = metric_value(ar_server.metrics_url, "granite_speech_audio_seconds_total", "ar_feature_extractor")
    tokens = metric_value(ar_server.metrics_url, "granite_speech_generated_tokens_total", "ar_llm_decoder")
    rejected = metric_value(ar_server.metrics_url, "granite_speech_rejected_requests_total", "ar_feature_extractor")
    _, ids = infer(ar_server.grpc_url, MODEL, GOOD, MAX_NEW_TOKENS=("INT32", 5))
    with pytest.raises(grpcclient.InferenceServerException):
        infer(ar_server.grpc_url, MODEL, GOOD, LANGUAGE=("BYTES", "xx"))
    url = ar_server.metrics_url
    after = metric_value(url, "granite_speech_audio_seconds_total", "ar_feature_extractor")
    assert after - before == pytest.approx(GOOD.shape[0] / 16_000)
    assert metric_value(url, "granite_speech_generated_tokens_total", "ar_llm_decoder") - tokens == len(ids)
    assert metric_value(url, "granite_speech_rejected_requests_total", "ar_feature_extractor") - rejected == 1
    assert metric_value(url, "granite_speech_batch_requests", "ar_llm_decoder") >= 1
