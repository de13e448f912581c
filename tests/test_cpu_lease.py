"""The CPU lease between stub processes: one holder at a time, and a waiting process gets its turn."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from granite_speech_triton.serving.cpu_lease import CpuLease, cpu_lease

HOLD_S = 0.005


def hold_repeatedly(path: Path, log: Path, name: str, times: int) -> None:
    """Take the lease `times` times, writing `name+` on entry and `name-` on exit."""
    lease = CpuLease(path)
    for _ in range(times):
        with lease:
            with log.open("a") as out:
                out.write(f"{name}+\n")
            time.sleep(HOLD_S)
            with log.open("a") as out:
                out.write(f"{name}-\n")


def run_processes(*targets: tuple) -> None:
    context = multiprocessing.get_context("spawn")  # a fresh process, like a Triton stub
    processes = [context.Process(target=hold_repeatedly, args=args) for args in targets]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0


def test_one_process_at_a_time_holds_the_lease(tmp_path: Path):
    path, log = tmp_path / "cpu.lease", tmp_path / "log"
    run_processes((path, log, "a", 40), (path, log, "b", 40), (path, log, "c", 40))
    events = log.read_text().split()
    assert len(events) == 240
    for enter, leave in zip(events[::2], events[1::2], strict=True):  # nobody enters before the holder leaves
        assert enter.endswith("+") and leave == enter[:-1] + "-"


def test_a_waiting_process_gets_the_next_turn_from_one_that_asks_again_at_once(tmp_path: Path):
    """The engine asks for the lease again right after each step; an encoder waiting meanwhile
    must come next, not after the engine's whole run (the gate's job)."""
    path, log = tmp_path / "cpu.lease", tmp_path / "log"
    context = multiprocessing.get_context("spawn")
    busy = context.Process(target=hold_repeatedly, args=(path, log, "engine", 400))
    busy.start()
    deadline = time.monotonic() + 60
    while not log.exists() or log.read_text().count("engine-") < 5:
        assert time.monotonic() < deadline and busy.is_alive(), "the busy process never took the lease"
        time.sleep(HOLD_S)
    asked_after = log.read_text().count("engine-")
    hold_repeatedly(path, log, "encoder", 1)
    busy.join(60)
    assert busy.exitcode == 0
    events = log.read_text().split()
    turns_before = events[: events.index("encoder+")].count("engine-")
    assert turns_before - asked_after <= 2  # at most the step in progress and the one already past the gate
    assert events.count("engine-") == 400


def test_no_file_means_no_lease(tmp_path: Path):
    with cpu_lease(""):
        pass
    assert list(tmp_path.iterdir()) == []
