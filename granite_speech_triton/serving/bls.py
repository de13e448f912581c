"""Calls from one Triton Python model to another (Business Logic Scripting), and relaying answers.

Used by the models that stand in front of the AR decoding engine: the unary `ar_llm_decoder`
step of the `granite_speech` ensemble and the streaming `granite_speech_stream` pipeline. Both
answer from worker threads through each request's response sender, so one instance serves any
number of requests at once while the engine batches them.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator

import numpy as np
import triton_python_backend_utils as pb_utils

from granite_speech_triton.serving.relayed_errors import relayed_code

log = logging.getLogger("granite_speech_triton")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def tagged_error(message: str, code: str):
    """An error whose code survives a BLS hop (see `relayed_errors`)."""
    return pb_utils.TritonError(f"[{code}] {message}", getattr(pb_utils.TritonError, code))


class StepFailed(Exception):
    """A called model answered with an error; `error` is what to answer our own client."""

    def __init__(self, error) -> None:
        message, code_name = relayed_code(error.message())
        super().__init__(message)
        code = getattr(pb_utils.TritonError, code_name) if code_name else error.code()
        self.error = pb_utils.TritonError(message, code)


class Dependencies:
    """The models a model calls, loaded on first use when the server runs in explicit model control.

    Triton loads an ensemble's steps with it, but not the models a step calls over BLS. In the
    default mode every model is loaded at start and a load request is refused: nothing to do.
    """

    def __init__(self, *models: str) -> None:
        self.models = models
        self.checked = False
        self.lock = threading.Lock()

    def ensure_loaded(self) -> None:
        with self.lock:
            if self.checked:
                return
            for model in self.models:
                if not pb_utils.is_model_ready(model):
                    try:
                        pb_utils.load_model(model_name=model)
                    except Exception:  # refused outside explicit mode; the call then names the problem
                        log.debug("did not load %s", model, exc_info=True)
            self.checked = True


def call(model: str, inputs: list, outputs: list[str]) -> dict[str, pb_utils.Tensor]:
    """One request to a non-decoupled model -> its output tensors by name; StepFailed on error."""
    response = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs).exec()
    if response.has_error():
        raise StepFailed(response.error())
    return {name: pb_utils.get_output_tensor_by_name(response, name) for name in outputs}


def stream(model: str, inputs: list, outputs: list[str]) -> Iterator[list[pb_utils.Tensor]]:
    """Every response of a decoupled model, as output tensor lists; StepFailed on an error response."""
    request = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs)
    for response in request.exec(decoupled=True):
        if response.has_error():
            raise StepFailed(response.error())
        tensors = response.output_tensors()
        if tensors:  # the closing response of a decoupled model may carry nothing
            yield tensors


def control(payload: dict) -> pb_utils.Tensor:
    """The engine's CONTROL input: JSON of delivery instructions (stream, key, cancel)."""
    return pb_utils.Tensor("CONTROL", np.array([[json.dumps(payload).encode()]], dtype=np.object_))


def send_partial(sender, tensors: list) -> None:
    """One more response of a stream; a client that has gone is not an error here."""
    try:
        sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
    except Exception:  # the client may have disconnected or cancelled
        log.debug("could not deliver a partial response", exc_info=True)


def send_final(sender, tensors: list | None = None, error=None) -> None:
    """Close a request with its last tensors or an error; a client that has gone is not an error here."""
    try:
        sender.send(pb_utils.InferenceResponse(output_tensors=tensors or [], error=error), flags=FINAL)
    except Exception:  # the client may have disconnected or cancelled
        log.debug("could not deliver a final response", exc_info=True)


def internal_error(exc: Exception):
    return pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL)
