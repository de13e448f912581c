"""Start `tritonserver` from the nvidia-pytriton wheel (or any other build) on loopback ports.

The wheel ships the server binary, the Python backend and one stub per Python version. We build
a backend directory of our own in `build/` (links to the shared library and utilities, plus the
stub matching this interpreter) instead of writing into site-packages.

Everything that starts a server (serve, demo, bench, the tests) goes through this module, so that
they share its checks and messages: the ports are checked before anything loads (a busy port is
one line naming it), and the start is reported model by model from the server's log (READY with
its seconds, or the first line of its error), while the log file keeps every line.

Each server's Python backend shared-memory regions in /dev/shm carry a prefix of their own
(`gst-<pid of the starting process>-<token>-`), so that `stop` removes them once the server has
exited, however it ended (a crashed server leaves them behind), and `remove_stale_shm` removes the
ones a killed launcher left.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 600.0
POLL_S = 0.5  # how often a start is checked on (log, process, readiness)
# Options for a host without an NVIDIA GPU. GPU metrics need NVML and DCGM, the pinned host memory
# pool needs the CUDA driver: without them the server logs errors about both at every start.
CPU_HOST_OPTIONS = ("--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0")
PORTS_HINT = (
    "choose free ones with HTTP_PORT=, GRPC_PORT=, METRICS_PORT= (make) or --http-port, --grpc-port, --metrics-port"
)

Report = Callable[[str], None]  # receives one line for a person at a terminal
SHM_DIR = Path("/dev/shm")
SHM_PREFIX_START = "gst-"  # our regions: gst-<pid>-<token>-<uuid the Python backend adds>
SHM_PREFIX_OPTION = "--backend-config=python,shm-region-prefix-name="
# Header that unlocks the model-repository API (load, unload, index) when `admin_key` is set; over
# gRPC, Triton expects it as "triton-grpc-protocol-" + this name.
ADMIN_HEADER = "gst-admin-key"


def say(line: str) -> None:
    """A Report to the terminal, flushed at once (the next line may be a minute away)."""
    print(line, flush=True)


class PortError(RuntimeError):
    """A port the server needs is taken (or cannot be bound): the message is one line naming it."""


class ServerStartError(RuntimeError):
    """The server exited while starting: the message names what failed and where the log is."""


def pytriton_root() -> Path:
    """The folder of the tritonserver bundled in the nvidia-pytriton wheel."""
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def prepare_backend_dir(build_dir: Path) -> Path:
    """build_dir/backends/python with the wheel's backend and this Python's stub; returns backends/."""
    root = pytriton_root()
    python_dir = build_dir / "backends" / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        link = python_dir / name
        if not link.exists():
            link.symlink_to(root / "backends" / "python" / name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise RuntimeError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    target = python_dir / "triton_python_backend_stub"
    if not target.is_file() or target.stat().st_size != stub.stat().st_size:
        staged = target.with_suffix(f".{os.getpid()}")
        shutil.copy2(stub, staged)
        os.replace(staged, target)  # atomic: a running server may be executing the old copy
    return python_dir.parent


def new_shm_prefix() -> str:
    """A prefix no other server uses: this process's pid and a random token."""
    return f"{SHM_PREFIX_START}{os.getpid()}-{secrets.token_hex(4)}-"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU: its driver creates /dev/nvidia0, /dev/nvidia1, ..."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


def bind_error(address: str, port: int) -> OSError | None:
    """Why a server could not listen on address:port now (None: it could).

    SO_REUSEADDR as servers set it: a port that only has connections of a stopped server waiting
    out TIME_WAIT is free; one that something listens on (on this address or on all) is not.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            return exc
    return None


def check_ports(address: str, ports: Mapping[str, int]) -> None:
    """Raise PortError (one line) unless every port of {name: port} is distinct and free on `address`."""
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise PortError(f"the {seen[port]} and {name} ports are both {port}; {PORTS_HINT}")
        seen[port] = name
        error = bind_error(address, port)
        if error is not None and error.errno == errno.EADDRINUSE:
            raise PortError(f"{name} port {port} on {address} is already in use (another server?); {PORTS_HINT}")
        if error is not None:
            raise PortError(f"cannot listen on {name} port {port} on {address}: {error.strerror}; {PORTS_HINT}")


@dataclass
class ServerOptions:
    """How to start one tritonserver process."""

    repositories: list[Path]
    build_dir: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "127.0.0.1"  # HTTP, gRPC and metrics bind address (0.0.0.0 in a container)
    model_control_mode: str = "none"  # none | explicit (explicit loads `load_models`)
    load_models: list[str] = field(default_factory=list)
    log_verbose: int = 0
    tritonserver: Path | None = None  # default: the nvidia-pytriton binary
    backend_directory: Path | None = None  # default: built from the nvidia-pytriton wheel
    backend_config: list[str] = field(default_factory=list)  # e.g. python,shm-default-byte-size=67108864
    extra_args: list[str] = field(default_factory=list)  # other tritonserver options (--cuda-memory-pool-byte-size)
    gpu: bool | None = None  # None: detect; False adds CPU_HOST_OPTIONS
    admin_key: str = ""  # set: load/unload/index over HTTP and gRPC need it in ADMIN_HEADER
    shm_prefix: str = field(default_factory=new_shm_prefix)  # this server's /dev/shm regions
    exit_timeout_s: int = 30  # how long a stopping tritonserver waits for requests in flight

    def ports(self) -> dict[str, int]:
        return {"HTTP": self.http_port, "gRPC": self.grpc_port, "metrics": self.metrics_port}

    def command(self) -> list[str]:
        binary = self.tritonserver or pytriton_root() / "bin" / "tritonserver"
        backends = self.backend_directory or prepare_backend_dir(self.build_dir)
        cmd = [str(binary), f"--backend-directory={backends}"]
        cmd += [f"--model-repository={repo}" for repo in self.repositories]
        cmd += [
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--metrics-address={self.address}",
            f"--model-control-mode={self.model_control_mode}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
        ]
        if not (gpu_present() if self.gpu is None else self.gpu):
            cmd += CPU_HOST_OPTIONS
        if self.admin_key:
            restricted = f"model-repository:{ADMIN_HEADER}={self.admin_key}"
            cmd += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        cmd += [f"{SHM_PREFIX_OPTION}{self.shm_prefix}"]
        cmd += [f"--backend-config={value}" for value in self.backend_config]
        cmd += [f"--load-model={name}" for name in self.load_models]
        cmd += self.extra_args
        return cmd

    def environment(self) -> dict[str, str]:
        """The server's environment: this virtual environment first, then the stub's libraries.

        The Python backend stub's interpreter finds its site-packages through the `python3` first
        on PATH, so this interpreter's folder goes first (models import torch and this package
        from the same venv as the caller, activated or not). The stub links against
        `libpython3.X.so`; the one of this interpreter (not another patch release installed
        system-wide) must win, or compiled stdlib modules fail to import. The wheel's bundled
        libraries come next.
        """
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p)
        if sys.prefix != sys.base_prefix:
            env["VIRTUAL_ENV"] = sys.prefix
        if self.tritonserver is not None:
            return env  # another build (the NGC image) brings its own libraries and stub
        libpython_dir = sysconfig.get_config_var("LIBDIR") or ""
        bundled = str(pytriton_root().parent.parent / "nvidia_pytriton.libs")
        paths = (libpython_dir, bundled, env.get("LD_LIBRARY_PATH", ""))
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
        return env


def start(options: ServerOptions, log_path: Path, append: bool = False) -> subprocess.Popen:
    """Start tritonserver in the background, logging to `log_path` (after what it holds, with
    `append`); raises PortError first if a port is taken."""
    check_ports(options.address, options.ports())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab" if append else "wb") as log:
        return subprocess.Popen(
            options.command(), stdout=log, stderr=subprocess.STDOUT, env=options.environment(), start_new_session=True
        )


# Triton's log lines for a model's load (glog prefix, then the quoted message, newlines escaped as \n).
LOADED = re.compile(r"\] \"successfully loaded '(?P<model>[^']+)'\"")
FAILED = re.compile(r"\] \"failed to load '(?P<model>[^']+)' version \d+: (?P<error>.*)\"$")
# The last endpoint Triton starts (after every model loaded; gRPC, then HTTP, then metrics): from
# then on it listens on all its ports. A port taken meanwhile ends the server before this line.
ENDPOINTS_STARTED = re.compile(r"\] \"Started Metrics Service at ")
ERROR = re.compile(r"^(?:E\d{4} [\d:.]+ +\d+ [^\]]+\] \"(?P<message>.*)\"|error: (?P<fatal>.*))$")


@dataclass
class StartupProgress:
    """Follows a starting server's log and reports each model as it becomes READY or fails to load."""

    log_path: Path
    report: Report
    started: float = field(default_factory=time.monotonic)
    ready: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # model -> first line of its error
    last_error: str = ""  # the log's latest error line (the cause when no model failed)
    listening: bool = False  # this server listens on its ports (not another one started beside it)
    offset: int = 0  # where this server's lines start in the log (a restart appends to it)
    echo: Report | None = None  # receives every line of the log too (a container's stdout)

    def poll(self) -> None:
        """Read the complete lines the log gained since the last call."""
        with self.log_path.open("rb") as log:
            log.seek(self.offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            if self.echo is not None:
                self.echo(line)
            self.line(line)

    def line(self, line: str) -> None:
        seconds = time.monotonic() - self.started
        if loaded := LOADED.search(line):
            self.ready.append(loaded["model"])
            self.report(f"  {loaded['model']:<24} READY   {seconds:6.1f} s")
        elif failed := FAILED.search(line):
            first = failed["error"].split("\\n")[0].strip()
            self.failed[failed["model"]] = first
            self.report(f"  {failed['model']:<24} FAILED  {seconds:6.1f} s: {first} (log: {self.log_path})")
        self.listening = self.listening or ENDPOINTS_STARTED.search(line) is not None
        if error := ERROR.match(line):
            self.last_error = (error["message"] or error["fatal"]).split("\\n")[0].strip()

    def failure(self, exit_code: int) -> ServerStartError:
        """What to tell a person when the server exited before it was ready."""
        if self.failed:
            cause = f"{len(self.failed)} model(s) failed to load: {', '.join(self.failed)}"
        else:
            cause = self.last_error or "no error in its log"
        return ServerStartError(f"tritonserver exited with code {exit_code}: {cause}; log: {self.log_path}")

    def done(self) -> None:
        self.report(f"server ready: {len(self.ready)} models in {time.monotonic() - self.started:.1f} s")


def is_ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_ready(
    http_port: int,
    process: subprocess.Popen,
    log_path: Path,
    timeout: float = READY_TIMEOUT_S,
    report: Report | None = None,
    progress: StartupProgress | None = None,
    interrupted: threading.Event | None = None,
) -> bool:
    """Block until /v2/health/ready answers 200 (True) or `interrupted` is set (False), reporting
    each model's load to `report` (if given) or through `progress`.

    Raises ServerStartError (naming the models that failed and the log) if the server exits first.
    """
    progress = progress or StartupProgress(log_path, report or (lambda _line: None))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exit_code = process.poll()
        progress.poll()
        if exit_code is not None:
            raise progress.failure(exit_code)
        if progress.listening and is_ready(http_port):
            progress.done()
            return True
        if interrupted is not None and interrupted.wait(POLL_S):
            return False
        if interrupted is None:
            time.sleep(POLL_S)
    raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s; see {log_path}")


@contextlib.contextmanager
def running(options: ServerOptions, log_path: Path, report: Report = say) -> Iterator[subprocess.Popen]:
    """Start the server, report its start, yield the process once it is ready, stop it on exit."""
    ports = ", ".join(f"{name} {port}" for name, port in options.ports().items())
    process = start(options, log_path)
    report(f"starting tritonserver on {options.address} ({ports}; log: {log_path})")
    try:
        wait_ready(options.http_port, process, log_path, report=report)
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen, timeout: float = 60.0, graceful: bool = True) -> int:
    """Stop the server (SIGTERM, then SIGKILL to it and its stubs after `timeout`; at once unless
    `graceful`), then remove its shared-memory regions; returns how many were left to remove."""
    if graceful and process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    if process.poll() is None:
        kill_group(process.pid)
        process.wait()
    kill_group(process.pid)  # stubs a server that died left behind (they hold memory, GPU memory too)
    return remove_shm(shm_prefix_of(process.args))


def kill_group(pid: int) -> None:
    """SIGKILL the process group of a server started by `start` (the server and its stubs)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def shm_prefix_of(command: list[str]) -> str:
    """The shared-memory prefix a tritonserver command line names ("" if none)."""
    return next((arg.removeprefix(SHM_PREFIX_OPTION) for arg in command if arg.startswith(SHM_PREFIX_OPTION)), "")


def remove_shm(prefix: str) -> int:
    """Remove the /dev/shm regions named `prefix`*: those of a server that has exited."""
    if not prefix.startswith(SHM_PREFIX_START):
        return 0  # never anything but our own regions
    removed = 0
    for path in SHM_DIR.glob(f"{prefix}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def remove_stale_shm() -> int:
    """Remove the regions of servers whose starting process is gone (a killed launcher's).

    Call it before this process starts a server: in a fresh container a restarted launcher often
    has its predecessor's pid, so regions carrying this process's pid are stale too.
    """
    stale = set()
    for path in SHM_DIR.glob(f"{SHM_PREFIX_START}*"):
        pid = path.name.removeprefix(SHM_PREFIX_START).split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            stale.add(path.name[: len(SHM_PREFIX_START) + len(pid) + 10])  # gst-<pid>-<8 hex>-
    return sum(remove_shm(prefix) for prefix in stale)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
