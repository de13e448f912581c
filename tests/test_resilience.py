"""The launcher (`granite-speech-triton serve`, serving/supervisor.py) on a real tritonserver: the
deep health check, a model-repository API closed to clients, a stage killed under load (only the
requests of the recovery window fail; every request after it is exact), and SIGTERM with requests
of every kind in flight (unary AR and NAR, streaming, word timestamps: all complete, exactly; new
ones are refused at once; nothing is left behind).

One launcher serves both variants for the whole module, since every start costs minutes here; the
tests run in file order and the last one stops it. No timing is asserted: the recovery window and
the drain are printed (`pytest -s`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from audio_samples import synthetic
from conftest import TEST_SETTINGS
from granite_speech_client import SAMPLE_RATE, GraniteSpeechClient, GraniteSpeechError, ModelNotReadyError
from tritonclient.utils import InferenceServerException

from granite_speech_triton.serving import server, supervisor
from granite_speech_triton.serving.repository import MODELS

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {**TEST_SETTINGS, "max_new_tokens_limit": 512, "drain_timeout_s": 600}
NEW_TOKENS = 32  # the load's requests
LONG_TOKENS = 400  # the requests in flight at SIGTERM: long decodes
KINDS = ("ar", "nar", "stream")
# in flight at SIGTERM, besides KINDS: AR with word timestamps (the ensemble's ctc aligner step runs)
DRAIN_KINDS = (*KINDS, "words")
WAIT_S = 900.0  # generous bounds on waits for the server (a start takes minutes on a loaded CPU)


@dataclass
class Launcher:
    process: subprocess.Popen
    output: Path
    http_url: str
    grpc_url: str

    def lines(self) -> list[str]:
        return self.output.read_text().splitlines()

    def wait_for(self, text: str) -> float:
        """Block until the launcher prints a line containing `text`; the time it was seen."""
        deadline = time.monotonic() + WAIT_S
        while not any(text in line for line in self.lines()):
            assert self.process.poll() is None, f"the launcher exited:\n{self.output.read_text()}"
            assert time.monotonic() < deadline, f"no {text!r} after {WAIT_S} s:\n{self.output.read_text()}"
            time.sleep(0.2)
        return time.monotonic()

    def triton_pid(self) -> int:
        (pid,) = [p for p in supervisor.children(self.process.pid) if b"tritonserver" in cmdline(p)[0]]
        return pid


def cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


@pytest.fixture(scope="module")
def launcher(
    tmp_path_factory: pytest.TempPathFactory, tiny_ar_checkpoint: Path, tiny_nar_checkpoint: Path
) -> Iterator[Launcher]:
    out = tmp_path_factory.mktemp("launcher")
    ports = [server.free_port() for _ in range(3)]
    settings = {**SETTINGS, "ar_checkpoint": tiny_ar_checkpoint, "nar_checkpoint": tiny_nar_checkpoint}
    argv = [sys.executable, "-m", "granite_speech_triton.cli", "serve", "--variants", "ar,nar", "--out", out]
    argv += [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    argv += [f"--{name}-port={port}" for name, port in zip(("http", "grpc", "metrics"), ports, strict=True)]
    output = out / "launcher.out"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [str(a) for a in argv], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = Launcher(process, output, f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}")
    try:
        running.wait_for("serving;")
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                server.kill_group(process.pid)
                process.wait()


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    return [synthetic(1.5 + 1.0 * i, 40 + i) for i in range(3)]


def request(client: GraniteSpeechClient, kind: str, audio: np.ndarray, new_tokens: int) -> tuple[int, ...]:
    """One request of `kind` (AR unary, NAR, AR streaming or AR with word timestamps); its token ids."""
    if kind == "stream":
        *_, last = client.transcribe_stream(audio, sample_rate=SAMPLE_RATE, max_new_tokens=new_tokens)
        assert last.final
        return last.token_ids
    if kind == "words":
        result = client.transcribe(audio, sample_rate=SAMPLE_RATE, max_new_tokens=new_tokens, timestamps=True)
        assert result.token_ids == tuple(t for w in result.words for t in w.token_ids)  # every token aligned
        return result.token_ids
    tokens = new_tokens if kind == "ar" else None
    return client.transcribe(audio, sample_rate=SAMPLE_RATE, variant=kind, max_new_tokens=tokens).token_ids


@pytest.fixture(scope="module")
def solo(launcher: Launcher, audios: list[np.ndarray]) -> dict[tuple[str, int, int], tuple[int, ...]]:
    """(kind, audio index, new tokens) -> token ids, each request alone on the healthy server."""
    answers = {}
    with GraniteSpeechClient(launcher.grpc_url, retries=0) as client:
        for index, audio in enumerate(audios):
            answers[("nar", index, NEW_TOKENS)] = answers[("nar", index, LONG_TOKENS)] = request(
                client, "nar", audio, 0
            )
            for kind in ("ar", "stream"):
                for tokens in (NEW_TOKENS, LONG_TOKENS):
                    answers[(kind, index, tokens)] = request(client, kind, audio, tokens)
    assert all(answers[("ar", *key)] == answers[("stream", *key)] for kind, *key in answers if kind == "ar")
    return answers


def deep_health(launcher: Launcher) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "granite_speech_client", "health", "--deep", "--server", launcher.grpc_url]
    return subprocess.run([*argv, "--timeout", "120", "--retries", "0"], capture_output=True, text=True, timeout=600)


def test_deep_health_check_and_a_model_repository_api_closed_to_clients(launcher: Launcher, solo):
    done = deep_health(launcher)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"server {launcher.grpc_url}: live yes, ready yes"
    assert [line.split(":")[0] for line in lines[1:]] == [
        "granite_speech (ar)",
        "granite_speech_nar (nar)",
        "granite_speech_stream (ar, streaming)",
    ]
    assert all(": ready, answered in " in line for line in lines[1:]), lines
    unload = urllib.request.Request(f"http://{launcher.http_url}/v2/repository/models/nar_head/unload", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(unload, timeout=60)
    assert "restricted" in refused.value.read().decode()
    client = grpcclient.InferenceServerClient(launcher.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.unload_model("nar_head")
    client.close()
    assert deep_health(launcher).returncode == 0, "nothing was unloaded"


def test_a_short_soak_reports_failures_and_the_memory_of_every_process(launcher: Launcher, tmp_path: Path):
    """`loadtest.soak`, shortened: both ensembles, bad requests mixed in, every process's memory."""
    out = tmp_path / "soak"
    command = [
        sys.executable, "-m", "loadtest.soak", "--server", launcher.http_url, "--duration", "40s", "--warmup", "15s",
        "--sample-every", "5", "--users", "2", "--bad-every", "3", "--max-new-tokens", str(NEW_TOKENS),
        "--count", "4", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "soak.json").read_text())
    load = {row["ensemble"]: row for row in result["load"]}
    assert set(load) == {"granite_speech", "granite_speech_nar", "invalid_requests", "all"}
    assert all(int(row["failures"]) == 0 and int(row["requests"]) > 0 for row in load.values()), load
    stubs = {f"{model} stub" for variant in ("ar", "nar") for model in MODELS[variant]}
    assert {row["process"] for row in result["memory"]} == {"tritonserver", "total", *stubs}
    assert all(row[point] > 0 for row in result["memory"] for point in ("start", "warmup", "end"))
    assert not result["restarted"] and len((out / "rss.csv").read_text().splitlines()) >= 4
    assert "failed requests: 0; growth after warm-up:" in done.stdout


@dataclass
class Outcome:
    kind: str
    index: int
    sent: float
    ended: float
    tokens: tuple[int, ...] | None = None
    error: str = ""


@dataclass
class Load:
    """Workers sending AR, NAR and streaming requests one after another until stopped."""

    url: str
    audios: list[np.ndarray]
    outcomes: list[Outcome] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self, worker: int) -> None:
        with GraniteSpeechClient(self.url, retries=0, timeout_s=300) as client:
            n = worker
            while not self.stopping.is_set():
                kind, index = KINDS[n % len(KINDS)], n % len(self.audios)
                n += 1
                sent = time.monotonic()
                try:
                    tokens = request(client, kind, self.audios[index], NEW_TOKENS)
                    self.outcomes.append(Outcome(kind, index, sent, time.monotonic(), tokens))
                except GraniteSpeechError as exc:
                    self.outcomes.append(Outcome(kind, index, sent, time.monotonic(), error=str(exc)))
                    self.stopping.wait(0.2)  # a refused connection fails at once: do not spin

    def served(self, kind: str, after: float) -> int:
        return sum(o.tokens is not None and o.sent > after and o.kind == kind for o in self.outcomes)

    def wait_served(self, count: int, after: float = 0.0) -> None:
        """Until every kind has `count` answers to requests sent after `after`."""
        deadline = time.monotonic() + WAIT_S
        while (
            min(sum(o.tokens is not None and o.sent > after and o.kind == k for o in self.outcomes) for k in KINDS)
            < count
        ):
            assert time.monotonic() < deadline, "the server stopped answering"
            time.sleep(0.2)


def lingering(pids) -> list[int]:
    """Those of `pids` still in the process table (zombies included) after up to WAIT_S: a killed
    stub leaves it only once reaped, which on a busy machine can come a moment after its server
    (or the launcher) has exited."""
    deadline = time.monotonic() + WAIT_S
    while (left := [pid for pid in pids if supervisor.proc_stat(pid) is not None]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def stubs_of(triton_pid: int) -> dict[int, str]:
    watcher = supervisor.StubWatcher(triton_pid)
    watcher.scan()
    return watcher.stubs


def test_a_dead_stage_is_healed_and_only_the_recovery_window_fails(launcher: Launcher, audios, solo):
    triton = launcher.triton_pid()
    prefix = server.shm_prefix_of([arg.decode() for arg in cmdline(triton)])
    stubs = stubs_of(triton)
    assert prefix and set(stubs.values()) == {*MODELS["ar"], *MODELS["nar"]}, stubs  # every Python model
    load = Load(launcher.grpc_url, audios)
    workers = [threading.Thread(target=load.run, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    try:
        load.wait_served(2)
        (engine,) = [pid for pid, model in stubs.items() if model == "ar_llm_engine"]
        killed_at = time.monotonic()
        os.kill(engine, signal.SIGKILL)
        launcher.wait_for("stage ar_llm_engine died")
        assert deep_health(launcher).returncode != 0, "not healthy while a stage is dead or restarting"
        recovered_at = launcher.wait_for("recovered:")
        load.wait_served(3, after=recovered_at)
    finally:
        load.stopping.set()
        for worker in workers:
            worker.join()
    failed = [o for o in load.outcomes if o.error]
    served = [o for o in load.outcomes if o.tokens is not None]
    assert all(o.tokens == solo[(o.kind, o.index, NEW_TOKENS)] for o in served), "an answer differs from solo"
    assert failed and all(killed_at <= o.ended and o.sent < recovered_at for o in failed), [
        (o.kind, o.sent - killed_at, o.ended - killed_at, o.error) for o in failed if o.sent >= recovered_at
    ]
    print(
        f"\nrecovery window {recovered_at - killed_at:.1f} s (kill to serving again): {len(failed)} requests failed,"
        f" {sum(o.sent >= recovered_at for o in served)} served exactly after it, {len(served)} served in all"
    )
    # nothing of the killed server is left: process, stubs (zombies included), shared memory
    assert supervisor.proc_stat(triton) is None
    assert lingering(stubs) == []
    assert not list(server.SHM_DIR.glob(f"{prefix}*"))
    assert launcher.triton_pid() != triton and len(stubs_of(launcher.triton_pid())) == len(stubs)
    assert deep_health(launcher).returncode == 0


@dataclass
class LongRequests:
    """Long decodes of every kind, one per audio, each in its own thread."""

    client: GraniteSpeechClient
    audios: list[np.ndarray]
    results: dict[tuple[str, int], tuple[int, ...] | str] = field(default_factory=dict)
    ended_at: dict[tuple[str, int], float] = field(default_factory=dict)
    streaming: dict[tuple[str, int], threading.Event] = field(default_factory=dict)  # set at a first partial

    def keys(self) -> list[tuple[str, int]]:
        return [(kind, index) for kind in DRAIN_KINDS for index in range(len(self.audios))]

    def start(self) -> list[threading.Thread]:
        self.streaming |= {key: threading.Event() for key in self.keys() if key[0] == "stream"}
        threads = [threading.Thread(target=self.run, args=key) for key in self.keys()]
        for thread in threads:
            thread.start()
        return threads

    def run(self, kind: str, index: int) -> None:
        audio = self.audios[index]
        try:
            if kind == "stream":
                for update in self.client.transcribe_stream(audio, sample_rate=SAMPLE_RATE, max_new_tokens=LONG_TOKENS):
                    self.streaming[(kind, index)].set()
                    self.results[(kind, index)] = update.token_ids
            else:
                self.results[(kind, index)] = request(self.client, kind, audio, LONG_TOKENS)
        except GraniteSpeechError as exc:
            self.results[(kind, index)] = str(exc)
        self.ended_at[(kind, index)] = time.monotonic()


def first_refusal(client: GraniteSpeechClient, audio: np.ndarray) -> tuple[float, str]:
    """New requests until one is refused (served until the entry points are unloaded): when, and why."""
    while True:
        try:
            request(client, "ar", audio, NEW_TOKENS)
        except ModelNotReadyError as exc:
            return time.monotonic(), str(exc)


def test_sigterm_drains_requests_in_flight_then_stops_cleanly(launcher: Launcher, audios, solo):
    """Last: it stops the launcher."""
    triton = launcher.triton_pid()
    stubs = stubs_of(triton)
    with GraniteSpeechClient(launcher.grpc_url, retries=0, timeout_s=600) as client:
        cancelled = client.transcribe_stream(audios[1], sample_rate=SAMPLE_RATE, max_new_tokens=LONG_TOKENS)
        next(cancelled)
        cancelled.close()  # a client gone mid-stream must not hold the drain up
        long = LongRequests(client, audios)
        threads = long.start()
        assert all(event.wait(WAIT_S) for event in long.streaming.values()), "the streams started"
        sigterm_at = time.monotonic()
        launcher.process.send_signal(signal.SIGTERM)
        refused_at, refusal = first_refusal(client, audios[0])
        for thread in threads:
            thread.join()
    assert launcher.process.wait(timeout=WAIT_S) == 0

    keys = long.keys()
    assert long.results == {(kind, i): solo[("ar" if kind == "words" else kind, i, LONG_TOKENS)] for kind, i in keys}
    in_flight = [key for key in keys if long.ended_at[key] > sigterm_at]
    assert in_flight, "the streams had only started when SIGTERM came"
    last_end = max(long.ended_at[key] for key in in_flight)
    assert "has no available versions" in refusal and refused_at < last_end, "refused while others drained"
    output = launcher.output.read_text()
    assert "drained granite_speech, granite_speech_nar, granite_speech_stream in" in output
    assert "timed out" not in output and "tritonserver stopped" in output
    assert supervisor.proc_stat(triton) is None
    assert lingering(stubs) == []
    assert not list(server.SHM_DIR.glob(f"gst-{launcher.process.pid}-*"))
    print(
        f"\ndrain: {len(in_flight)} requests in flight at SIGTERM all completed exactly, the last"
        f" {last_end - sigterm_at:.1f} s after it; a new request was refused {refused_at - sigterm_at:.2f} s after it"
    )
