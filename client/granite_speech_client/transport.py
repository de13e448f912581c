"""One connection to Triton over gRPC or HTTP, with tritonclient's errors turned into ours.

tritonclient's clients are not thread safe, so `TransportPool` keeps one per thread.
Retries happen here, with exponential backoff, and only for UNAVAILABLE: connection failures
(refused, reset) and an overloaded server (a model's queue full or timed out). INVALID_ARG and
every other answer are final.

After a connection failure the connection is made anew. A gRPC channel that failed to connect
waits out a reconnect backoff that grows to two minutes, failing every call at once meanwhile,
and by default channels to one address share that state: a client would keep failing long after
a restarted server is back. So each gRPC channel keeps its connection to itself, and one that
failed is replaced before the next call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .errors import (
    GraniteSpeechError,
    ModelNotReadyError,
    RequestTimeoutError,
    ServerOverloadedError,
    ServerRejectedError,
    ServerUnreachableError,
)

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
# Triton's messages for a model that is missing, loading or failed to load.
NOT_READY_HINTS = ("unknown model", "not ready", "no available versions")
TIMEOUT_STATUSES = ("StatusCode.DEADLINE_EXCEEDED", "504", "408")
UNAVAILABLE_STATUSES = ("StatusCode.UNAVAILABLE", "502", "503")
# Triton's messages when a model's queue policy rejects a request (max_queue_size, queue timeout).
OVERLOAD_HINTS = ("exceeds maximum queue size", "request timeout expired")
RETRIED = (ServerUnreachableError, ServerOverloadedError)
# tritonclient's own channel options, plus a connection (subchannel) of the channel's own.
_KEEPALIVE = triton_grpc.KeepAliveOptions()
GRPC_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", triton_grpc.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", triton_grpc.MAX_GRPC_MESSAGE_SIZE),
    ("grpc.keepalive_time_ms", _KEEPALIVE.keepalive_time_ms),
    ("grpc.keepalive_timeout_ms", _KEEPALIVE.keepalive_timeout_ms),
    ("grpc.keepalive_permit_without_calls", _KEEPALIVE.keepalive_permit_without_calls),
    ("grpc.http2.max_pings_without_data", _KEEPALIVE.http2_max_pings_without_data),
    ("grpc.use_local_subchannel_pool", 1),
]

T = TypeVar("T")


@dataclass(frozen=True)
class ConnectionSettings:
    """Where the server is and how patiently to talk to it."""

    url: str
    protocol: str = "grpc"
    timeout_s: float = 300.0  # per request (each piece of a split file is one request)
    connect_timeout_s: float = 10.0
    retries: int = 2  # extra attempts after an UNAVAILABLE answer (connection failure or overload)
    retry_backoff_s: float = 0.5  # first wait between attempts; doubles each time


def normalize_url(url: str | None, protocol: str) -> str:
    """'host:port' for tritonclient; the scheme is dropped and the protocol's port used when missing."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    url = (url or "localhost").split("://", 1)[-1].rstrip("/")
    return url if ":" in url else f"{url}:{DEFAULT_PORTS[protocol]}"


def translate_error(exc: BaseException, settings: ConnectionSettings) -> GraniteSpeechError | None:
    """Our exception for a tritonclient/socket exception, or None for anything else."""
    where = f"Triton server at {settings.url} ({settings.protocol})"
    if isinstance(exc, InferenceServerException):
        status, message = str(exc.status()), exc.message() or str(exc)
        if any(hint in message.lower() for hint in NOT_READY_HINTS):
            return ModelNotReadyError(f"{where}: {message}")
        if status in TIMEOUT_STATUSES:
            return RequestTimeoutError(f"{where} did not answer within {settings.timeout_s:g} s: {message}")
        if status in UNAVAILABLE_STATUSES and any(hint in message.lower() for hint in OVERLOAD_HINTS):
            return ServerOverloadedError(f"{where} is overloaded: {message}")
        if status in UNAVAILABLE_STATUSES:
            return ServerUnreachableError(f"{where} is unreachable: {message}")
        return ServerRejectedError(message, status)
    if isinstance(exc, TimeoutError):
        return RequestTimeoutError(f"{where} did not answer within {settings.timeout_s:g} s")
    if isinstance(exc, OSError):
        return ServerUnreachableError(f"{where} is unreachable: {exc}")
    return None


def grpc_client(settings: ConnectionSettings) -> triton_grpc.InferenceServerClient:
    """A gRPC client with a connection of its own (see the module's docstring)."""
    return triton_grpc.InferenceServerClient(settings.url, channel_args=GRPC_CHANNEL_ARGS)


class Transport:
    """A tritonclient client of either protocol behind one small interface."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        self.is_grpc = settings.protocol == "grpc"
        self._client: Any = self._connect()

    def _connect(self) -> Any:
        if self.is_grpc:
            return grpc_client(self.settings)
        settings = self.settings
        return triton_http.InferenceServerClient(
            settings.url, connection_timeout=settings.connect_timeout_s, network_timeout=settings.timeout_s
        )

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a tritonclient method, retrying UNAVAILABLE answers with exponential backoff."""
        if self.is_grpc:
            kwargs["client_timeout"] = self.settings.timeout_s
        for attempt in range(self.settings.retries + 1):
            try:
                return getattr(self._client, method)(*args, **kwargs)  # a retry may have a new client
            except Exception as exc:
                error = translate_error(exc, self.settings)
                if error is None:
                    raise
                if isinstance(error, ServerUnreachableError):  # the next call connects anew
                    self._client.close()
                    self._client = self._connect()
                if not isinstance(error, RETRIED) or attempt == self.settings.retries:
                    raise error from exc
            time.sleep(self.settings.retry_backoff_s * 2**attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Iterable[str]) -> dict[str, np.ndarray]:
        """Run `model` on named numpy inputs; returns the named outputs as numpy arrays."""
        module = triton_grpc if self.is_grpc else triton_http
        tensors = []
        for name, value in inputs.items():
            tensor = module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        requested = [module.InferRequestedOutput(name) for name in outputs]
        response = self.call("infer", model, tensors, outputs=requested)
        return {out.name(): response.as_numpy(out.name()) for out in requested}

    def model_parameters(self, model: str) -> dict[str, str]:
        """The `parameters` block of a model's config as plain strings."""
        config = self.call("get_model_config", model, **({"as_json": True} if self.is_grpc else {}))
        config = config.get("config", config)  # gRPC wraps it in {"config": ...}
        return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}

    def close(self) -> None:
        self._client.close()


class TransportPool:
    """One Transport per thread (and per greenlet under gevent's monkey patching)."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        self._local = threading.local()
        self._lock = threading.Lock()
        self._by_thread: dict[int, Transport] = {}

    def get(self) -> Transport:
        transport = getattr(self._local, "transport", None)
        if transport is None:
            transport = self._local.transport = Transport(self.settings)
            with self._lock:
                self._by_thread[threading.get_ident()] = transport
        return transport

    def discard(self, thread_ids: Iterable[int]) -> None:
        """Close the transports of threads that have finished (a transcribe_many's workers)."""
        with self._lock:
            transports = [self._by_thread.pop(i) for i in thread_ids if i in self._by_thread]
        for transport in transports:
            transport.close()

    def close(self) -> None:
        self.discard(list(self._by_thread))
