"""The main job: start tritonserver with our repositories, transcribe a file, print the text."""

from __future__ import annotations

import time
from pathlib import Path

from .serving import server


def run_demo(options: server.ServerOptions, audio: Path, variants: tuple[str, ...], log_path: Path) -> int:
    """Serve, transcribe `audio` with every variant through its ensemble, stop. Returns an exit code."""
    from granite_speech_client import GraniteSpeechClient

    print(f"starting tritonserver (log: {log_path}) ...", flush=True)
    started = time.monotonic()
    process = server.start(options, log_path)
    try:
        server.wait_ready(options.http_port, process, log_path)
        print(f"server ready in {time.monotonic() - started:.1f} s", flush=True)
        with GraniteSpeechClient(f"127.0.0.1:{options.grpc_port}", "grpc") as client:
            for variant in variants:
                result = client.transcribe(audio, variant=variant)
                rtfx = result.audio_seconds / result.latency_s
                print(
                    f"[{variant}] {audio.name} ({result.audio_seconds:.1f} s audio, {result.latency_s:.2f} s, "
                    f"RTFx {rtfx:.1f}): {result.text}"
                )
        return 0
    finally:
        server.stop(process)
