"""Many tasks at once on the joblib backend: they leave for loky in batches, and each
still ends on its own.

An executor that hands every task over at once (``NONE``, ``RUNNING``) lets the pool
keep what no worker can take yet and send it as batches when workers free up: one loky
call per trivial task costs more than the task. These tests hold the pool's workers
with tasks that wait for a file, so that what follows is held, then let it go.
"""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path
from typing import List

import pytest

from parallel_hydra import BaseParallelBackend
from parallel_hydra.errors import NeighborCrashedError, WorkerCrashedError

import tasks
from apps import wait_until

#: Tasks that fill the pool's workers and loky's queue in front of them (2 * size + 1).
BLOCKERS = 5


def _block(executor, gate: Path) -> List:
    """Fill the pool with tasks that wait for ``gate``: what is submitted next is held."""
    return [executor.submit(tasks.wait_for_file, str(gate), 120.0, "blocker") for _ in range(BLOCKERS)]


def _held(backend: BaseParallelBackend) -> int:
    return len(backend._task_pool._held)  # type: ignore[attr-defined]


def test_many_tiny_tasks_leave_in_batches_each_with_its_own_result(joblib_backend: BaseParallelBackend) -> None:
    with joblib_backend.executor(cancel_futures="NONE") as executor:
        futures = [executor.submit(tasks.add, i, 1) for i in range(3000)]
        assert [f.result(timeout=120) for f in futures] == [i + 1 for i in range(3000)]
    assert joblib_backend._task_pool._task_seconds is not None, "no batch was sent"  # type: ignore[attr-defined]


def test_in_a_batch_each_task_ends_on_its_own(joblib_backend: BaseParallelBackend, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with joblib_backend.executor(cancel_futures="NONE") as executor:
        [f.result(timeout=120) for f in [executor.submit(tasks.add, i) for i in range(300)]]  # batches measured
        blockers = _block(executor, gate)
        before = [executor.submit(tasks.add, i, 1) for i in range(40)]
        raises = executor.submit(tasks.raise_boom, "in a batch")
        unpicklable_result = executor.submit(tasks.return_unpicklable)
        unpicklable_argument = executor.submit(tasks.length, threading.Lock())
        unloadable = executor.submit(tasks.return_unloadable)
        after = [executor.submit(tasks.add, i, 2) for i in range(40)]
        assert _held(joblib_backend) == 84, "the tasks were not held for batches"
        gate.touch()
        assert [f.result(timeout=120) for f in blockers] == ["blocker"] * BLOCKERS
        assert [f.result(timeout=120) for f in before] == [i + 1 for i in range(40)]
        assert [f.result(timeout=120) for f in after] == [i + 2 for i in range(40)]
        with pytest.raises(tasks.Boom, match="in a batch") as boom:
            raises.result(timeout=120)
        assert "raise_boom" in str(boom.value.__cause__), "the worker's traceback is its cause"
        with pytest.raises(pickle.PicklingError, match="result of task return_unpicklable could not be pickled"):
            unpicklable_result.result(timeout=120)
        with pytest.raises(pickle.PicklingError, match="argument 0 of task length .*could not be pickled"):
            unpicklable_argument.result(timeout=120)
        with pytest.raises(pickle.UnpicklingError, match="return_unloadable could not be unpickled here.*does not unpickle"):
            unloadable.result(timeout=120)
        # Nothing broke: the pool still runs tasks.
        assert executor.submit(tasks.add, 40, 2).result(timeout=120) == 42


def test_a_crash_in_a_batch_fails_its_task_and_runs_no_task_twice(joblib_backend: BaseParallelBackend, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    ran = tmp_path / "ran"
    ran.mkdir()
    with joblib_backend.executor(cancel_futures="NONE") as executor:
        [f.result(timeout=120) for f in [executor.submit(tasks.add, i) for i in range(300)]]
        blockers = _block(executor, gate)
        touching = [executor.submit(tasks.touch, str(ran / str(i)), i) for i in range(60)]
        crash = executor.submit(tasks.exit_hard, 3)
        more = [executor.submit(tasks.touch, str(ran / str(i)), i) for i in range(60, 120)]
        assert _held(joblib_backend) == 121
        gate.touch()
        assert isinstance(crash.exception(timeout=120), WorkerCrashedError)
        outcomes = [f.exception(timeout=120) or f.result() for f in blockers + touching + more]
    stopped = [o for o in outcomes if isinstance(o, NeighborCrashedError)]
    assert all(isinstance(o, NeighborCrashedError) or o == expected
               for o, expected in zip(outcomes, ["blocker"] * BLOCKERS + list(range(120))))
    assert len(stopped) < 120, "the crash failed every task"
    for i, outcome in enumerate(outcomes[BLOCKERS:]):
        runs = len((ran / str(i)).read_text().splitlines()) if (ran / str(i)).exists() else 0
        assert runs == 1 if outcome == i else runs <= 1, f"task {i} ran {runs} times ({outcome!r})"


def test_held_tasks_can_be_cancelled_and_never_run(joblib_backend: BaseParallelBackend, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    ran = tmp_path / "ran"
    ran.mkdir()
    with joblib_backend.executor(cancel_futures="NONE") as executor:
        blockers = _block(executor, gate)
        touching = [executor.submit(tasks.touch, str(ran / str(i)), i) for i in range(40)]
        assert all(f.cancel() for f in touching[::2]), "a held task could not be cancelled"
        assert _held(joblib_backend) == 20
        gate.touch()
        assert [f.result(timeout=120) for f in touching[1::2]] == list(range(1, 40, 2))
        [f.result(timeout=120) for f in blockers]
    assert sorted(int(p.name) for p in ran.iterdir()) == list(range(1, 40, 2))
    assert all(len(p.read_text().splitlines()) == 1 for p in ran.iterdir())


def test_leaving_under_running_stops_the_running_and_runs_the_held_once(joblib_backend: BaseParallelBackend, tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    marks = tmp_path / "marks"
    gate = tmp_path / "gate"
    ran.mkdir()
    marks.mkdir()
    with joblib_backend.executor(cancel_futures="RUNNING") as executor:
        blockers = [executor.submit(tasks.mark_then_wait, str(marks / str(i)), str(gate), 120.0, "waited")
                    for i in range(BLOCKERS)]
        touching = [executor.submit(tasks.touch, str(ran / str(i)), i) for i in range(40)]
        assert _held(joblib_backend) == 40
        assert wait_until(lambda: len(list(marks.iterdir())) == 2, 30), "the blockers never started"
        # (A blocker still in loky's queue is pending: it runs again after the stop.)
        threading.Timer(2.0, gate.touch).start()
    started = {int(p.name) for p in marks.iterdir()}
    assert all(blockers[i].cancelled() for i in range(2)), "the running blockers were not stopped"
    assert all(f.cancelled() or f.result(timeout=0) == "waited" for f in blockers)
    assert [f.result(timeout=0) for f in touching] == list(range(40))
    assert all(len((ran / str(i)).read_text().splitlines()) == 1 for i in range(40))
    assert _held(joblib_backend) == 0
    assert started >= {0, 1}


def test_tasks_longer_than_a_batch_go_alone(joblib_backend: BaseParallelBackend) -> None:
    pool = joblib_backend._task_pool  # type: ignore[attr-defined]
    with joblib_backend.executor(cancel_futures="NONE") as executor:
        futures = [executor.submit(tasks.sleep_then, 0.02, i) for i in range(40)]
        assert [f.result(timeout=120) for f in futures] == list(range(40))
    assert pool._task_seconds > 0.01, "the held tasks were never measured"
    assert pool._unmeasured > 0, "no slow task went alone"
