"""Many tasks at once on the joblib backend: they leave for loky in batches, and each
still ends on its own.

An executor of the pool's size hands every task over at once, under any policy, and
lets the pool keep what loky's workers cannot take yet and send it (in batches, where
tasks are quick) as calls come back: one loky call per trivial task costs more than the
task. These tests fill the pool's calls with "door" tasks that wait for a file, so that
what follows is held, then open it.

What they check is what batching must not change: each task's own outcome, ``cancel()``
of what waits, ``PENDING`` cancelling what no worker has and ``RUNNING`` stopping only
what runs, no task run twice after a crash, and no batching of slow tasks, of large
arguments, or behind a smaller executor's tasks.
"""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, List, Tuple

import pytest

from parallel_hydra import BaseParallelBackend
from parallel_hydra.backends.loky_batch import Batch
from parallel_hydra.errors import NeighborCrashedError, WorkerCrashedError

import tasks
from apps import MARKER, interrupt_group, leftovers, wait_until
from ray_support import app_env

#: loky calls the pool keeps out for held tasks (2 * size for the session's 2 CPUs).
DEPTH = 4


@pytest.fixture
def sent(joblib_backend: BaseParallelBackend, monkeypatch: pytest.MonkeyPatch) -> Iterator[List[Tuple[str, List[Any]]]]:
    """What the pool sends to loky, as ``(kind, [each task's arguments])``."""
    pool = joblib_backend._task_pool  # type: ignore[attr-defined]
    if pool is None:
        with joblib_backend.executor() as executor:
            executor.submit(tasks.add, 1).result(timeout=60)
        pool = joblib_backend._task_pool  # type: ignore[attr-defined]
    log: List[Tuple[str, List[Any]]] = []
    to_loky: Callable[[Any], Any] = pool._to_loky

    def spy(call: Any) -> Any:
        if type(call) is Batch:
            log.append(("batch" if len(call.calls) > 1 else "alone", [c.args for c in call.calls]))
        else:  # a task that may not be batched, as a plain call
            log.append(("plain", [call.args]))
        return to_loky(call)

    monkeypatch.setattr(pool, "_to_loky", spy)
    yield log


def _held(backend: BaseParallelBackend) -> int:
    return sum(task.held for task in backend._task_pool._held)  # type: ignore[attr-defined]


def _doors(executor: Any, door: Path) -> List[Any]:
    """Fill the held tasks' loky calls with tasks that wait for ``door``."""
    return [executor.submit(tasks.wait_for_file, str(door), 120.0, "door") for _ in range(DEPTH)]


def _batches(sent: List[Tuple[str, List[Any]]]) -> List[List[Any]]:
    return [args for kind, args in sent if kind == "batch"]


def test_many_tiny_tasks_leave_in_batches_each_with_its_own_result(
    joblib_backend: BaseParallelBackend, sent: List[Tuple[str, List[Any]]]
) -> None:
    with joblib_backend.executor(cancel_futures="NONE") as executor:
        futures = [executor.submit(tasks.add, i, 1) for i in range(3000)]
        assert [f.result(timeout=120) for f in futures] == [i + 1 for i in range(3000)]
    assert _batches(sent), "no batch was sent"
    assert sorted(a for kind, args in sent for (a, _) in args) == list(range(3000)), "a task was sent twice or never"


def test_in_a_batch_each_task_ends_on_its_own(
    joblib_backend: BaseParallelBackend, sent: List[Tuple[str, List[Any]]], tmp_path: Path
) -> None:
    door = tmp_path / "door"
    with joblib_backend.executor(cancel_futures="NONE") as executor:
        # Each function's pace measured first: unmeasured tasks go alone.
        for fn, args in [(tasks.add, (1, 1)), (tasks.raise_boom, ("x",)), (tasks.return_unpicklable, ()),
                         (tasks.length, ("ab",)), (tasks.maybe_unloadable, (False,))]:
            [f.exception(timeout=120) for f in [executor.submit(fn, *args) for _ in range(2 * DEPTH)]]
        doors = _doors(executor, door)
        before = [executor.submit(tasks.add, i, 1) for i in range(40)]
        raises = [executor.submit(tasks.raise_boom, "in a batch") for _ in range(10)]
        unpicklable_result = [executor.submit(tasks.return_unpicklable) for _ in range(10)]
        lengths = [executor.submit(tasks.length, "abc") for _ in range(5)]
        unpicklable_argument = executor.submit(tasks.length, threading.Lock())
        lengths += [executor.submit(tasks.length, "abc") for _ in range(5)]
        unloadable = [executor.submit(tasks.maybe_unloadable, True) for _ in range(10)]
        after = [executor.submit(tasks.add, i, 2) for i in range(40)]
        assert _held(joblib_backend) == 40 + 10 + 10 + 11 + 10 + 40, "the tasks were not held for batches"
        door.touch()
        assert [f.result(timeout=120) for f in doors] == ["door"] * DEPTH
        assert [f.result(timeout=120) for f in before] == [i + 1 for i in range(40)]
        assert [f.result(timeout=120) for f in after] == [i + 2 for i in range(40)]
        assert [f.result(timeout=120) for f in lengths] == [3] * 10
        for future in raises:
            with pytest.raises(tasks.Boom, match="in a batch") as boom:
                future.result(timeout=120)
            assert "raise_boom" in str(boom.value.__cause__), "the worker's traceback is its cause"
        for future in unpicklable_result:
            with pytest.raises(pickle.PicklingError, match="result of task return_unpicklable could not be pickled"):
                future.result(timeout=120)
        with pytest.raises(pickle.PicklingError, match="argument 0 of task length .*could not be pickled"):
            unpicklable_argument.result(timeout=120)
        for future in unloadable:
            with pytest.raises(pickle.UnpicklingError, match="maybe_unloadable could not be unpickled here.*does not unpickle"):
                future.result(timeout=120)
        # Nothing broke: the pool still runs tasks, on the same workers.
        assert executor.submit(tasks.add, 40, 2).result(timeout=120) == 42
    assert len(_batches(sent)) >= 5, "these tasks did not leave in batches"


def test_held_tasks_can_be_cancelled_and_never_run(joblib_backend: BaseParallelBackend, tmp_path: Path) -> None:
    door = tmp_path / "door"
    ran = tmp_path / "ran"
    ran.mkdir()
    with joblib_backend.executor(cancel_futures="NONE") as executor:
        doors = _doors(executor, door)
        touching = [executor.submit(tasks.touch, str(ran / str(i)), i) for i in range(40)]
        assert all(f.cancel() for f in touching[::2]), "a held task could not be cancelled"
        assert _held(joblib_backend) == 20
        door.touch()
        assert [f.result(timeout=120) for f in touching[1::2]] == list(range(1, 40, 2))
        [f.result(timeout=120) for f in doors]
    assert sorted(int(p.name) for p in ran.iterdir()) == list(range(1, 40, 2))
    assert all(len(p.read_text().splitlines()) == 1 for p in ran.iterdir())


def test_running_stops_what_runs_and_runs_its_batch_mates_once(
    joblib_backend: BaseParallelBackend, sent: List[Tuple[str, List[Any]]], tmp_path: Path
) -> None:
    """Tasks that wait in a batch behind a running task are pending, not running: the
    ``RUNNING`` policy must run them (once), and cancel only what had started."""
    door, gate, opened = tmp_path / "door", tmp_path / "gate", tmp_path / "open"
    ran = tmp_path / "ran"
    ran.mkdir()
    opened.touch()
    with joblib_backend.executor(cancel_futures="RUNNING") as executor:
        # The pace of append_then_wait, measured with its gate open: quick.
        [f.result(timeout=120) for f in [executor.submit(tasks.append_then_wait, str(tmp_path / "warm"), str(opened)) for _ in range(50)]]
        doors = _doors(executor, door)
        waiting = [executor.submit(tasks.append_then_wait, str(ran / str(i)), str(gate), 120.0, i) for i in range(60)]
        assert _held(joblib_backend) == 60
        door.touch()
        assert wait_until(lambda: len(list(ran.iterdir())) == 2, 60), "no batch started"
        assert _batches(sent), "the held tasks did not leave in batches"
        threading.Timer(2.0, gate.touch).start()  # (the tasks given back then run to their end)
    assert [f.result(timeout=0) for f in doors] == ["door"] * DEPTH
    cancelled = [i for i, f in enumerate(waiting) if f.cancelled()]
    assert len(cancelled) == 2, f"only the two running tasks should be cancelled, not {cancelled}"
    assert [f.result(timeout=0) for i, f in enumerate(waiting) if i not in cancelled] == [i for i in range(60) if i not in cancelled]
    runs = {i: len((ran / str(i)).read_text().splitlines()) for i in range(60)}
    assert set(runs.values()) == {1}, f"a task ran twice or never: {runs}"
    assert _held(joblib_backend) == 0


def test_a_crash_in_a_batch_fails_its_task_and_runs_no_task_twice(joblib_backend: BaseParallelBackend, tmp_path: Path) -> None:
    door = tmp_path / "door"
    ran = tmp_path / "ran"
    ran.mkdir()

    def touching(numbers: range) -> List[Any]:
        return [executor.submit(tasks.touch_or_exit, str(ran / str(i)), i, i == 60) for i in numbers]

    with joblib_backend.executor(cancel_futures="NONE") as executor:
        [f.result(timeout=120) for f in [executor.submit(tasks.touch_or_exit, str(tmp_path / "warm"), 0, False) for _ in range(50)]]
        doors = _doors(executor, door)
        futures = touching(range(121))
        assert _held(joblib_backend) == 121
        door.touch()
        assert isinstance(futures[60].exception(timeout=120), WorkerCrashedError)
        outcomes = [f.exception(timeout=120) or f.result() for f in doors + futures[:60] + futures[61:]]
    expected = ["door"] * DEPTH + [i for i in range(121) if i != 60]
    assert all(isinstance(o, NeighborCrashedError) or o == e for o, e in zip(outcomes, expected)), outcomes
    assert sum(isinstance(o, NeighborCrashedError) for o in outcomes) < 60, "the crash failed far more than its batch"
    for i in range(121):
        runs = len((ran / str(i)).read_text().splitlines()) if (ran / str(i)).exists() else 0
        outcome = futures[i].exception() or futures[i].result()
        assert runs == 1 if outcome == i else runs <= 1, f"task {i} ran {runs} times ({outcome!r})"


def test_slow_tasks_are_not_batched_after_quick_ones(
    joblib_backend: BaseParallelBackend, sent: List[Tuple[str, List[Any]]]
) -> None:
    """The pace is each function's, and it follows a slower task at once: a function
    that turns slow can have only the batches already out when its first slow one
    came back (at most 2 * size + 1)."""
    with joblib_backend.executor(cancel_futures="NONE") as executor:
        [f.result(timeout=120) for f in [executor.submit(tasks.add, i) for i in range(500)]]
        [f.result(timeout=120) for f in [executor.submit(tasks.sleep_then, 0.0, i) for i in range(500)]]
        assert _batches(sent), "the quick tasks were not batched"
        del sent[:]
        other = [executor.submit(tasks.span, 0.05) for _ in range(20)]  # a new function: unmeasured
        slower = [executor.submit(tasks.sleep_then, 0.05, i) for i in range(40)]  # a known one, slower now
        assert all(end - start >= 0.05 for start, end in [f.result(timeout=120) for f in other])
        assert [f.result(timeout=120) for f in slower] == list(range(40))
    assert not [args for args in _batches(sent) if len(args[0]) == 1], "tasks of a slow function were batched"
    slow_batches = [args for args in _batches(sent) if args[0][0] != 0]
    assert len(slow_batches) <= DEPTH, f"the pace did not follow the slower tasks: {slow_batches}"


def test_large_arguments_go_alone_and_a_smaller_executors_tasks_are_not_held(
    joblib_backend: BaseParallelBackend, sent: List[Tuple[str, List[Any]]], tmp_path: Path
) -> None:
    door, other_door = tmp_path / "door", tmp_path / "other door"
    with joblib_backend.executor(max_workers=1) as smaller, joblib_backend.executor(cancel_futures="NONE") as executor:
        # A smaller executor bounds its own tasks and sends them straight to loky: they
        # do not count against held tasks.
        blocking = smaller.submit(tasks.wait_for_file, str(other_door), 120.0, "door")
        quick = [executor.submit(tasks.add, i, 1) for i in range(3)]
        assert _held(joblib_backend) == 0, "tasks were held behind a smaller executor's"
        other_door.touch()
        [f.result(timeout=120) for f in [executor.submit(tasks.length, b"xy") for i in range(20)]]
        doors = _doors(executor, door)
        big = bytes(1 << 20)
        large = [executor.submit(tasks.length, big) for _ in range(3)]
        small = [executor.submit(tasks.length, b"x") for _ in range(3)]
        assert _held(joblib_backend) == 6, "tasks were sent past the held tasks' calls"
        del sent[:]
        door.touch()
        assert [f.result(timeout=120) for f in large] == [1 << 20] * 3
        assert [f.result(timeout=120) for f in small + quick] == [1, 1, 1, 1, 2, 3]
        [f.result(timeout=120) for f in [blocking, *doors]]
    assert [kind for kind, args in sent if any(a and a[0] is big for a in args)] == ["plain"] * 3, sent


def test_pending_cancels_what_waits_and_lets_only_size_calls_wait_ahead(
    joblib_backend: BaseParallelBackend, sent: List[Tuple[str, List[Any]]], tmp_path: Path
) -> None:
    """A ``PENDING`` executor of the pool's size hands every task over at once too: what
    the pool holds is what no worker has, and that is what ``PENDING`` cancels. Slow
    tasks go alone, so no more of them wait at the workers than under an executor that
    hands over ``2 * max_workers`` at a time."""
    door = tmp_path / "door"
    runs = tmp_path / "runs"
    runs.mkdir()
    executor = joblib_backend.executor(cancel_futures="PENDING")
    with executor:
        assert [f.result(timeout=120) for f in [executor.submit(tasks.add, i, 1) for i in range(200)]] == list(range(1, 201))
        doors = [executor.submit(tasks.wait_for_file, str(door), 120.0, "door") for _ in range(DEPTH)]
        waiting = [executor.submit(tasks.note_run, str(runs), i) for i in range(50)]
        assert _held(joblib_backend) == 50, "tasks were sent past the held tasks' calls"
        assert all(f.running() for f in doors + waiting), "handed over: the engine may still give them back"
        waiting[10].cancel()
        assert waiting[10].cancelled() and _held(joblib_backend) == 49
        executor.shutdown(wait=False)  # PENDING: takes back what the pool holds
        assert all(f.cancelled() for f in waiting), "a held task was not cancelled"
        door.touch()
    # A door loky had not yet moved to its workers' queue was taken back too.
    assert all(f.cancelled() or f.result(timeout=0) == "door" for f in doors)
    assert not list(runs.iterdir()), "a cancelled task ran"
    assert [kind for kind, args in sent if any(a[:1] == (str(door),) for a in args)] == ["alone"] * DEPTH


def test_tasks_with_handle_arguments_go_alone(joblib_backend: BaseParallelBackend, sent: List[Tuple[str, List[Any]]]) -> None:
    """A handle's value is known only once it is resolved, so however small it looks,
    its task is never batched."""
    values = [joblib_backend.put(bytes(300_000)) for _ in range(30)]
    with joblib_backend.executor(cancel_futures="PENDING") as executor:
        [f.result(timeout=120) for f in [executor.submit(tasks.length, b"x") for _ in range(50)]]  # a known pace
        del sent[:]
        assert [f.result(timeout=120) for f in [executor.submit(tasks.length, v) for v in values]] == [300_000] * 30
    assert [kind for kind, _ in sent] == ["plain"] * 30, sent


def test_after_a_crash_pending_still_lets_only_size_calls_wait_ahead(joblib_backend: BaseParallelBackend, tmp_path: Path) -> None:
    """Tasks run again after a crash go first of the held tasks, within the pool's calls
    for them: ``PENDING`` then still cancels all but ``size`` calls waiting at the
    workers, and no task runs twice."""
    door, bomb, later = tmp_path / "door", tmp_path / "bomb", tmp_path / "later"
    runs = tmp_path / "runs"
    runs.mkdir()
    executor = joblib_backend.executor(cancel_futures="PENDING")
    with executor:
        started = [tmp_path / f"started{i}" for i in range(2)]
        doomed = [executor.submit(tasks.wait_or_exit, str(door), str(bomb), 120.0, str(s)) for s in started]
        queued = [executor.submit(tasks.wait_for_file, str(later), 120.0, "later") for _ in range(2)]
        waiting = [executor.submit(tasks.note_run, str(runs), i) for i in range(20)]
        assert _held(joblib_backend) == 20
        assert wait_until(lambda: all(s.exists() for s in started), 60)
        bomb.touch()  # both running tasks end their workers: the two queued ones run again
        assert all(isinstance(f.exception(timeout=60), WorkerCrashedError) for f in doomed)
        # The reruns and then two of the waiting tasks fill the new pool's 2 * size calls.
        assert wait_until(lambda: _held(joblib_backend) == 18, 30), f"{_held(joblib_backend)} held, not 18"
        executor.shutdown(wait=False)
        later.touch()
    assert [f.result(timeout=0) for f in queued] == ["later", "later"]
    kept = [i for i, f in enumerate(waiting) if not f.cancelled()]
    assert len(kept) <= 2, f"{kept} were not cancelled: more than size calls waited ahead"
    ran = sorted(int(line) for record in runs.iterdir() for line in record.read_text().split())
    assert ran == [i for i in kept if waiting[i].result(timeout=0) == i], "a cancelled task ran, or one ran twice"


def test_ctrl_c_in_a_pending_block_says_what_ran_and_what_never_started(
    joblib_backend: BaseParallelBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool holds what a ``PENDING`` executor handed over: on Ctrl-C the warning
    counts as running only the tasks that ran, not every task handed over."""
    beats = [tmp_path / f"beat{i}" for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="parallel_hydra.executor"):
        with pytest.raises(KeyboardInterrupt):
            with joblib_backend.executor(cancel_futures="PENDING") as executor:
                running = [executor.submit(tasks.heartbeat, str(beat), 120.0) for beat in beats]
                queued = [executor.submit(tasks.heartbeat, str(tmp_path / f"queued{i}"), 120.0) for i in range(2)]
                held = [executor.submit(tasks.add, i, 1) for i in range(30)]
                assert wait_until(lambda: all(beat.exists() for beat in beats), 60)
                raise KeyboardInterrupt
    assert all(f.cancelled() for f in running + queued + held)
    assert "interrupted: stopped 2 running task(s) and cancelled 32 that had not started (policy ALL)" in caplog.text
    assert not any((tmp_path / f"queued{i}").exists() for i in range(2)), "a task queued behind the running ones ran"


def test_a_large_array_result_arrives_whole_and_writable(joblib_backend: BaseParallelBackend) -> None:
    """Results travel pickled on their own, their buffers out of band: an array arrives
    as it left, writable, whether its task went alone or in a batch."""
    with joblib_backend.executor(cancel_futures="NONE") as executor:
        small = [executor.submit(tasks.ones, 3) for _ in range(200)]
        large = [executor.submit(tasks.ones, 1 << 20) for _ in range(4)]
        for future in small + large:
            array = future.result(timeout=120)
            assert array.flags.writeable and float(array.sum()) == array.size
            array[0] = 2.0


BATCHING_APP = """\
import sys
from parallel_hydra import init_parallel_backend


def add(a, b):
    return a + b


if __name__ == "__main__":
    with init_parallel_backend({"backend": "joblib", "n_cpus": 2}) as backend:
        with backend.executor(cancel_futures="NONE") as executor:
            rounds = 0
            while True:
                futures = [executor.submit(add, i, 1) for i in range(20000)]
                assert [f.result() for f in futures] == [i + 1 for i in range(20000)]
                rounds += 1
                if rounds == 2:
                    print("BATCHING", flush=True)
"""


def test_ctrl_c_while_tasks_leave_in_batches_ends_the_app_and_its_workers(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(BATCHING_APP)
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=app_env(**{MARKER: marker}), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "BATCHING", "the app never got going"
    finally:
        output, elapsed = interrupt_group(proc)
    assert proc.returncode != 0 and "KeyboardInterrupt" in output, output[-3000:]
    assert elapsed < 30, f"Ctrl-C took {elapsed:.1f} s to stop the app"
    assert leftovers(marker) == [], "the app left processes running after Ctrl-C"


def test_a_crash_beside_a_worker_busy_with_batches_runs_no_task_twice(tmp_path: Path) -> None:
    """A pool of 7: six workers wait (another executor's tasks), one works through
    batches, and one of the waiting ones dies. Every task the busy worker started, also
    those whose results were on their way, must count as started: the pool keeps its
    batched tasks in loky within what the start log remembers of a worker."""
    from parallel_hydra.backends.joblib import _LokyPool
    from parallel_hydra.backends.loky_batch import Pace
    from parallel_hydra.start_log import StartLog

    door, bomb, runs = tmp_path / "door", tmp_path / "bomb", tmp_path / "runs"
    runs.mkdir()
    log = StartLog()
    pool = _LokyPool(7, 300, log, {})
    outcomes: dict = {}
    lock = threading.Lock()

    def report(i: int) -> Callable[[bool, Any], None]:
        def on_done(ok: bool, value: Any) -> None:
            with lock:
                outcomes[i] = (ok, value)
        return on_done

    try:
        waiting = [pool.start(tasks.wait_or_exit, (str(door), str(bomb)), {}, lambda ok, v: None, None, False) for _ in range(6)]
        numbers = {task.call.number for task in waiting}

        def arm() -> None:
            # Only once all six wait (on a busy machine the pool's workers start late,
            # and a waiting task started after the bomb, again and again on each new
            # pool, would break the pool more times than tasks are run again).
            def all_waiting() -> bool:
                processes = list(getattr(pool._pool, "_processes", {}) or {})
                return numbers <= set().union(set(), *(log.recently_started_by(pid) for pid in processes))

            wait_until(all_waiting, 60)
            time.sleep(0.2)  # batches on their way to the seventh worker
            bomb.touch()

        pace = Pace()
        pace.note(1e-6, 10)  # known quick: batched from the start
        threading.Thread(target=arm, daemon=True).start()
        n = 20000
        for i in range(n):
            pool.start(tasks.note_run, (str(runs), i), {}, report(i), pace, True)
        assert wait_until(lambda: len(outcomes) == n, 120), f"only {len(outcomes)} of {n} tasks settled"
    finally:
        door.touch()
        pool.shutdown()
        log.close()
    counts: dict = {}
    for record in runs.iterdir():
        for line in record.read_text().split():
            counts[int(line)] = counts.get(int(line), 0) + 1
    assert not {i: c for i, c in counts.items() if c > 1}, "tasks ran twice"
    for i, (ok, value) in outcomes.items():
        assert (ok and value == i and counts.get(i) == 1) or isinstance(value, NeighborCrashedError), (i, value)


LOKY_PICKLER_APP = """\\
import numpy as np
from parallel_hydra import init_parallel_backend

with init_parallel_backend({"backend": "joblib", "n_cpus": 2}) as backend:
    with backend.executor(cancel_futures="NONE") as executor:
        futures = [executor.submit(np.arange, 3) for _ in range(50)] + [executor.submit(np.ones, 1 << 18)]
        results = [f.result(timeout=60) for f in futures]
assert all(list(r) == [0, 1, 2] for r in results[:50]) and results[50].sum() == 1 << 18
assert results[50].flags.writeable
print("ALL WELL")
"""


def test_results_travel_when_loky_pickles_with_plain_pickle(tmp_path: Path) -> None:
    # LOKY_PICKLER=pickle: loky's pickler then speaks protocol 4, which cannot carry the
    # buffers of a result pickled out of band as they are.
    script = tmp_path / "app.py"
    script.write_text(LOKY_PICKLER_APP)
    done = subprocess.run([sys.executable, str(script)], env=app_env(LOKY_PICKLER="pickle"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ALL WELL" in done.stdout, done.stdout + done.stderr


def test_a_slow_done_callback_while_many_lone_tasks_go_to_loky_hangs_nothing(
    joblib_backend: BaseParallelBackend, tmp_path: Path
) -> None:
    """A done-callback runs on loky's thread; while it takes its time, this thread hands
    loky more calls than its wakeup pipe holds (16,384), and blocks writing to it. loky's
    thread, once back, must not wait for anything that thread holds."""
    door = tmp_path / "door"
    slow_started = threading.Event()

    def slow(_: Any) -> None:
        if not slow_started.is_set():
            slow_started.set()
            threading.Event().wait(3.0)  # a progress bar, a log write to a slow disk...

    with joblib_backend.executor(cancel_futures="NONE") as executor:
        [f.result(timeout=60) for f in [executor.submit(tasks.add, i, 1) for i in range(200)]]
        gated = [executor.submit(tasks.wait_for_file, str(door), 60.0, i) for i in range(4)]
        for future in gated:
            future.add_done_callback(slow)
        door.touch()
        assert slow_started.wait(30)
        handle = joblib_backend.put(1)
        lone = [executor.submit(tasks.add, handle, i) for i in range(20000)]  # a handle: each its own loky call
        assert [f.result(timeout=120) for f in lone] == [1 + i for i in range(20000)]


def test_a_crash_beside_a_task_whose_repr_raises_settles_every_task(
    joblib_backend: BaseParallelBackend, tmp_path: Path
) -> None:
    door, bomb = tmp_path / "door", tmp_path / "bomb"
    with joblib_backend.executor(cancel_futures="NONE") as executor:
        crash = executor.submit(tasks.wait_or_exit, str(door), str(bomb))
        odd = executor.submit(tasks.BadRepr(), str(door))
        assert wait_until(lambda: crash.running() and odd.running(), 30)
        threading.Event().wait(1.0)  # both started
        quick = [executor.submit(tasks.wait_for_file, str(door), 60.0, i) for i in range(100)]
        bomb.touch()
        assert isinstance(crash.exception(timeout=60), WorkerCrashedError)
        door.touch()
        assert isinstance(odd.exception(timeout=60), NeighborCrashedError)
        assert [f.result(timeout=60) for f in quick] == list(range(100))
