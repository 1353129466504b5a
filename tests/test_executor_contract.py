"""The executor contract, written once and run against every engine.

Each test takes the ``backend`` fixture, which is the session's joblib, Ray and Dask
backend in turn (see conftest.py). Nothing here knows which engine it runs on.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from pathlib import Path
from typing import List, Tuple

import pytest

from parallel_hydra import BaseParallelBackend, CancellationPolicy, MapReduceJob

import tasks
from apps import beats_after, wait_until
from tasks import Boom


def max_overlap(spans: List[Tuple[float, float]]) -> int:
    """The most spans that were open at one instant."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda ev: (ev[0], ev[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def open_gate_later(path: Path, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, path.touch)
    timer.start()
    return timer


# -- submit, results, exceptions ------------------------------------------------------


def test_submit_returns_a_future_with_the_result(backend: BaseParallelBackend) -> None:
    with backend.executor(max_workers=2) as executor:
        future = executor.submit(tasks.add, 2, b=3)
        assert isinstance(future, cf.Future)
        assert future.result(timeout=60) == 5


def test_exception_keeps_its_type_and_message(backend: BaseParallelBackend) -> None:
    with backend.executor(max_workers=2) as executor:
        future = executor.submit(tasks.raise_boom, "it broke")
        with pytest.raises(Boom, match="it broke"):
            future.result(timeout=60)
        assert isinstance(future.exception(), Boom)


def test_an_exception_that_cannot_travel_as_it_is_arrives_as_its_class_and_harms_no_neighbour(
    backend: BaseParallelBackend,
) -> None:
    # One pickles but cannot be unpickled (on loky that used to break the whole pool and
    # fail the task running beside it); one cannot be pickled at all (a lock inside).
    with backend.executor(max_workers=2) as executor:
        neighbour = executor.submit(tasks.sleep_then, 1.5, "fine")
        time.sleep(0.3)
        two_arg = executor.submit(tasks.raise_two_arg, "/data/x", 3)
        locked = executor.submit(tasks.raise_locked, "held")
        error = two_arg.exception(timeout=60)
        assert type(error) is tasks.TwoArgError and str(error) == "/data/x failed with 3", repr(error)
        assert error.code == 3
        error = locked.exception(timeout=60)
        assert type(error) is tasks.LockedError and str(error) == "held", repr(error)
        assert "lock" in error.lock  # the attribute that could not travel, as its repr
        assert neighbour.result(timeout=60) == "fine"


def test_a_task_that_logs_badly_still_returns(backend: BaseParallelBackend) -> None:
    # A bad format string, an extra that cannot be pickled: logging reports the first and
    # goes on; neither may fail the task.
    with backend.executor(max_workers=2) as executor:
        assert executor.submit(tasks.log_oddly, 42).result(timeout=60) == 42


def test_equal_calls_are_not_merged(backend: BaseParallelBackend) -> None:
    with backend.executor() as executor:
        values = [f.result(timeout=60) for f in [executor.submit(tasks.draw) for _ in range(10)]]
    assert len(set(values)) == 10


def test_as_completed_sees_every_future(backend: BaseParallelBackend) -> None:
    with backend.executor() as executor:
        futures = [executor.submit(tasks.square, i) for i in range(20)]
        assert sorted(f.result() for f in cf.as_completed(futures, timeout=60)) == [i * i for i in range(20)]


def test_submit_after_shutdown_raises(backend: BaseParallelBackend) -> None:
    executor = backend.executor()
    executor.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        executor.submit(tasks.add, 1)


def test_a_pending_future_cancelled_by_the_user_never_runs(backend: BaseParallelBackend, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with backend.executor(max_workers=1, cancel_futures="NONE") as executor:
        blockers = [executor.submit(tasks.wait_for_file, str(gate)) for _ in range(3)]
        queued = executor.submit(tasks.heartbeat, str(tmp_path / "beat"), 0.1)
        try:
            assert queued.cancel()
        finally:
            gate.touch()  # never leave the blockers waiting, even when the test fails
    assert all(f.done() and not f.cancelled() for f in blockers)
    assert queued.cancelled()
    assert not (tmp_path / "beat").exists()


# -- map --------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 3, None])
def test_map_keeps_order(backend: BaseParallelBackend, chunksize) -> None:
    with backend.executor(max_workers=2) as executor:
        assert list(executor.map(tasks.add, range(25), range(25), chunksize=chunksize)) == [2 * i for i in range(25)]


@pytest.mark.parametrize("chunksize", [1, 4, None])
def test_map_raises_the_first_exception_at_its_item(backend: BaseParallelBackend, chunksize) -> None:
    with backend.executor(max_workers=2) as executor:
        results = executor.map(tasks.fail_on, range(20), [7] * 20, chunksize=chunksize)
        seen = []
        with pytest.raises(Boom, match="bad item 7"):
            for value in results:
                seen.append(value)
    assert seen == list(range(7))


def test_map_honours_its_timeout(backend: BaseParallelBackend) -> None:
    with backend.executor(max_workers=1, cancel_futures="ALL") as executor:
        results = executor.map(tasks.sleep_then, [10.0, 10.0], chunksize=1, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(cf.TimeoutError):
            list(results)
        assert time.monotonic() - started < 5


def test_map_rejects_a_bad_chunksize(backend: BaseParallelBackend) -> None:
    with backend.executor() as executor:
        with pytest.raises(ValueError, match="chunksize"):
            executor.map(tasks.square, [1], chunksize=0)


# -- the bound on concurrency -------------------------------------------------------


@pytest.mark.parametrize("max_workers", [1, 2])
def test_at_most_max_workers_tasks_run_at_once(backend: BaseParallelBackend, max_workers: int) -> None:
    with backend.executor(max_workers=max_workers) as executor:
        spans = [f.result(timeout=120) for f in [executor.submit(tasks.span, 0.3) for _ in range(6)]]
    assert max_overlap(spans) <= max_workers


def test_max_workers_is_capped_by_the_backend(backend: BaseParallelBackend) -> None:
    executor = backend.executor(max_workers=64)
    try:
        assert executor.max_workers == backend.effective_n_jobs(-1) <= 2
    finally:
        executor.shutdown()


# -- cancellation policies on exit --------------------------------------------------


def test_policy_none_waits_for_every_task(backend: BaseParallelBackend) -> None:
    with backend.executor(max_workers=1, cancel_futures=CancellationPolicy.NONE) as executor:
        futures = [executor.submit(tasks.sleep_then, 0.1, i) for i in range(5)]
    assert [f.result(timeout=0) for f in futures] == list(range(5))


def test_policy_pending_cancels_what_no_worker_was_handed(backend: BaseParallelBackend, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    max_workers = 1
    with backend.executor(max_workers=max_workers, cancel_futures=CancellationPolicy.PENDING) as executor:
        started = tmp_path / "started"
        futures = [executor.submit(tasks.mark_then_wait, str(started), str(gate), 60.0, i) for i in range(8)]
        # Started in a worker, not only handed to the engine (which may still give it back).
        assert wait_until(started.exists, 60), "the first task never started"
        open_gate_later(gate, 0.5)
    cancelled = [f for f in futures if f.cancelled()]
    finished = [f for f in futures if not f.cancelled()]
    # Tasks handed ahead (at most max_workers of them) count as running and finish.
    assert max_workers <= len(finished) <= 2 * max_workers
    assert len(cancelled) >= len(futures) - 2 * max_workers
    assert [f.result(timeout=0) for f in finished] == list(range(len(finished)))
    assert all(f.done() for f in futures)


def test_policy_running_stops_the_work_and_pending_tasks_still_run(backend: BaseParallelBackend, tmp_path: Path) -> None:
    beat = tmp_path / "beat"
    with backend.executor(max_workers=1, cancel_futures=CancellationPolicy.RUNNING) as executor:
        running = executor.submit(tasks.heartbeat, str(beat), 60.0)
        assert wait_until(beat.exists, 60), "the long task never started"
        later = [executor.submit(tasks.add, i, 1) for i in range(3)]
    assert running.cancelled()
    assert not beats_after(beat), "the cancelled task is still running"
    # A task handed to the engine ahead of time counts as running (at most max_workers
    # of them); the others were pending and still ran.
    ran = [f for f in later if not f.cancelled()]
    assert len(ran) >= len(later) - 1
    assert [f.result(timeout=0) for f in ran] == [i + 1 for i in range(3)][-len(ran):]


def test_policy_all_returns_promptly_and_the_backend_stays_usable(backend: BaseParallelBackend, tmp_path: Path) -> None:
    beats = [tmp_path / f"beat{i}" for i in range(2)]
    with backend.executor(max_workers=2, cancel_futures=CancellationPolicy.ALL) as executor:
        running = [executor.submit(tasks.heartbeat, str(b), 60.0) for b in beats]
        pending = [executor.submit(tasks.heartbeat, str(tmp_path / f"never{i}"), 60.0) for i in range(4)]
        assert wait_until(lambda: all(b.exists() for b in beats), 60), "the long tasks never started"
        exit_from = time.monotonic()
    assert time.monotonic() - exit_from < 30, "exit with ALL did not return promptly"
    assert all(f.cancelled() for f in running + pending)
    for beat in beats:
        assert not beats_after(beat, 0.5), "a cancelled task is still running"
    # Tasks handed to the engine ahead of the running ones (at most max_workers) may have
    # started before ALL stopped them; none of them may still run.
    started_later = [p for p in tmp_path.glob("never*")]
    assert len(started_later) <= 2, f"pending tasks started: {sorted(p.name for p in started_later)}"
    assert not any(beats_after(p, 0.5) for p in started_later), "a cancelled pending task is still running"
    with backend.executor(max_workers=2) as executor:
        assert executor.submit(tasks.add, 20, 22).result(timeout=60) == 42


def test_policy_all_right_after_submitting_leaves_nothing_running(backend: BaseParallelBackend, tmp_path: Path) -> None:
    # Leaving at once: some tasks may not even have reached the engine yet (on Dask, the
    # scheduler hears of a submit a moment later). None may start later, nor run on.
    started = time.monotonic()
    with backend.executor(max_workers=2, cancel_futures=CancellationPolicy.ALL) as executor:
        futures = [executor.submit(tasks.heartbeat, str(tmp_path / f"beat{i}"), 60.0) for i in range(12)]
    assert time.monotonic() - started < 30, "exit with ALL did not return promptly"
    assert all(f.cancelled() for f in futures)
    time.sleep(1.0)  # a task handed over again by mistake would have started by now
    beating = [p.name for p in tmp_path.glob("beat*") if beats_after(p, 0.5)]
    assert not beating, f"cancelled tasks are running: {beating}"
    assert len(list(tmp_path.glob("beat*"))) <= 4, "more tasks started than max_workers plus those handed ahead"


def test_shutdown_takes_a_policy_of_its_own(backend: BaseParallelBackend, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    executor = backend.executor(max_workers=1, cancel_futures=CancellationPolicy.NONE)
    started = tmp_path / "started"
    futures = [executor.submit(tasks.mark_then_wait, str(started), str(gate), 60.0, 0)]
    futures += [executor.submit(tasks.wait_for_file, str(gate), 60.0, i) for i in range(1, 6)]
    # Only a task a worker has started is safe from PENDING: one handed to the engine but
    # not yet started (loky can give it back) may be cancelled too.
    assert wait_until(started.exists, 60), "the first task never started"
    open_gate_later(gate, 0.5)
    executor.shutdown(wait=True, cancel_futures=True)  # True means PENDING, as in concurrent.futures
    assert any(f.cancelled() for f in futures)
    assert futures[0].result(timeout=0) == 0


def test_shutdown_without_waiting_lets_tasks_finish(backend: BaseParallelBackend) -> None:
    executor = backend.executor(max_workers=2, cancel_futures=CancellationPolicy.NONE)
    futures = [executor.submit(tasks.sleep_then, 0.2, i) for i in range(4)]
    started = time.monotonic()
    executor.shutdown(wait=False)
    assert time.monotonic() - started < 0.5
    assert [f.result(timeout=60) for f in futures] == list(range(4))


# -- object store -----------------------------------------------------------------


def test_put_handle_reaches_a_task_as_the_object(backend: BaseParallelBackend) -> None:
    handle = backend.put(list(range(1000)))
    with backend.executor() as executor:
        assert executor.submit(tasks.length, handle).result(timeout=60) == 1000
        assert executor.submit(tasks.length, obj=handle).result(timeout=60) == 1000
    assert backend.get(handle) == list(range(1000))
    assert backend.get([handle, backend.put("ab")]) == [list(range(1000)), "ab"]


def test_a_large_array_reaches_a_task_by_handle(backend: BaseParallelBackend) -> None:
    import numpy as np

    array = np.arange(2**19, dtype=np.float64)  # 4 MiB: large enough to be shared, not pickled
    handle = backend.put(array)
    with backend.executor() as executor:
        sums = [f.result(timeout=60) for f in [executor.submit(tasks.total, handle) for _ in range(3)]]
    assert sums == [float(array.sum())] * 3
    assert backend.get(handle) is array or np.array_equal(backend.get(handle), array)


def test_wrap_starts_the_function_and_returns_a_handle(backend: BaseParallelBackend) -> None:
    remote_add = backend.wrap(tasks.add)
    handles = [remote_add(i, 1) for i in range(5)]
    assert backend.get(handles) == [1, 2, 3, 4, 5]
    assert backend.get(remote_add(backend.put(40), 2)) == 42


def test_get_of_a_failed_wrapped_call_raises_the_original_type(backend: BaseParallelBackend) -> None:
    with pytest.raises(Boom, match="from wrap"):
        backend.get(backend.wrap(tasks.raise_boom)("from wrap"), timeout=60)


def test_wait_splits_done_from_not_done(backend: BaseParallelBackend, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    fast = backend.put(1)
    slow = backend.wrap(tasks.wait_for_file)(str(gate), 60.0, 2)
    done, not_done = backend.wait([fast, slow], num_returns=1, timeout=30)
    assert len(done) == 1 and len(not_done) == 1
    assert backend.get(done[0]) == 1
    done, not_done = backend.wait([slow], num_returns=1, timeout=0.2)
    assert done == [] and len(not_done) == 1
    gate.touch()
    done, not_done = backend.wait([fast, slow], num_returns=2, timeout=60)
    assert len(done) == 2 and not_done == []
    with pytest.raises(ValueError, match="num_returns"):
        backend.wait([fast], num_returns=2)


# -- counting and MapReduceJob ------------------------------------------------------


def test_effective_n_jobs(backend: BaseParallelBackend) -> None:
    with pytest.raises(ValueError, match="n_jobs"):
        backend.effective_n_jobs(0)
    assert backend.effective_n_jobs(-1) == 2  # the session backends have 2 CPUs
    assert backend.effective_n_jobs(1) == 1
    assert backend.effective_n_jobs(1000) == 2
    assert backend.effective_n_jobs(-2) == 1


def test_map_reduce_runs_on_the_backend(backend: BaseParallelBackend) -> None:
    places = MapReduceJob(None, map_func=_where_ignoring_input, config=backend, n_jobs=2)()
    assert len(places) == 2
    if backend.name in ("ray", "dask"):
        assert places == [backend.name] * 2
    else:
        assert all(p.startswith("pid:") and p != f"pid:{__import__('os').getpid()}" for p in places)


def test_map_reduce_is_reproducible_by_seed(backend: BaseParallelBackend) -> None:
    job = MapReduceJob(list(range(10)), map_func=_seeded_draws, reduce_func=_flatten, config=backend, n_jobs=2)
    first, again, other = job(seed=7), job(seed=7), job(seed=8)
    assert first == again
    assert first != other
    assert len(set(first)) == 10  # each job has its own stream


def _where_ignoring_input(_chunk) -> str:
    return tasks.where()


def _seeded_draws(chunk, seed=None, job_id=None):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [(job_id, float(rng.random())) for _ in chunk]


def _flatten(parts):
    return [value for part in parts for _, value in part]
