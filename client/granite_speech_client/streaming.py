"""Streaming AR requests: the text as the server generates it, from `granite_speech_stream`.

gRPC uses a bidirectional stream; HTTP uses Triton's `generate_stream` endpoint (server-sent
events). Both yield (text so far, token ids so far, final) for one request; leaving the loop early
cancels the request on the server (gRPC), or closes the connection (HTTP).
"""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .errors import ServerRejectedError
from .transport import ConnectionSettings, grpc_client, translate_error

STREAMING_MODEL = "granite_speech_stream"
Update = tuple[str, tuple[int, ...], bool]  # (text so far, token ids so far, final)


def stream(settings: ConnectionSettings, inputs: dict[str, np.ndarray]) -> Iterator[Update]:
    """One streaming request over the connection's protocol."""
    return grpc_stream(settings, inputs) if settings.protocol == "grpc" else http_stream(settings, inputs)


def grpc_stream(settings: ConnectionSettings, inputs: dict[str, np.ndarray]) -> Iterator[Update]:
    client = grpc_client(settings)
    responses: queue.Queue = queue.Queue()
    tensors = []
    for name, value in inputs.items():
        tensor = triton_grpc.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(STREAMING_MODEL, tensors, enable_empty_final_response=True)
        final = False
        while not final:
            try:
                result, error = responses.get(timeout=settings.timeout_s)
            except queue.Empty:
                raise TimeoutError from None
            if error is not None:
                raise error
            final = result.get_response().parameters["triton_final_response"].bool_param
            text = result.as_numpy("TEXT")
            if text is not None:
                yield (
                    decode_text(text.reshape(-1)[0]),
                    tuple(int(t) for t in result.as_numpy("TOKEN_IDS").reshape(-1)),
                    final,
                )
    except (InferenceServerException, OSError) as exc:
        raise translate_error(exc, settings) or exc from exc
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def http_stream(settings: ConnectionSettings, inputs: dict[str, np.ndarray]) -> Iterator[Update]:
    """Server-sent events of `generate_stream`; an event is known to be the last when the stream ends."""
    body = json.dumps({name: json_value(value) for name, value in inputs.items()}).encode()
    url = f"http://{settings.url}/v2/models/{STREAMING_MODEL}/generate_stream"
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    held: Update | None = None
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout_s) as response:
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[len(b"data: ") :])
                if "error" in event:
                    raise ServerRejectedError(event["error"])
                if held is not None:
                    yield held
                ids = event["TOKEN_IDS"]  # generate_stream writes a one-element tensor as a scalar
                held = (event["TEXT"], tuple(ids) if isinstance(ids, list) else (ids,), False)
    except urllib.error.HTTPError as exc:
        raise ServerRejectedError(exc.read().decode(errors="replace"), str(exc.code)) from exc
    except OSError as exc:
        raise translate_error(exc, settings) or exc from exc
    if held is not None:
        yield held[0], held[1], True


def json_value(value: np.ndarray) -> object:
    """A [1, n] input as generate_stream takes it: the audio as a flat list, an option as a scalar."""
    flat = value.reshape(-1)
    if flat.shape[0] != 1:
        return flat.tolist()
    item = flat[0]
    return decode_text(item) if isinstance(item, bytes) else item.item()


def decode_text(value: object) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
