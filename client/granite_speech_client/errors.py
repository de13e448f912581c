"""Exceptions of the client, one class per failure a user can act on.

Every class carries the CLI exit code for its failure (see `granite-speech --help`).
"""

from __future__ import annotations


class GraniteSpeechError(Exception):
    """Base class of every error this package raises."""

    exit_code = 1


class InvalidRequestError(GraniteSpeechError, ValueError):
    """A request option is invalid (language, task, keywords...); nothing was sent."""

    exit_code = 2


class ServerUnreachableError(GraniteSpeechError, ConnectionError):
    """No connection to the server (wrong address, server down) after the configured retries."""

    exit_code = 3


class ModelNotReadyError(GraniteSpeechError):
    """The server answers, but the ensemble (or one of its models) is not loaded or not ready."""

    exit_code = 4


class AudioInputError(GraniteSpeechError, ValueError):
    """The audio could not be read: missing, unreadable or unsupported file, or a bad array."""

    exit_code = 5


class ServerRejectedError(GraniteSpeechError):
    """The server refused or failed the request; `server_message` is the server's own text."""

    exit_code = 6

    def __init__(self, server_message: str, status: str | None = None) -> None:
        super().__init__(f"server rejected the request: {server_message}")
        self.server_message = server_message
        self.status = status  # gRPC status code name or HTTP status, e.g. StatusCode.INVALID_ARGUMENT / 400


class RequestTimeoutError(GraniteSpeechError, TimeoutError):
    """The server did not answer within `timeout_s`."""

    exit_code = 7


class ServerOverloadedError(GraniteSpeechError):
    """The server answered UNAVAILABLE (a model's queue was full or its queue timeout expired) on
    every attempt; try later, or with more `retries`."""

    exit_code = 8
