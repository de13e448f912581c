"""Start `tritonserver` from the nvidia-pytriton wheel (or any other build) on loopback ports.

The wheel ships the server binary, the Python backend and one stub per Python version. We build
a backend directory of our own in `build/` (links to the shared library and utilities, plus the
stub matching this interpreter) instead of writing into site-packages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 600.0


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
            f"--model-control-mode={self.model_control_mode}",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
        ]
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


def start(options: ServerOptions, log_path: Path) -> subprocess.Popen:
    """Start tritonserver in the background, logging to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    return subprocess.Popen(
        options.command(), stdout=log, stderr=subprocess.STDOUT, env=options.environment(), start_new_session=True
    )


def wait_ready(http_port: int, process: subprocess.Popen, log_path: Path, timeout: float = READY_TIMEOUT_S) -> None:
    """Block until /v2/health/ready answers 200; raise with the log's tail if the server dies."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{http_port}/v2/health/ready"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"tritonserver exited with code {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s; see {log_path}")


def stop(process: subprocess.Popen, timeout: float = 60.0) -> None:
    """Stop the server gracefully, then forcefully."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
