"""`granite-speech-api`: run the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from .app import create_app
from .settings import ApiSettings


def parse_settings(argv: list[str] | None = None) -> ApiSettings:
    parser = argparse.ArgumentParser(
        prog="granite-speech-api",
        description="OpenAI-compatible speech API (/v1/audio/transcriptions, /v1/audio/translations) in front "
        "of Granite Speech on Triton. Settings: --set key=value or GSA_<KEY> environment variables.",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an ApiSettings field")
    args = parser.parse_args(argv)
    pairs = [item.split("=", 1) for item in args.set]
    if any(len(pair) != 2 for pair in pairs):
        parser.error("--set takes KEY=VALUE")
    try:
        return ApiSettings.from_environment(dict(pairs))
    except ValueError as exc:
        parser.error(str(exc))
        raise  # parser.error exits


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
