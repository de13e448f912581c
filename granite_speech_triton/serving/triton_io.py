"""Helpers shared by the `model.py` adapters; imported only inside Triton's Python backend.

Every adapter follows one shape (decode -> validate -> predict -> encode):
`decode` turns one request into a model input and raises `RequestError` on bad input; `predict`
runs the whole batch of valid inputs at once; `encode` turns one output into a response. A bad
request gets an error response naming the problem and never disturbs its batch-mates.

Placement happens in one place: the loop moves every decoded tensor to the model's device and
dtype (`BatchAdapter.run`) before `predict`, so model code never sees host tensors on a GPU.
Between steps, a tensor on a GPU travels by DLPack and stays there, in the dtype the config
declares (the serving dtype; render sets FORCE_CPU_ONLY_INPUT_TENSORS=no); host tensors travel
as numpy arrays, float32 on the wire.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

from granite_speech_triton.model.errors import RequestError
from granite_speech_triton.model.prompts import DEFAULT_MAX_NEW_TOKENS, SpeechRequest, parse_keywords
from granite_speech_triton.model.weights import parse_dtype, resolve_checkpoint
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


def optional_text(request, name: str, default: str) -> str:
    value = single_item(request, name)
    if value is None:
        return default
    item = value.reshape(-1)[0]
    return item.decode("utf-8") if isinstance(item, bytes) else str(item)


def optional_number(request, name: str, default: Any) -> Any:
    value = single_item(request, name)
    return default if value is None else value.reshape(-1)[0].item()


def request_options(request) -> SpeechRequest:
    """The optional TASK/LANGUAGE/... inputs of a request, with the model card's defaults."""
    return SpeechRequest(
        task=optional_text(request, "TASK", "transcribe"),
        language=optional_text(request, "LANGUAGE", "en"),
        target_language=optional_text(request, "TARGET_LANGUAGE", ""),
        keywords=parse_keywords(optional_text(request, "KEYWORDS", "")),
        punctuate=bool(optional_number(request, "PUNCTUATE", False)),
        max_new_tokens=int(optional_number(request, "MAX_NEW_TOKENS", DEFAULT_MAX_NEW_TOKENS)),
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


class Counter:
    """One labelled Prometheus counter or gauge on Triton's metrics endpoint."""

    def __init__(self, name: str, description: str, model: str, gauge: bool = False) -> None:
        kind = pb_utils.MetricFamily.GAUGE if gauge else pb_utils.MetricFamily.COUNTER
        # The family must outlive its metric, so both are kept.
        self.family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self.metric = self.family.Metric(labels={"model": model})

    def add(self, value: float) -> None:
        self.metric.increment(value)

    def set(self, value: float) -> None:
        self.metric.set(value)


@dataclass(frozen=True)
class StageSettings:
    """What a model instance reads from its config.pbtxt parameters and Triton's arguments."""

    params: dict[str, str]
    device: torch.device
    dtype: torch.dtype
    float_outputs: dict[str, torch.dtype]  # float outputs -> the type the config declares (the wire type)

    def checkpoint(self) -> Path:
        return resolve_checkpoint(self.params["checkpoint"], self.params.get("revision") or None)


class BatchAdapter:
    """Base of every `TritonPythonModel`: per-request errors around one batched predict.

    Subclasses call `setup(args)` first in `initialize`, and warm up through `run`.
    """

    batch_fill: Counter | None = None
    rejected: Counter | None = None
    stage: StageSettings

    def setup(self, args: dict[str, str]) -> StageSettings:
        """Parameters, device and dtype; torch threads configured; batch metrics exported."""
        params = model_parameters(args)
        configure_threads(params)
        self.init_metrics(args)
        outputs = json.loads(args["model_config"]).get("output", [])
        float_outputs = {o["name"]: FLOAT_TYPES[o["data_type"]] for o in outputs if o["data_type"] in FLOAT_TYPES}
        device, dtype = torch_device(args, params["device"]), parse_dtype(params.get("dtype", "float32"))
        self.stage = StageSettings(params, device, dtype, float_outputs)
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

    def decode(self, request) -> Any:
        raise NotImplementedError

    def predict(self, inputs: list[Any]) -> list[Any]:
        raise NotImplementedError

    def encode(self, output: Any) -> pb_utils.InferenceResponse:
        raise NotImplementedError

    def run(self, inputs: list[Any]) -> list[Any]:
        """`predict` on the inputs moved to the model's device and dtype: the one place where a
        request's tensors are placed (warmups go through here too)."""
        return self.predict([place(item, self.stage.device, self.stage.dtype) for item in inputs])

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        valid: list[tuple[int, Any]] = []
        for index, request in enumerate(requests):
            try:
                valid.append((index, self.decode(request)))
            except RequestError as exc:
                responses[index] = error_response(str(exc))
        if self.batch_fill is not None:
            self.batch_fill.set(len(requests))
            self.rejected.add(len(requests) - len(valid))
        if valid:
            outputs = self._predict_isolating_failures([item for _, item in valid])
            for (index, _), response in zip(valid, outputs, strict=True):
                responses[index] = response
        return responses

    def _predict_isolating_failures(self, inputs: list[Any]) -> list:
        """Run the batch; if it fails, rerun one by one so only the culprit gets the error."""
        try:
            return [self.encode(output) for output in self.run(inputs)]
        except RequestError as exc:
            if len(inputs) == 1:
                return [error_response(str(exc))]
        except Exception as exc:  # never let an exception escape execute
            log.exception("batch of %d failed", len(inputs))
            if len(inputs) == 1:
                return [error_response(f"internal error: {type(exc).__name__}: {exc}", invalid_request=False)]
        return [response for item in inputs for response in self._predict_isolating_failures([item])]
