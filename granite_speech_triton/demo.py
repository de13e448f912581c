"""The main job: start tritonserver with our repositories, transcribe a file, print the text."""

from __future__ import annotations

import sys
from pathlib import Path

from .serving import server

SHOWN_CHARACTERS = 40  # of a random-weight model's text (before escaping)
RANDOM_WEIGHTS_NOTE = (
    "random weights (make demo-tiny): the server and every step work, but the tokens are random, so the text is "
    "gibberish; `make demo` with a real CHECKPOINT transcribes"
)


def escape(text: str) -> str:
    """`text` with what a terminal would not show as it is escaped: line breaks, control characters and
    U+FFFD (what token bytes that are not valid UTF-8 decode to) become \\n, \\x1b, \\ufffd, ..."""
    return "".join(c if c.isprintable() and c != "\ufffd" else c.encode("unicode_escape").decode() for c in text)


def describe(variant: str, audio: Path, result, random_weights: bool) -> str:
    """One line per transcription: audio, timing, token count and the (escaped) text."""
    text = escape(result.text)
    if random_weights and len(result.text) > SHOWN_CHARACTERS:
        text = f"{escape(result.text[:SHOWN_CHARACTERS])}... ({len(result.text) - SHOWN_CHARACTERS} more characters)"
    rtfx = result.audio_seconds / result.latency_s
    return (
        f"[{variant}] {audio.name}: {result.audio_seconds:.1f} s of audio in {result.latency_s:.2f} s "
        f"(RTFx {rtfx:.1f}), {len(result.token_ids)} tokens: {text}"
    )


def run_demo(
    options: server.ServerOptions, audio: Path, variants: tuple[str, ...], log_path: Path, random_weights: bool = False
) -> int:
    """Serve, transcribe `audio` with every variant through its ensemble, stop. Returns an exit code."""
    from granite_speech_client import GraniteSpeechClient, GraniteSpeechError

    with (
        server.running(options, log_path),
        GraniteSpeechClient(f"127.0.0.1:{options.grpc_port}", "grpc") as client,
    ):
        for variant in variants:
            try:
                result = client.transcribe(audio, variant=variant)
            except GraniteSpeechError as exc:
                print(f"error: [{variant}] {exc}", file=sys.stderr)
                return 1
            print(describe(variant, audio, result, random_weights), flush=True)
    if random_weights:
        print(RANDOM_WEIGHTS_NOTE)
    return 0
