"""The ASGI app (FastAPI): OpenAI's audio endpoints, models, health, errors in OpenAI's shape.

POST /v1/audio/transcriptions   multipart form (forms.py); json, text, verbose_json, srt, vtt; stream
POST /v1/audio/translations     the same form; into English unless to_language says otherwise
GET  /v1/models, /v1/models/{id}  the models whose Triton ensemble is ready
GET  /health                    200 when Triton serves at least one model, else 503
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from granite_speech_client import GraniteSpeechClient
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError
from .formats import render
from .forms import read_form
from .service import SpeechService
from .settings import ApiSettings

OWNER = "ibm-granite"
log = logging.getLogger("granite_speech_api")


def create_app(settings: ApiSettings, client: GraniteSpeechClient | None = None) -> FastAPI:
    """The app; `client` defaults to one for `settings.triton_url`, closed when the app stops."""
    client = client or GraniteSpeechClient(
        settings.triton_url,
        settings.protocol,
        timeout_s=settings.request_timeout_s,
        max_pieces_in_flight=settings.max_pieces_in_flight,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        client.close()

    app = FastAPI(title="Granite Speech API (OpenAI-compatible)", lifespan=lifespan)
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    app.add_exception_handler(ApiError, lambda request, exc: exc.response())
    app.add_exception_handler(HTTPException, lambda request, exc: ApiError(exc.status_code, str(exc.detail)).response())
    app.add_exception_handler(Exception, internal_error)
    app.include_router(routes(SpeechService(client, settings)))
    return app


def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """Anything unexpected: a 500 in OpenAI's shape, logged with its traceback."""
    log.error("unexpected error on %s", request.url.path, exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()


def routes(service: SpeechService) -> APIRouter:
    router = APIRouter()
    started = int(time.time())

    def model_card(model: str) -> dict:
        return {"id": model, "object": "model", "created": started, "owned_by": OWNER}

    @router.get("/health")
    async def health() -> dict:
        return await run_in_threadpool(service.health)

    @router.get("/v1/models")
    async def models() -> dict:
        served = await run_in_threadpool(service.served_models)
        return {"object": "list", "data": [model_card(m) for m in served]}

    @router.get("/v1/models/{model}")
    async def model(model: str) -> dict:
        if model not in await run_in_threadpool(service.served_models):
            raise ApiError(404, f"the model {model!r} is not served here", "model", "model_not_found")
        return model_card(model)

    async def speech(request: Request, task: str) -> Response:
        form = await read_form(request, task)
        audio = await run_in_threadpool(service.decode, form.upload)
        if form.stream:
            events = await run_in_threadpool(service.stream, form, audio)
            return StreamingResponse(events, media_type="text/event-stream")
        transcript = await run_in_threadpool(service.run, form, audio)
        return render(transcript, form.response_format, form.granularities)

    @router.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await speech(request, "transcribe")

    @router.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        return await speech(request, "translate")

    return router


class UploadLimit:
    """Refuses request bodies over `max_bytes` with 413: at once when Content-Length says so, else
    as soon as that much has arrived (chunked uploads), before the form is parsed to its end."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def error(self) -> ApiError:
        limit = self.max_bytes / 1024 / 1024
        return ApiError(413, f"the request body is larger than this server's limit of {limit:g} MB", "file",
                        "upload_too_large")  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            response: JSONResponse = self.error().response()
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self.error()
            return message

        await self.app(scope, limited, send)
