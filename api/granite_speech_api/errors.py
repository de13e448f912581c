"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, with their HTTP status.

400 invalid_request_error  a bad field, or audio that cannot be read (param names the field)
404 invalid_request_error  an unknown model (code model_not_found) or path
413 invalid_request_error  a request body over max_upload_mb (code upload_too_large)
503 server_error           Triton unreachable, overloaded (code server_overloaded) or the model not ready
504 server_error           Triton did not answer in time
500 server_error           anything else
"""

from __future__ import annotations

from granite_speech_client import (
    AudioInputError,
    GraniteSpeechError,
    InvalidRequestError,
    RequestTimeoutError,
    ServerOverloadedError,
    ServerRejectedError,
)
from starlette.responses import JSONResponse

INVALID_ARGUMENT = ("StatusCode.INVALID_ARGUMENT", "400")  # Triton's status for a bad request (gRPC, HTTP)


class ApiError(Exception):
    """An error answered to the caller as OpenAI does."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def from_client_error(exc: GraniteSpeechError) -> ApiError:
    """The API's answer to an error of granite_speech_client."""
    if isinstance(exc, AudioInputError):
        return invalid(str(exc), "file")
    if isinstance(exc, InvalidRequestError):
        return invalid(str(exc))
    if isinstance(exc, ServerRejectedError) and exc.status in INVALID_ARGUMENT:
        return invalid(exc.server_message)
    if isinstance(exc, ServerOverloadedError):
        return ApiError(503, str(exc), code="server_overloaded")
    if isinstance(exc, RequestTimeoutError):
        return ApiError(504, str(exc), code="timeout")
    if isinstance(exc, ServerRejectedError):
        return ApiError(500, str(exc))
    return ApiError(503, str(exc), code="unavailable")  # unreachable, not ready
