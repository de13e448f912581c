"""Small helpers for talking to the test server with tritonclient (no project client needed)."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc as grpcclient

NUMPY_TYPES = {"BYTES": np.object_, "INT32": np.int32, "BOOL": np.bool_, "FP32": np.float32}


def make_inputs(audio: np.ndarray, **options) -> list[grpcclient.InferInput]:
    """AUDIO [1, n] (or `audio` as given when it already has a batch dim) plus [1, 1] options."""
    batch = audio if audio.ndim >= 2 else audio[None]
    tensor = grpcclient.InferInput("AUDIO", list(batch.shape), np_to_triton(batch.dtype))
    tensor.set_data_from_numpy(batch)
    inputs = [tensor]
    for name, (datatype, value) in options.items():
        item = grpcclient.InferInput(name, [1, 1], datatype)
        item.set_data_from_numpy(np.array([[value]], dtype=NUMPY_TYPES[datatype]))
        inputs.append(item)
    return inputs


def np_to_triton(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)


def infer(url: str, model: str, audio: np.ndarray, **options) -> tuple[str, list[int]]:
    """One request; returns (text, token ids); raises InferenceServerException on error."""
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(model, make_inputs(audio, **options), client_timeout=300)
    finally:
        client.close()
    return result.as_numpy("TEXT")[0][0].decode(), result.as_numpy("TOKEN_IDS")[0].tolist()


def infer_concurrently(url: str, model: str, requests: list[tuple[np.ndarray, dict]]) -> list:
    """Send every request at once; each result is (text, ids) or the exception raised."""

    def one(request: tuple[np.ndarray, dict]):
        try:
            return infer(url, model, request[0], **request[1])
        except Exception as exc:  # the test inspects the error
            return exc

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(one, requests))


def max_batch_sizes(http_url: str) -> dict[str, int]:
    """Largest batch each model has executed so far, from Triton's statistics."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats") as response:
        stats = json.load(response)["model_stats"]
    return {m["name"]: max((b["batch_size"] for b in m.get("batch_stats", [])), default=0) for m in stats}


def batch_counts(http_url: str, model: str) -> dict[int, int]:
    """{batch size: executions} for one model."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats") as response:
        stats = json.load(response)["model_stats"][0]
    return {b["batch_size"]: int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def metric(metrics_url: str, name: str, **labels: str) -> float:
    """The value of the one sample of `name` whose labels include `labels` (KeyError if none)."""
    with urllib.request.urlopen(metrics_url) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        label_text, value = line[len(name) + 1 :].rsplit("} ", 1)
        found = dict(pair.split("=", 1) for pair in label_text.split(","))
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    raise KeyError(f"{name} with {labels} is not exported")


def interleave(good: list, bad: list) -> list:
    """good[0], bad[0], good[1], bad[1], ... then the rest of the longer list."""
    mixed = [item for pair in zip(good, bad, strict=False) for item in pair]
    return mixed + good[len(bad) :] + bad[len(good) :]


def assert_each_got_its_own_answer(wave: list[tuple], results: list, alone: list) -> None:
    """Good requests (audio, options) got exactly `alone`, in order; bad ones (audio, options,
    message part) got INVALID_ARG carrying their own message part."""
    assert [r for item, r in zip(wave, results, strict=True) if len(item) == 2] == alone
    for item, result in zip(wave, results, strict=True):
        if len(item) == 3:
            assert isinstance(result, grpcclient.InferenceServerException), f"{item[2]!r} was accepted"
            assert item[2] in result.message(), (item[2], result.message())
            assert result.status() == "StatusCode.INVALID_ARGUMENT", (item[2], result.status())


def split_batches(metrics_url: str, models: tuple[str, ...]) -> dict[str, float]:
    """How many batches each model had to split to isolate a failing request."""
    return {model: metric(metrics_url, "granite_speech_split_batches_total", model=model) for model in models}
