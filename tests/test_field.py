"""The field, not only the contract: crashes, unpicklable data, cancellation seen by
waiters, reproducible seeds, deadlines, and objects the executor must let go.

Every test runs on each engine's session backend (the ``backend`` fixture). The
engine-specific failure cases (a scheduler or head that dies, tasks no node can run) are
in ``test_dask_field.py`` and ``test_ray_field.py``; Ctrl-C on a real app is in
``test_interrupts.py``.
"""

from __future__ import annotations

import concurrent.futures as cf
import gc
import logging
import pickle
import time
import weakref
from pathlib import Path

import pytest

from parallel_hydra import BaseParallelBackend, CancellationPolicy, JoblibConfig, MapReduceJob
from parallel_hydra.errors import NeighborCrashedError, WorkerCrashedError

import tasks
from apps import beats_after, wait_until

# -- a crash fails its own task, clearly, and nothing else ------------------------------

#: How each crash must end on its future, on every engine.
CRASHES = [
    pytest.param(tasks.raise_boom, ("ordinary",), tasks.Boom, id="exception"),
    pytest.param(tasks.exit_hard, (), WorkerCrashedError, id="os._exit"),
    pytest.param(tasks.kill_self, (), WorkerCrashedError, id="SIGKILL"),
    pytest.param(tasks.segfault, (), WorkerCrashedError, id="segfault"),
    pytest.param(tasks.return_unpicklable, (), pickle.PicklingError, id="unpicklable-result"),
    pytest.param(tasks.length, (__import__("threading").Lock(),), pickle.PicklingError, id="unpicklable-argument"),
]


@pytest.mark.parametrize("fn, args, error", CRASHES)
def test_a_crash_fails_its_own_task_and_nothing_else(backend: BaseParallelBackend, fn, args, error, tmp_path: Path) -> None:
    with backend.executor(max_workers=2, cancel_futures="NONE") as executor:
        others = [executor.submit(tasks.sleep_then, 0.5, i) for i in range(3)]
        crashed = executor.submit(fn, *args)
        more = [executor.submit(tasks.touch, str(tmp_path / "ran"), i) for i in range(3)]
        exc = crashed.exception(timeout=120)
        assert isinstance(exc, error), f"{type(exc).__name__}: {exc}"
        if error is WorkerCrashedError:
            assert exc.__cause__ is not None, "the engine's own error is kept as the cause"
            assert "died" in str(exc)
        if error is pickle.PicklingError:
            assert fn.__name__ in str(exc) or "pickle" in str(exc).lower()
        if fn is tasks.length:  # the task and what could not be pickled, on every engine
            assert "length" in str(exc) and "argument" in str(exc), str(exc)
        outcomes = [_outcome(f) for f in others + more]
        # On joblib, loky kills the other worker too: the task it had started fails with
        # NeighborCrashedError (never run twice). On Dask, a task that finished in the
        # crashing process just before, its result not yet sent, fails the same way.
        stopped = [i for i, o in enumerate(outcomes) if isinstance(o, NeighborCrashedError)]
        assert len(stopped) <= (0 if backend.name == "ray" else 1), f"outcomes: {outcomes}"
        assert [o for i, o in enumerate(outcomes) if i not in stopped] == [
            v for i, v in enumerate([0, 1, 2, 0, 1, 2]) if i not in stopped
        ]
        # The executor is still usable after the crash.
        assert executor.submit(tasks.add, 40, 2).result(timeout=120) == 42
    # Nothing ran twice: each touching task that returned appended one line, and one
    # stopped by a neighbour's crash at most one.
    ran = len((tmp_path / "ran").read_text().splitlines()) if (tmp_path / "ran").exists() else 0
    stopped_touches = sum(1 for i in stopped if i >= len(others))
    assert 3 - stopped_touches <= ran <= 3
    with backend.executor(max_workers=2) as executor:
        assert list(executor.map(tasks.square, range(5))) == [0, 1, 4, 9, 16]


def test_a_crash_in_a_map_chunk_or_a_map_reduce_job_names_the_users_function(backend: BaseParallelBackend) -> None:
    # Both run the user's function inside helpers of ours; the messages name the function.
    with backend.executor(max_workers=2) as executor:
        with pytest.raises(WorkerCrashedError) as crash:
            list(executor.map(tasks.exit_on, range(40), [13] * 40, chunksize=5))
    with pytest.raises(WorkerCrashedError) as job_crash:
        MapReduceJob(list(range(4)), tasks.exit_on_any, config=backend, n_jobs=2)()
    for error, name in ((crash.value, "exit_on"), (job_crash.value, "exit_on_any")):
        assert f"task {name} " in str(error) or f"task tasks.{name} " in str(error), str(error)
        assert "_run_chunk" not in str(error) and "_call_map" not in str(error), str(error)


def _outcome(future: cf.Future) -> object:
    """The future's result, or the exception it ended with."""
    error = future.exception(timeout=120)
    return error if error is not None else future.result()


def test_sys_exit_in_a_task_ends_with_an_error_on_its_future(backend: BaseParallelBackend) -> None:
    with backend.executor(max_workers=2) as executor:
        exc = executor.submit(tasks.exit_softly).exception(timeout=120)
        assert isinstance(exc, (SystemExit, WorkerCrashedError)), repr(exc)
        assert executor.submit(tasks.add, 1, 1).result(timeout=120) == 2


def test_any_keyword_name_reaches_the_task(backend: BaseParallelBackend) -> None:
    names = {"fn": 1, "func": 2, "self": 3, "key": 4, "pure": 5, "args": 6, "kwargs": 7}
    with backend.executor(max_workers=2) as executor:
        assert executor.submit(tasks.keywords, **names).result(timeout=60) == sorted(names.items())


# -- waiting and cancelling -------------------------------------------------------------


def test_wait_on_no_handles_returns_at_once(backend: BaseParallelBackend) -> None:
    started = time.monotonic()
    assert backend.wait([]) == ([], [])
    assert backend.wait([], timeout=None) == ([], [])
    assert time.monotonic() - started < 1


def test_wait_on_something_not_a_handle_says_what_a_handle_is(backend: BaseParallelBackend) -> None:
    with pytest.raises(TypeError, match=f"the {backend.name} backend waits on handles from its put or wrap; got int"):
        backend.wait([42])
    for wrong in (5, [backend.put(1), "x"]):
        with pytest.raises(TypeError, match=f"the {backend.name} backend gets handles from its put or wrap; got (int|str)"):
            backend.get(wrong)


def test_get_past_its_timeout_says_how_many_results_are_missing(backend: BaseParallelBackend, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    waiting = backend.wrap(tasks.wait_for_file)(str(gate), 60.0, "late")
    ready = backend.put("early")
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"1 \w+ result\(s\) not ready within 0.5 s"):
        backend.get([ready, waiting], timeout=0.5)
    assert time.monotonic() - started < 10
    gate.touch()
    assert backend.get([ready, waiting], timeout=60) == ["early", "late"]
    # A call's own TimeoutError is its error, not a wait that ran out.
    with pytest.raises(TimeoutError, match="its own"):
        backend.get(backend.wrap(tasks.raise_timeout)("its own"), timeout=60)


def test_cancelled_futures_count_as_done_for_waiters(backend: BaseParallelBackend, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    executor = backend.executor(max_workers=1, cancel_futures="NONE")
    try:
        futures = [executor.submit(tasks.wait_for_file, str(gate), 60.0, i) for i in range(40)]
        waited = []
        watcher = cf.ThreadPoolExecutor(1)
        waiting = watcher.submit(lambda: waited.extend(cf.as_completed(futures, timeout=60)))
        executor.shutdown(wait=False, cancel_futures=CancellationPolicy.PENDING)
        gate.touch()
        done, not_done = cf.wait(futures, timeout=60)
        assert not not_done, f"{len(not_done)} futures never counted as done"
        waiting.result(timeout=60)
        assert len(waited) == len(futures)
        assert sum(f.cancelled() for f in futures) >= len(futures) - 2
        watcher.shutdown()
    finally:
        gate.touch()
        executor.shutdown(wait=True)


def test_a_handle_argument_is_resolved_when_the_task_starts(backend: BaseParallelBackend, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    slow = backend.wrap(tasks.wait_for_file)(str(gate), 60.0, 20)
    with backend.executor(max_workers=2) as executor:
        started = time.monotonic()
        future = executor.submit(tasks.add, slow, 22)
        chained = backend.wrap(tasks.add)(slow, 1)
        assert time.monotonic() - started < 5, "submit waited for the handle's value"
        assert not future.done()
        gate.touch()
        assert future.result(timeout=60) == 42
        assert backend.get(chained, timeout=60) == 21


# -- reproducible results ---------------------------------------------------------------


def _draws(chunk, seed=None):
    import numpy as np

    rng = np.random.default_rng(seed)
    return [float(rng.random()) for _ in chunk]


def _concat(parts):
    return [x for part in parts for x in part]


def test_one_seed_one_result_whatever_the_workers(backend: BaseParallelBackend) -> None:
    def run(config) -> list:
        return MapReduceJob(list(range(24)), _draws, reduce_func=_concat, config=config, n_jobs=4)(seed=42)

    here = run(backend)
    assert len(set(here)) == 24
    for n_cpus in (1, 2, 3):
        assert run(JoblibConfig(n_cpus=n_cpus)) == here, f"a different result with {n_cpus} worker(s)"


def test_map_reduce_timeout_is_one_deadline_that_stops_the_tasks(backend: BaseParallelBackend, tmp_path: Path) -> None:
    beats = [str(tmp_path / f"beat{i}") for i in range(2)]
    job = MapReduceJob(beats, _beat_all, config=backend, n_jobs=2, timeout=2.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="timeout"):
        job()
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"the deadline of 2 s was kept only after {elapsed:.1f} s"
    for beat in beats:
        assert not beats_after(Path(beat), 1.0), "a task of the timed-out job is still running"


def _beat_all(paths):
    return [tasks.heartbeat(p, 60.0) for p in paths]


# -- leaving an executor on an exception --------------------------------------------------


def test_keyboard_interrupt_in_a_with_block_stops_everything(backend: BaseParallelBackend, tmp_path: Path) -> None:
    beats = [tmp_path / f"beat{i}" for i in range(2)]
    with pytest.raises(KeyboardInterrupt):
        with backend.executor(max_workers=2) as executor:  # the default policy, PENDING
            running = [executor.submit(tasks.heartbeat, str(b), 60.0) for b in beats]
            pending = [executor.submit(tasks.heartbeat, str(tmp_path / f"later{i}"), 60.0) for i in range(3)]
            assert wait_until(lambda: all(b.exists() for b in beats), 60)
            interrupted = time.monotonic()
            raise KeyboardInterrupt
    assert time.monotonic() - interrupted < 30, "Ctrl-C waited for running tasks"
    assert all(f.cancelled() for f in running + pending)
    for beat in beats:
        assert not beats_after(beat, 0.5), "a task is still running after Ctrl-C"


def test_another_exception_applies_the_policy_and_says_what_it_waits_for(
    backend: BaseParallelBackend, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="parallel_hydra.executor"):
        with pytest.raises(ValueError, match="user error"):
            with backend.executor(max_workers=1) as executor:
                running = executor.submit(tasks.sleep_then, 1.0, "kept")
                assert wait_until(lambda: running.running() or running.done(), 60)
                raise ValueError("user error")
    assert running.result(timeout=0) == "kept", "PENDING lets the running task finish"
    assert "leaving the executor on ValueError" in caplog.text


# -- the executor lets go of what it no longer needs ----------------------------------------


def test_map_does_not_hold_the_results_it_handed_out(backend: BaseParallelBackend) -> None:
    with backend.executor(max_workers=2) as executor:
        for chunksize in (1, 3):
            results = executor.map(tasks.boxed, range(6), chunksize=chunksize)
            first = next(results)
            ref = weakref.ref(first)
            del first
            # The engine's callback thread may still be returning from setting the result.
            assert wait_until(lambda: ref() is None, 5), f"map kept the result it yielded (chunksize={chunksize})"
            assert [box.value for box in results] == [1, 2, 3, 4, 5]


def test_a_finished_task_lets_go_of_its_callable(backend: BaseParallelBackend) -> None:
    callable_object = Adder(2)
    ref = weakref.ref(callable_object)
    with backend.executor(max_workers=1) as executor:
        assert executor.submit(callable_object, 40).result(timeout=60) == 42
        del callable_object
        gc.disable()
        try:
            assert wait_until(lambda: ref() is None, 5), "the executor kept a finished task's callable"
        finally:
            gc.enable()


class Adder:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, x: int) -> int:
        return x + self.n
