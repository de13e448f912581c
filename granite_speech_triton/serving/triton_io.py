"""Helpers shared by the `model.py` adapters; imported only inside Triton's Python backend.

Every adapter follows one shape (decode -> validate -> predict -> encode):
`decode` turns one request into a model input and checks it; `predict` runs the whole batch of
valid inputs at once; `encode` turns one output into a response. `BatchAdapter.execute` makes the
error guarantees hold by construction, whatever an adapter's code raises:
- any exception in `decode` is that request's INVALID_ARG (its content is at fault) and nobody
  else's; `decode` may also answer a request itself (`Answered`, e.g. digital silence);
- if `predict` raises, the batch is split in halves until the failing requests stand alone, so
  their batch-mates are still served exactly (batch invariance); a lone failure is INVALID_ARG
  for `RequestError`, INTERNAL otherwise;
- an `encode` failure is that one request's INTERNAL error.
No exception escapes `execute`: Triton would fail the whole batch with it.

Placement happens in one place: the loop moves every decoded tensor to the model's device and
dtype (`BatchAdapter.run`) before `predict`, so model code never sees host tensors on a GPU.
Between steps, a tensor on a GPU travels by DLPack and stays there, in the dtype the config
declares (the serving dtype; render sets FORCE_CPU_ONLY_INPUT_TENSORS=no); host tensors travel
as numpy arrays, float32 on the wire.
"""

from __future__ import annotations

import json
import logging
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

from granite_speech_triton.model.errors import RequestError
from granite_speech_triton.model.prompts import (
    DEFAULT_CONFIDENCE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_BEAMS,
    SpeechRequest,
    parse_keywords,
)
from granite_speech_triton.model.weights import parse_dtype, resolve_checkpoint
from granite_speech_triton.serving.cpu_lease import cpu_lease
from granite_speech_triton.serving.placement import place

log = logging.getLogger("granite_speech_triton")
FLOAT_TYPES = {"TYPE_FP32": torch.float32, "TYPE_FP16": torch.float16, "TYPE_BF16": torch.bfloat16}


def model_parameters(args: dict[str, str]) -> dict[str, str]:
    """The `parameters` block of the model's config.pbtxt as a plain dict."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def torch_device(args: dict[str, str], device: str) -> torch.device:
    """'cpu', or the GPU Triton assigned to this instance when device is 'cuda'."""
    if device == "cuda":
        return torch.device(f"cuda:{int(args.get('model_instance_device_id', 0))}")
    return torch.device("cpu")


def configure_threads(parameters: dict[str, str]) -> None:
    threads = int(parameters.get("cpu_threads", "0"))
    if threads > 0:
        torch.set_num_threads(threads)


def single_item(request, name: str) -> np.ndarray | None:
    """The [1, ...] tensor of an input without its batch dimension, or None if absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.shape[0] != 1:
        raise RequestError(f"{name} must carry one item per request (batch dimension 1), got shape {list(array.shape)}")
    return array[0]


def optional_scalar(request, name: str) -> Any:
    """The one element of a [1, 1] input, or None if absent; RequestError unless there is exactly one."""
    value = single_item(request, name)
    if value is None:
        return None
    if value.size != 1:
        raise RequestError(f"{name} must hold one value, got shape {[1, *value.shape]}")
    return value.reshape(-1)[0]


def optional_text(request, name: str, default: str) -> str:
    item = optional_scalar(request, name)
    if item is None:
        return default
    if not isinstance(item, bytes):
        return str(item)
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"{name} is not valid UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def optional_number(request, name: str, default: Any) -> Any:
    item = optional_scalar(request, name)
    return default if item is None else item.item()


def request_options(request) -> SpeechRequest:
    """The optional TASK/LANGUAGE/... inputs of a request, with the model card's defaults."""
    return SpeechRequest(
        task=optional_text(request, "TASK", "transcribe"),
        language=optional_text(request, "LANGUAGE", "en"),
        target_language=optional_text(request, "TARGET_LANGUAGE", ""),
        keywords=parse_keywords(optional_text(request, "KEYWORDS", "")),
        punctuate=bool(optional_number(request, "PUNCTUATE", False)),
        max_new_tokens=int(optional_number(request, "MAX_NEW_TOKENS", DEFAULT_MAX_NEW_TOKENS)),
        timeout_ms=int(optional_number(request, "TIMEOUT_MS", 0)),
        decode_mode=optional_text(request, "DECODE_MODE", "greedy"),
        num_beams=int(optional_number(request, "NUM_BEAMS", DEFAULT_NUM_BEAMS)),
        confidence=float(optional_number(request, "CONFIDENCE", DEFAULT_CONFIDENCE)),
        entropy_gate=float(optional_number(request, "ENTROPY_GATE", 0.0)),
        timestamps=bool(optional_number(request, "TIMESTAMPS", False)),
    )


def sequence_input(request, name: str) -> torch.Tensor:
    """A required [1, T, ...] float input as a tensor [T, ...]: float32 from host memory, or the GPU
    tensor itself (DLPack, no copy, in the dtype it was sent in)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is not None and not tensor.is_cpu():
        value = dlpack.from_dlpack(tensor.to_dlpack())
        if value.shape[0] != 1:
            raise RequestError(f"{name} must carry one item per request (batch dimension 1), got {list(value.shape)}")
        return value[0]
    value = single_item(request, name)
    if value is None:
        raise RequestError(f"missing input {name}")
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def tensor_output(name: str, value: torch.Tensor | np.ndarray, dtype=np.float32) -> pb_utils.Tensor:
    """An output tensor with the batch dimension added back. A float torch tensor on a GPU leaves by
    DLPack and stays there, in `dtype` (a torch dtype); anything else becomes a numpy array."""
    if isinstance(value, torch.Tensor) and value.device.type == "cuda":
        value = value.detach().to(dtype)[None].contiguous()
        torch.cuda.current_stream(value.device).synchronize()  # the consumer reads it from another process
        return pb_utils.Tensor.from_dlpack(name, dlpack.to_dlpack(value))
    array = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else value
    return pb_utils.Tensor(name, np.ascontiguousarray(array, dtype=dtype)[None])


def error_response(message: str, invalid_request: bool = True) -> pb_utils.InferenceResponse:
    """An error response: INVALID_ARG for the caller's mistakes, INTERNAL otherwise."""
    code = pb_utils.TritonError.INVALID_ARG if invalid_request else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def invalid_request_response(exc: Exception) -> pb_utils.InferenceResponse:
    """INVALID_ARG for an exception raised while reading or checking one request.

    A RequestError carries its own message for the caller; any other exception there is a check
    we lack, so it is logged with its traceback and passed on with its type.
    """
    if isinstance(exc, RequestError):
        return error_response(str(exc))
    log.warning("request rejected by an unexpected %s", type(exc).__name__, exc_info=exc)
    return error_response(f"invalid request: {type(exc).__name__}: {exc}")


def failure_response(exc: Exception) -> pb_utils.InferenceResponse:
    """The response of a request that failed alone in predict or encode."""
    if isinstance(exc, RequestError):
        return error_response(str(exc))
    log.error("request failed", exc_info=exc)
    return error_response(f"internal error: {type(exc).__name__}: {exc}", invalid_request=False)


@dataclass(frozen=True)
class Answered:
    """What `decode` returns for a request it answers without `predict` (e.g. digital silence):
    `output` goes straight to `encode`, and the request takes no place in the batch."""

    output: Any


class Counter:
    """One labelled Prometheus counter or gauge on Triton's metrics endpoint; thread-safe.

    The lock is not optional. In Triton 2.51's Python backend a metric update rewrites shared
    memory that belongs to the metric object, so two threads updating one metric at once hand the
    server a freed buffer and tritonserver dies (SIGSEGV). Our models update metrics from worker
    threads (the streaming pipeline, the engine) as well as from `execute`.
    """

    def __init__(self, name: str, description: str, model: str, gauge: bool = False, **labels: str) -> None:
        kind = pb_utils.MetricFamily.GAUGE if gauge else pb_utils.MetricFamily.COUNTER
        # The family must outlive its metric, so both are kept.
        self.family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self.metric = self.family.Metric(labels={"model": model, **labels})
        self.lock = threading.Lock()

    def add(self, value: float) -> None:
        with self.lock:
            self.metric.increment(value)

    def set(self, value: float) -> None:
        with self.lock:
            self.metric.set(value)


class Histogram:
    """One labelled Prometheus histogram on Triton's metrics endpoint; thread-safe (see Counter)."""

    def __init__(self, name: str, description: str, model: str, buckets: list[float]) -> None:
        self.family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.HISTOGRAM)
        self.metric = self.family.Metric(labels={"model": model}, buckets=buckets)
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            self.metric.observe(value)


@dataclass(frozen=True)
class StageSettings:
    """What a model instance reads from its config.pbtxt parameters and Triton's arguments."""

    params: dict[str, str]
    device: torch.device
    dtype: torch.dtype
    float_outputs: dict[str, torch.dtype]  # float outputs -> the type the config declares (the wire type)
    lease: AbstractContextManager  # held while computing: the CPU lease, or nothing (cpu_lease.py)

    def checkpoint(self) -> Path:
        return resolve_checkpoint(self.params["checkpoint"], self.params.get("revision") or None)


def stage_settings(args: dict[str, str]) -> StageSettings:
    """A model instance's parameters, device, dtype and float output types; torch threads configured."""
    params = model_parameters(args)
    configure_threads(params)
    outputs = json.loads(args["model_config"]).get("output", [])
    float_outputs = {o["name"]: FLOAT_TYPES[o["data_type"]] for o in outputs if o["data_type"] in FLOAT_TYPES}
    device, dtype = torch_device(args, params["device"]), parse_dtype(params.get("dtype", "float32"))
    return StageSettings(params, device, dtype, float_outputs, cpu_lease(params.get("cpu_lease_file", "")))


class BatchAdapter:
    """Base of every `TritonPythonModel`: per-request errors around one batched predict.

    Subclasses call `setup(args)` first in `initialize`, and warm up through `run`.
    """

    batch_fill: Counter | None = None
    rejected: Counter | None = None
    split_batches: Counter | None = None
    stage: StageSettings

    def setup(self, args: dict[str, str]) -> StageSettings:
        """Parameters, device and dtype; torch threads configured; batch metrics exported."""
        self.init_metrics(args)
        self.stage = stage_settings(args)
        return self.stage

    def float_output(self, name: str, value: torch.Tensor) -> pb_utils.Tensor:
        """A float output in the type its config declares (host: float32 numpy; GPU: DLPack)."""
        return tensor_output(name, value, self.stage.float_outputs[name] if value.is_cuda else np.float32)

    def init_metrics(self, args: dict[str, str]) -> None:
        model = args["model_name"]
        self.batch_fill = Counter(
            "granite_speech_batch_requests", "Requests in the most recent batch executed", model, gauge=True
        )
        self.rejected = Counter("granite_speech_rejected_requests_total", "Requests rejected as invalid", model)
        self.split_batches = Counter(
            "granite_speech_split_batches_total", "Batches whose predict raised and were split to isolate it", model
        )

    def decode(self, request) -> Any:
        raise NotImplementedError

    def predict(self, inputs: list[Any]) -> list[Any]:
        raise NotImplementedError

    def encode(self, output: Any) -> pb_utils.InferenceResponse:
        raise NotImplementedError

    def run(self, inputs: list[Any]) -> list[Any]:
        """`predict` on the inputs moved to the model's device and dtype: the one place where a
        request's tensors are placed (warmups go through here too)."""
        with self.stage.lease:
            return self.predict([place(item, self.stage.device, self.stage.dtype) for item in inputs])

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        valid: list[tuple[int, Any]] = []
        rejected = 0
        for index, request in enumerate(requests):
            try:
                item = self.decode(request)
            except Exception as exc:  # whatever the type: this request's content is at fault
                responses[index] = invalid_request_response(exc)
                rejected += 1
                continue
            if isinstance(item, Answered):
                responses[index] = self._encode_isolated(item.output)
            else:
                valid.append((index, item))
        if self.batch_fill is not None:
            self.batch_fill.set(len(requests))
            self.rejected.add(rejected)
        if valid:
            outputs = self._predict_isolating_failures([item for _, item in valid])
            for (index, _), response in zip(valid, outputs, strict=True):
                responses[index] = response
        return responses

    def _predict_isolating_failures(self, inputs: list[Any]) -> list:
        """Predict the batch; if that raises, split it in halves until each failure stands alone."""
        try:
            outputs = self.run(inputs)
        except Exception as exc:  # never let an exception escape execute
            if len(inputs) == 1:
                return [failure_response(exc)]
            log.warning("batch of %d failed; splitting it to isolate the failure", len(inputs), exc_info=exc)
            if self.split_batches is not None:
                self.split_batches.add(1)
            half = len(inputs) // 2
            return self._predict_isolating_failures(inputs[:half]) + self._predict_isolating_failures(inputs[half:])
        return [self._encode_isolated(output) for output in outputs]

    def _encode_isolated(self, output: Any) -> pb_utils.InferenceResponse:
        try:
            return self.encode(output)
        except Exception as exc:  # one output that cannot be encoded fails only its own request
            return failure_response(exc)
