"""The launcher's process and shared-memory bookkeeping (serving/supervisor.py, serving/server.py),
on stand-in processes: no tritonserver. The supervisor itself runs a real one in test_resilience.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from granite_speech_triton.serving import server, supervisor

STUB = supervisor.STUB_BINARY


@pytest.fixture
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "shm"
    folder.mkdir()
    monkeypatch.setattr(server, "SHM_DIR", folder)
    return folder


def spawn_stub(tmp_path: Path, model: str) -> subprocess.Popen:
    """A child whose command line reads like a Python backend stub's: <stub> <repo>/<model>/1/model.py."""
    script = tmp_path / "repository" / model / "1" / "model.py"
    script.parent.mkdir(parents=True)
    script.write_text("sleep 300\n")  # run by sh, which keeps the stub's argv
    argv = [str(tmp_path / STUB), str(script)]
    return subprocess.Popen(argv, executable="/bin/sh", start_new_session=True)


def test_the_watcher_finds_stubs_by_model_and_reports_how_one_died(tmp_path: Path):
    stub = spawn_stub(tmp_path, "ar_llm_engine")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # not a stub
    try:
        watcher = supervisor.StubWatcher(os.getpid())
        watcher.scan()
        assert watcher.stubs == {stub.pid: "ar_llm_engine"} and watcher.dead() == []
        os.kill(stub.pid, signal.SIGKILL)
        while supervisor.proc_stat(stub.pid)[0] != "Z":  # a zombie until reaped
            time.sleep(0.01)
        assert watcher.dead() == [supervisor.DeadStub(stub.pid, "ar_llm_engine", "killed by signal 9")]
        assert supervisor.reap(keep=other.pid) >= 1
        assert supervisor.proc_stat(stub.pid) is None
        assert watcher.dead() == [supervisor.DeadStub(stub.pid, "ar_llm_engine", "gone")]
        assert other.poll() is None, "reap leaves the kept child (and every running one) alone"
    finally:
        server.kill_group(stub.pid)  # sh and its sleep
        other.kill()
        for process in (stub, other):
            process.wait()


def test_stop_removes_the_regions_named_on_the_servers_command_line(shm_dir: Path):
    prefix = server.new_shm_prefix()
    assert prefix.startswith(f"gst-{os.getpid()}-") and prefix != server.new_shm_prefix()
    ours = [shm_dir / f"{prefix}{n}" for n in ("a", "b")]
    others = [shm_dir / f"{server.new_shm_prefix()}c", shm_dir / "triton_python_backend_shm_region_d"]
    for path in ours + others:
        path.write_bytes(b"x")
    process = subprocess.Popen(["true", f"{server.SHM_PREFIX_OPTION}{prefix}"], start_new_session=True)
    assert server.stop(process) == 2
    assert not any(p.exists() for p in ours) and all(p.exists() for p in others)


def test_stale_regions_are_those_of_gone_launchers_and_of_our_own_pid(shm_dir: Path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = os.getppid()  # the process that started pytest: alive, and not us
    names = {
        f"gst-{gone.pid}-0123abcd-1": False,
        f"gst-{gone.pid}-0123abcd-2": False,
        f"gst-{os.getpid()}-89abcdef-1": False,  # a restarted container's launcher has its predecessor's pid
        f"gst-{alive}-00000000-1": True,
        "gst-notapid-00000000-1": True,
        "triton_python_backend_shm_region_1": True,
    }
    for name in names:
        (shm_dir / name).write_bytes(b"x")
    assert server.remove_stale_shm() == 3
    assert {name: (shm_dir / name).exists() for name in names} == names


def test_entry_points_and_the_variant_of_each_model():
    assert supervisor.entry_points(("ar", "nar")) == {
        "granite_speech": "ar",
        "granite_speech_stream": "ar",
        "granite_speech_nar": "nar",
    }
    assert supervisor.entry_points(("nar",)) == {"granite_speech_nar": "nar"}
    for model, variant in (("ar_llm_engine", "ar"), ("ar_encode", "ar"), ("nar_head", "nar"), ("other", None)):
        assert supervisor.variant_of(model) == variant


def test_gauges_are_read_from_prometheus_text_by_model():
    text = (
        "# TYPE granite_speech_streams_in_flight gauge\n"
        'granite_speech_streams_in_flight{model="granite_speech_stream"} 2\n'
        'nv_inference_pending_request_count{model="granite_speech_stream",version="1"} 0\n'
        'nv_inference_pending_request_count{model="granite_speech",version="1"} 3\n'
    )
    assert supervisor.gauge(text, supervisor.STREAMS_IN_FLIGHT, "granite_speech_stream") == 2
    assert supervisor.gauge(text, supervisor.PENDING, "granite_speech") == 3
    assert supervisor.gauge(text, supervisor.PENDING, "granite_speech_stream") == 0
    assert supervisor.gauge(text, supervisor.STREAMS_IN_FLIGHT, "granite_speech") is None
