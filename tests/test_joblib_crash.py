"""A crash in the joblib backend's shared loky pool: what fails, what runs again.

loky kills all of a pool's workers when one dies. The task that crashed fails with
WorkerCrashedError; a task another worker had started fails with NeighborCrashedError and
never runs a second time; tasks no worker had started run on a new pool, once.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import tasks
from apps import wait_for_path
from parallel_hydra import JoblibParallelBackend
from parallel_hydra.errors import NeighborCrashedError, WorkerCrashedError


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_crash_stops_the_started_neighbor_once_and_reruns_the_unstarted(tmp_path: Path) -> None:
    started, gate = tmp_path / "started", tmp_path / "gate"
    with JoblibParallelBackend(n_cpus=2) as backend:
        with backend.executor(max_workers=2, cancel_futures="NONE") as executor:
            neighbor = executor.submit(tasks.append_then_wait, str(started), str(gate), 60.0, "neighbor")
            wait_for_path(started)
            crashed = executor.submit(tasks.exit_hard, 3)
            queued = [executor.submit(tasks.touch, str(tmp_path / "ran"), i) for i in range(6)]
            error = crashed.exception(timeout=60)
            assert isinstance(error, WorkerCrashedError) and not isinstance(error, NeighborCrashedError)
            assert "exit code 3" in str(error)
            stopped = neighbor.exception(timeout=60)
            assert isinstance(stopped, NeighborCrashedError), repr(stopped)
            assert "append_then_wait" in str(stopped) and "exit code 3" in str(stopped)
            assert stopped.__cause__ is not None
            assert [f.result(timeout=60) for f in queued] == list(range(6))
        gate.touch()
        time.sleep(0.5)  # a neighbour run again by mistake would have appended by now
    assert _lines(started) == 1, "the started neighbour ran a second time"
    assert _lines(tmp_path / "ran") == 6, "an unstarted task ran twice, or not at all"


def test_a_worker_that_died_idle_fails_no_later_task() -> None:
    # The out-of-memory killer, or a stray kill, may end a worker between tasks. loky
    # then marks its pool broken, and refuses new tasks; no task of ours was on it.
    with JoblibParallelBackend(n_cpus=2) as backend:
        with backend.executor(cancel_futures="NONE") as executor:
            pid = executor.submit(os.getpid).result(timeout=60)
            os.kill(pid, signal.SIGKILL)
            time.sleep(1.0)  # loky has seen the death by now
            assert [f.result(timeout=60) for f in [executor.submit(tasks.add, i, 1) for i in range(4)]] == [1, 2, 3, 4]


@pytest.mark.parametrize("policy", ["RUNNING", "ALL"])
def test_stopping_one_executors_tasks_never_reruns_another_executors_started_task(tmp_path: Path, policy: str) -> None:
    # Both executors share the backend's pool: killing a worker to stop a task breaks it.
    started, gate = tmp_path / "started", tmp_path / "gate"
    beat = tmp_path / "beat"
    with JoblibParallelBackend(n_cpus=2) as backend:
        with backend.executor(max_workers=1, cancel_futures="NONE") as patient:
            other = patient.submit(tasks.append_then_wait, str(started), str(gate), 60.0, "other")
            wait_for_path(started)
            with backend.executor(max_workers=1, cancel_futures=policy) as hasty:
                long = hasty.submit(tasks.heartbeat, str(beat), 120)
                wait_for_path(beat)
            assert long.cancelled()
            error = other.exception(timeout=60)
            assert isinstance(error, NeighborCrashedError), repr(error)
            assert "stop cancelled tasks" in str(error)
            assert patient.submit(tasks.add, 1, 2).result(timeout=60) == 3
        gate.touch()
        time.sleep(0.5)
    assert _lines(started) == 1, "the other executor's started task ran a second time"
