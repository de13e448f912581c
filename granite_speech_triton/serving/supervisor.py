"""Keep a tritonserver serving: restart it when a stage's process dies, drain it on SIGTERM.

`granite-speech-triton serve` runs tritonserver under a `Supervisor`:

- **A stage dies** (a Python backend stub exits: killed, out of memory, a crash in native code):
  Triton 2.51 neither restarts the stub nor reports the model unready; every later request that
  reaches the dead stub fails, and each such request (like every request in flight in it) keeps
  the dead instance alive for good: the model can no longer be unloaded, the zombie stub is never
  reaped, its shared memory stays, requests whose answer the stub held never end, and shutdown
  waits for Triton's exit timeout. Reloading the model through the model-control API brings a
  new instance up but cannot free the old one, so the supervisor restarts the server instead:
  it unloads the dead model and the entry points (new requests are refused at once; strict
  readiness turns false), gives the requests in flight of the pipelines that do not need the dead
  stage up to `drain_timeout_s` to finish, kills the server and its stubs, removes their shared
  memory, reaps the zombies and starts the server again.
- **The server itself exits**: its shared memory is removed and it is started again.
- **SIGTERM or SIGINT**: the entry points are unloaded, so new requests are refused at once
  (NOT_FOUND, "... has no available versions") while every request in flight (unary, streaming,
  long decodes) completes, for up to `drain_timeout_s`; then tritonserver is stopped and its
  shared memory removed. Drained, it gets QUIT_GRACE_S to finalize its models before SIGKILL
  (Triton 2.51 keeps running while a client holds a gRPC stream open, even an idle one; such a
  stream also keeps the streaming model from unloading, so the drain then lasts its full timeout);
  not drained, its exit timeout. A second signal ends the drain at once.

Unloading needs explicit model control: the supervised server loads every model at start and
restricts the model-repository API to a key made per start, so clients cannot load or unload.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import server
from .repository import ENSEMBLE_FOLDERS, ENSEMBLES, MODELS, STREAMING, STREAMS_IN_FLIGHT

POLL_S = 0.5  # how often the stubs, the server and the drain are checked on
STOP_TIMEOUT_S = 15  # tritonserver's exit timeout when supervised: requests were drained before
KILL_MARGIN_S = 10  # then SIGKILL, if it has not exited
QUIT_GRACE_S = 10  # a drained server gets this long to finalize its models, then SIGKILL
STUB_BINARY = "triton_python_backend_stub"
SERVING = ("READY", "UNLOADING")  # model states of an entry point that may still hold requests
PENDING = "nv_inference_pending_request_count"  # Triton's gauge of requests queued for a model
PR_SET_CHILD_SUBREAPER = 36  # prctl(2): orphaned descendants are re-parented to this process


@dataclass(frozen=True)
class DeadStub:
    pid: int
    model: str
    how: str  # "killed by signal 9", "exit code 1", "gone"


def entry_points(variants: Iterable[str]) -> dict[str, str]:
    """What clients call, per variant: {model: variant} (the ensembles and the streaming pipeline)."""
    points = {ENSEMBLES[v]: v for v in variants}
    points.update({STREAMING[v]: v for v in variants if v in STREAMING})
    return points


def variant_of(model: str) -> str | None:
    for variant, models in MODELS.items():
        if model in models or model in ENSEMBLE_FOLDERS[variant]:
            return variant
    return None


# --- processes ------------------------------------------------------------------------------------


def proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from its third field (state) on, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2 :].split()


def children(parent: int) -> dict[int, str]:
    """{pid: state} of the processes whose parent is `parent` (state "Z": exited, not yet reaped)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) and int(stat[1]) == parent:
            found[int(entry.name)] = stat[0]
    return found


def stub_model(pid: int) -> str | None:
    """The model a Python backend stub serves (its argv: stub, <repository>/<model>/1/model.py, ...)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    if len(argv) < 2 or not argv[0].decode(errors="replace").endswith(STUB_BINARY):
        return None
    return Path(argv[1].decode(errors="replace")).parent.parent.name


def how_it_ended(stat: list[str] | None) -> str:
    """A zombie's wait status (stat field 52) in words."""
    if stat is None or len(stat) < 50:
        return "gone"
    status = int(stat[49])
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


class StubWatcher:
    """The Python backend stubs of one tritonserver, and which of them have died."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.stubs: dict[int, str] = {}  # pid -> model

    def scan(self) -> None:
        """Note the stubs running now (call once the server is ready: every model is loaded)."""
        for pid, state in children(self.server_pid).items():
            if state != "Z" and (model := stub_model(pid)):
                self.stubs[pid] = model

    def dead(self) -> list[DeadStub]:
        found = []
        for pid, model in self.stubs.items():
            stat = proc_stat(pid)
            if stat is None or stat[0] == "Z" or int(stat[1]) != self.server_pid:
                found.append(DeadStub(pid, model, how_it_ended(stat)))
        return found


def become_subreaper() -> None:
    """Orphaned stubs of a killed server become our children, so that we reap them (`reap`)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap(keep: int | None = None) -> int:
    """Reap our exited children except `keep` (the server, which its Popen waits for)."""
    reaped = 0
    for pid, state in children(os.getpid()).items():
        if state == "Z" and pid != keep:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
                reaped += 1
    return reaped


# --- Triton's model-repository API -----------------------------------------------------------------


def gauge(metrics: str, name: str, model: str) -> float | None:
    """The value of `name` for `model` in Prometheus text, or None."""
    label = f'model="{model}"'
    for line in metrics.splitlines():
        if line.startswith(f"{name}{{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    return None


@dataclass(frozen=True)
class ModelControl:
    """Unload models and read their states, with the key the supervised server was started with."""

    http_port: int
    admin_key: str
    metrics_port: int
    timeout_s: float = 30.0

    def streams_idle(self, model: str) -> bool:
        """Whether the streaming entry `model` serves no request and has none queued (its gauges)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=self.timeout_s) as r:
            metrics = r.read().decode()
        return gauge(metrics, STREAMS_IN_FLIGHT, model) == 0 and not gauge(metrics, PENDING, model)

    def _post(self, path: str) -> bytes:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/v2/repository{path}",
            method="POST",
            headers={server.ADMIN_HEADER: self.admin_key},
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return response.read()

    def states(self) -> dict[str, str]:
        """{model: state} (READY, LOADING, UNLOADING, UNAVAILABLE) of every model in the repositories."""
        return {m["name"]: m.get("state", "") for m in json.loads(self._post("/index"))}

    def unload(self, model: str) -> None:
        """Start unloading `model` (Triton finishes once its requests in flight have ended)."""
        self._post(f"/models/{model}/unload")


# --- the supervisor ---------------------------------------------------------------------------------


@dataclass
class Supervisor:
    """Runs tritonserver until SIGTERM/SIGINT, restarting it whenever it or one of its stubs dies."""

    options: server.ServerOptions
    log_path: Path
    variants: tuple[str, ...]
    drain_timeout_s: float
    report: server.Report = server.say
    echo_log: bool = False  # tritonserver's log on stdout too (containers)
    stopping: threading.Event = field(default_factory=threading.Event)  # drain and stop
    hurry: threading.Event = field(default_factory=threading.Event)  # a second signal: stop now

    def __post_init__(self) -> None:
        self.options = dataclasses.replace(
            self.options,
            model_control_mode="explicit",
            load_models=["*"],
            admin_key=secrets.token_urlsafe(24),
            exit_timeout_s=STOP_TIMEOUT_S,
        )
        self.control = ModelControl(self.options.http_port, self.options.admin_key, self.options.metrics_port)

    def run(self) -> int:
        """Serve until stopped (0); 1 if the server fails to start."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        become_subreaper()
        if removed := server.remove_stale_shm():
            self.report(f"removed {removed} shared-memory regions left by a server that is gone")
        failed_at = None
        while True:
            process, progress = self._start(append=failed_at is not None)
            try:
                ready = server.wait_ready(
                    self.options.http_port, process, self.log_path, progress=progress, interrupted=self.stopping
                )
            except server.ServerStartError as exc:
                self._ended(process, graceful=False)
                self.report(f"error: {exc}")
                return 1
            if not ready:  # stopped while starting: nothing in flight yet
                self._shutdown(process, drain=False)
                return 0
            if failed_at is not None:
                self.report(f"recovered: serving again {time.monotonic() - failed_at:.1f} s after the failure")
            self.report("serving; SIGTERM or Ctrl-C drains the requests in flight, then stops")
            failed_at = self._serve(process, progress)
            if failed_at is None:
                self._shutdown(process, drain=True)
                return 0
            if self.stopping.is_set():  # asked to stop while recovering: the server has ended already
                return 0

    def _on_signal(self, signum: int, _frame) -> None:
        (self.hurry if self.stopping.is_set() else self.stopping).set()

    def _start(self, append: bool) -> tuple[subprocess.Popen, server.StartupProgress]:
        offset = self.log_path.stat().st_size if append and self.log_path.exists() else 0
        self.options = dataclasses.replace(self.options, shm_prefix=server.new_shm_prefix())  # regions of its own
        process = server.start(self.options, self.log_path, append=append)
        ports = ", ".join(f"{name} {port}" for name, port in self.options.ports().items())
        self.report(f"starting tritonserver on {self.options.address} ({ports}; log: {self.log_path})")
        echo = (lambda line: print(line, flush=True)) if self.echo_log else None
        return process, server.StartupProgress(self.log_path, self.report, offset=offset, echo=echo)

    def _serve(self, process: subprocess.Popen, progress: server.StartupProgress) -> float | None:
        """Watch until asked to stop (None) or until the server must restart (when it failed)."""
        watcher = StubWatcher(process.pid)
        watcher.scan()
        while not self.stopping.wait(POLL_S):
            progress.poll()
            reap(keep=process.pid)
            if (code := process.poll()) is not None:
                failed_at = time.monotonic()
                self.report(f"tritonserver exited with code {code}; starting it again")
                self._ended(process, graceful=False)
                return failed_at
            if dead := watcher.dead():
                failed_at = time.monotonic()
                self._restart_after(process, dead)
                return failed_at
        return None

    def _restart_after(self, process: subprocess.Popen, dead: list[DeadStub]) -> None:
        for stub in dead:
            self.report(f"stage {stub.model} died (stub pid {stub.pid}, {stub.how}); restarting tritonserver")
        broken = {variant_of(stub.model) for stub in dead}
        points = entry_points(self.variants)
        healthy = [model for model, variant in points.items() if variant not in broken]
        self._drain([*(stub.model for stub in dead), *points], healthy)
        self._ended(process, graceful=False)

    def _shutdown(self, process: subprocess.Popen, drain: bool) -> None:
        """Drain (when serving), then stop the server: it gets QUIT_GRACE_S to finalize its models
        when nothing is in flight any more, its exit timeout and our margin otherwise."""
        points = list(entry_points(self.variants))
        drained = drain and self._drain(points, points)
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(QUIT_GRACE_S if drained else STOP_TIMEOUT_S + KILL_MARGIN_S)
        if process.poll() is None:  # drained, it is held by a gRPC stream that a client keeps open
            self.report("tritonserver did not exit in time: killing it")
        self._ended(process, graceful=False)
        self.report(f"tritonserver stopped (exit code {process.returncode})")

    def _drain(self, unload: list[str], wait_for: list[str]) -> bool:
        """Unload `unload` (refusing new requests), then wait until `wait_for` have no request left;
        False if some still had requests in flight at the drain timeout."""
        started = time.monotonic()
        try:
            for model in unload:
                try:
                    self.control.unload(model)
                except urllib.error.HTTPError as exc:  # answered, but refused: say so, go on
                    self.report(f"could not unload {model}: {exc.read().decode(errors='replace')}")
            pending = self._wait_unloaded(wait_for, started + self.drain_timeout_s)
        except OSError as exc:  # the server is not answering: nothing more to wait for
            self.report(f"drain stopped: tritonserver does not answer ({exc})")
            return False
        seconds = time.monotonic() - started
        if pending:
            self.report(f"drain timed out after {seconds:.1f} s; requests still in flight in {', '.join(pending)}")
        elif wait_for:
            self.report(f"drained {', '.join(wait_for)} in {seconds:.1f} s")
        return not pending

    def _wait_unloaded(self, models: list[str], deadline: float) -> list[str]:
        """Wait until none of `models` serves any more; returns those still serving at the deadline.

        A streaming entry counts as drained once its gauges read idle twice in a row: Triton 2.51
        never finishes unloading it while a client holds a stream open or has cancelled one."""
        idle_before: set[str] = set()
        while True:
            states = self.control.states()
            idle = {m for m in models if m in STREAMING.values() and self.control.streams_idle(m)}
            pending = [m for m in models if states.get(m) in SERVING and not (m in idle and m in idle_before)]
            idle_before = idle
            if not pending or time.monotonic() >= deadline or self.hurry.wait(POLL_S):
                return pending

    def _ended(self, process: subprocess.Popen, graceful: bool) -> None:
        """Stop (or kill) the server, remove its shared memory, reap the stubs it left."""
        removed = server.stop(process, timeout=STOP_TIMEOUT_S + KILL_MARGIN_S, graceful=graceful)
        reap(keep=process.pid)
        if removed:
            self.report(f"removed {removed} shared-memory regions of the stopped server")
