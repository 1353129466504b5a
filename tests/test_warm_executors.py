"""Executors that start warm (issue 11): the executors of one backend share its workers,
and an engine that bounds concurrency itself gets every task at once where the policy
never cancels pending tasks. Nothing here is timed; each test checks what runs where."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Set

import psutil
import pytest

import tasks
from apps import wait_for_path
from parallel_hydra import CancellationPolicy, JoblibParallelBackend


def _worker_pids(backend: JoblibParallelBackend) -> Set[int]:
    """The PIDs of the processes of the backend's shared pool right now."""
    pool = backend._task_pool._pool if backend._task_pool is not None else None
    return set((getattr(pool, "_processes", None) or {}).keys())


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_a_second_executor_runs_on_the_first_ones_workers() -> None:
    with JoblibParallelBackend(n_cpus=2) as backend:
        with backend.executor(max_workers=2) as executor:
            first = {executor.submit(tasks.where).result() for _ in range(20)}
        workers = _worker_pids(backend)
        assert len(workers) == 2 and {f"pid:{pid}" for pid in workers} >= first
        with backend.executor(max_workers=2, cancel_futures="NONE") as executor:
            second = {executor.submit(tasks.where).result() for _ in range(20)}
        with backend.executor(max_workers=1) as executor:
            third = {executor.submit(tasks.where).result() for _ in range(5)}
        assert second | third <= {f"pid:{pid}" for pid in workers}
        assert _worker_pids(backend) == workers
    assert not any(_alive(pid) for pid in workers), "the backend's shutdown stops the shared workers"


def test_after_running_stopped_tasks_a_new_executor_gets_fresh_workers(tmp_path: Path) -> None:
    beat = tmp_path / "beat"
    with JoblibParallelBackend(n_cpus=2) as backend:
        executor = backend.executor(max_workers=2, cancel_futures="RUNNING")
        future = executor.submit(tasks.heartbeat, str(beat), 120)
        wait_for_path(beat)
        old = _worker_pids(backend)
        executor.shutdown()
        assert future.cancelled()
        last_beat = beat.read_text()
        time.sleep(0.3)
        assert beat.read_text() == last_beat, "the stopped task still runs"
        with backend.executor(max_workers=2) as executor:
            assert executor.submit(tasks.add, 1, 2).result(timeout=60) == 3
            new = _worker_pids(backend)
        assert new and new.isdisjoint(old)
        assert not any(_alive(pid) for pid in old), "a killed pool's workers are all gone"
    assert not any(_alive(pid) for pid in new)


def test_a_smaller_executor_keeps_its_bound_on_the_shared_pool() -> None:
    with JoblibParallelBackend(n_cpus=2) as backend:
        with backend.executor(max_workers=2) as executor:
            executor.submit(tasks.add, 1).result()
        assert len(_worker_pids(backend)) == 2
        with backend.executor(max_workers=1, cancel_futures="NONE") as executor:
            spans = sorted(executor.map(tasks.span, [0.2] * 5, chunksize=1))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.01, f"two tasks of a 1-worker executor overlapped: {spans}"


def test_cancel_under_none_takes_back_a_task_still_queued_in_loky(tmp_path: Path) -> None:
    gate, ran = tmp_path / "gate", tmp_path / "ran"
    with JoblibParallelBackend(n_cpus=2) as backend:
        with backend.executor(max_workers=2, cancel_futures="NONE") as executor:
            blockers = [executor.submit(tasks.wait_for_file, str(gate)) for _ in range(2)]
            futures = [executor.submit(tasks.touch, str(ran), i) for i in range(12)]
            # Everything was handed to loky at once (NONE, and the pool is the bound).
            assert all(f.running() for f in futures)
            assert futures[-1].cancel(), "loky still held the last task in its queue"
            assert futures[-1].cancelled()
            gate.touch()
        assert [f.result() for f in blockers + futures[:-1]] == [None, None, *range(11)]
    assert len(ran.read_text().splitlines()) == 11


def test_under_pending_loky_gets_at_most_twice_the_pool_size(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with JoblibParallelBackend(n_cpus=2) as backend:
        with backend.executor(max_workers=2, cancel_futures="PENDING") as executor:
            futures = [executor.submit(tasks.wait_for_file, str(gate), 60, i) for i in range(10)]
            # All handed to the pool, which sends 2 * size calls and holds the rest.
            assert all(f.running() for f in futures)
            assert sum(task.held for task in backend._task_pool._held) == 6  # type: ignore[attr-defined]
            executor.shutdown(wait=False)  # the 6 the pool holds, and any loky gives back
            gate.touch()
        assert all(f.cancelled() for f in futures[4:])
        assert all(f.cancelled() or f.result() == i for i, f in enumerate(futures[:4]))


@pytest.mark.parametrize("policy, handed", [("NONE", 10), ("RUNNING", 10), ("PENDING", 4)])
def test_ray_gets_every_task_at_once_unless_pending_tasks_may_be_cancelled(ray_backend, tmp_path: Path, policy: str, handed: int) -> None:
    gate = tmp_path / "gate"
    executor = ray_backend.executor(max_workers=2, cancel_futures=policy)
    try:
        futures = [executor.submit(tasks.wait_for_file, str(gate), 60, i) for i in range(10)]
        assert sum(f.running() for f in futures) == handed
    finally:
        gate.touch()
        executor.shutdown(wait=True, cancel_futures=CancellationPolicy.NONE)
    assert [f.result() for f in futures if not f.cancelled()] == list(range(10))
