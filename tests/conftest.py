"""Shared fixtures: tiny checkpoints and a real tritonserver started on free loopback ports."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from granite_speech_triton.serving import server
from granite_speech_triton.serving.repository import DeploySettings, render
from granite_speech_triton.tiny import make_tiny_ar_checkpoint, make_tiny_nar_checkpoint

# Small enough to keep tests fast, large enough for the 30 s exactness audio. No queue timeout: on a
# busy machine a request may wait longer than the default 30 s, and a correctness test must not
# depend on speed (test_overload.py bounds the queue by size).
TEST_SETTINGS = dict(
    max_batch_size=16, max_queue_delay_us=50_000, max_audio_seconds=40.0, max_new_tokens_limit=256, queue_timeout_us=0
)


@dataclasses.dataclass
class RunningServer:
    http_url: str
    grpc_url: str
    metrics_url: str
    log_path: Path
    settings: DeploySettings


@pytest.fixture(scope="session")
def tiny_ar_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_ar_checkpoint(tmp_path_factory.mktemp("tiny-ar"))


@pytest.fixture(scope="session")
def tiny_nar_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_nar_checkpoint(tmp_path_factory.mktemp("tiny-nar"))


def start_server(
    out: Path, settings: DeploySettings, variants: tuple[str, ...], load_models: tuple[str, ...] = ()
) -> Iterator[RunningServer]:
    """Render the repositories for `variants`, start tritonserver, yield it, stop it.

    With `load_models`, the server runs in explicit model control and loads only those models.
    """
    repositories = render(out, settings, variants)
    http, grpc, metrics = server.free_port(), server.free_port(), server.free_port()
    options = server.ServerOptions(
        repositories=repositories,
        build_dir=Path("build"),
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        model_control_mode="explicit" if load_models else "none",
        load_models=list(load_models),
    )
    log_path = out / "server.log"
    process = server.start(options, log_path)
    try:
        server.wait_ready(http, process, log_path)
        yield RunningServer(
            f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}/metrics", log_path, settings
        )
    finally:
        server.stop(process)


@pytest.fixture(scope="session")
def ar_server(tmp_path_factory: pytest.TempPathFactory, tiny_ar_checkpoint: Path) -> Iterator[RunningServer]:
    settings = DeploySettings(ar_checkpoint=str(tiny_ar_checkpoint), **TEST_SETTINGS)
    yield from start_server(tmp_path_factory.mktemp("ar-repo"), settings, ("ar",))


@pytest.fixture(scope="session")
def nar_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_ar_checkpoint: Path, tiny_nar_checkpoint: Path
) -> Iterator[RunningServer]:
    """Both variants in the repository, only the NAR ensemble (and its steps) loaded at start."""
    settings = DeploySettings(
        ar_checkpoint=str(tiny_ar_checkpoint), nar_checkpoint=str(tiny_nar_checkpoint), **TEST_SETTINGS
    )
    yield from start_server(tmp_path_factory.mktemp("nar-repo"), settings, ("ar", "nar"), ("granite_speech_nar",))
