"""Field failures of the Dask backend: a scheduler that dies, workers that crash, data
that cannot be pickled, Ctrl-C, and what the backend must not keep alive.

Every test runs real Dask: the session's ``LocalCluster`` backend, the session's
external cluster, or (where a scheduler is killed) a scheduler and workers of its own,
each in a process group that the test stops at the end.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from concurrent.futures import wait as futures_wait
from pathlib import Path
from typing import Any, Iterator, List

import pytest

import tasks
from apps import MARKER, leftovers, wait_for_path, wait_until
from dask_support import DaskTestCluster, _start_cluster, _stop_group
from parallel_hydra import CancellationPolicy
from parallel_hydra.backends.dask import DaskParallelBackend
from parallel_hydra.errors import EngineLostError, NeighborCrashedError, WorkerCrashedError

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


# -- task functions (workers import this module by name) ----------------------------


def note_then_die(path: str, how: str) -> None:
    """Append a line to ``path`` (one per run), then take the worker process down."""
    with open(path, "a") as notes:
        notes.write("ran\n")
    if how == "os._exit":
        os._exit(3)
    if how == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        import ctypes

        ctypes.string_at(0)
    if how == "sys.exit":
        sys.exit(4)


def note_pid_then_return_when(path: str, go: str) -> int:
    """Append this worker's pid to ``path`` (one line per run), wait for the file ``go``
    to exist, then return the pid."""
    with open(path, "a") as notes:
        notes.write(f"{os.getpid()}\n")
    end = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < end:
        time.sleep(0.01)
    return os.getpid()


def fail_the_first_time(path: str) -> str:
    """Raise on the first run (noted in ``path``), succeed on the next."""
    with open(path, "a") as notes:
        notes.write("ran\n")
    if len(Path(path).read_text().splitlines()) == 1:
        raise ValueError("first run")
    return "second run"


def append_line(path: str, line: str) -> str:
    with open(path, "a") as notes:
        notes.write(line + "\n")
    return line


def make_lock() -> Any:
    return threading.Lock()


class _KillsWhenPickled:
    def __reduce__(self) -> Any:
        os._exit(7)


def make_pickle_bomb() -> Any:
    return _KillsWhenPickled()


def takes_func(x: int, func: int = 0, key: int = 0, pure: int = 0) -> int:
    return x + func + key + pure


# -- helpers ------------------------------------------------------------------------


def _lines(path: Path) -> List[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[DaskTestCluster]:
    """A scheduler and two 1-thread workers that only this test uses (it may kill them)."""
    workdir = tmp_path / "cluster"
    workdir.mkdir()
    cluster = _start_cluster(workdir)
    try:
        yield cluster
    finally:
        for process in reversed(cluster.processes):
            _stop_group(process)


# -- 1. the scheduler dies ----------------------------------------------------------


def test_a_dead_scheduler_fails_every_task_promptly_naming_its_address(own_cluster: DaskTestCluster, tmp_path: Path) -> None:
    address = own_cluster.address
    backend = DaskParallelBackend(address=address, connect_timeout=5)
    try:
        executor = backend.executor(max_workers=2)
        beats = [tmp_path / f"beat{i}" for i in range(20)]
        futures = [executor.submit(tasks.heartbeat, str(beat), 3.0) for beat in beats]
        wait_for_path(beats[0])
        os.killpg(own_cluster.processes[0].pid, signal.SIGKILL)  # the scheduler
        killed = time.monotonic()

        done, not_done = futures_wait(futures, timeout=20)
        settled = time.monotonic() - killed
        assert not not_done, f"{len(not_done)} future(s) never settled"
        assert settled < 10
        errors = [f.exception() for f in futures]
        assert all(isinstance(e, EngineLostError) for e in errors), {type(e).__name__ for e in errors}
        assert all(address in str(e) for e in errors)
        assert any(e.__cause__ is not None for e in errors)  # Dask's own error is kept

        with pytest.raises(EngineLostError, match=address):
            executor.submit(tasks.add, 1, 2)
        started = time.monotonic()
        executor.shutdown()
        assert time.monotonic() - started < 5
        with pytest.raises(EngineLostError, match=address):
            backend.executor()
        with pytest.raises(EngineLostError, match=address):
            backend.effective_n_jobs(-1)
    finally:
        started = time.monotonic()
        backend.shutdown()
        assert time.monotonic() - started < 15


def test_a_task_started_on_a_lost_client_fails_with_engine_lost(own_cluster: DaskTestCluster) -> None:
    backend = DaskParallelBackend(address=own_cluster.address, connect_timeout=5)
    try:
        executor = backend.executor(max_workers=2)
        assert executor.submit(tasks.add, 1, 2).result(timeout=60) == 3
        os.killpg(own_cluster.processes[0].pid, signal.SIGKILL)
        assert wait_until(lambda: backend.client.status != "running", 10)
        future = executor.submit(tasks.add, 1, 2)
        assert isinstance(future.exception(timeout=10), EngineLostError)
        assert own_cluster.address in str(future.exception())
        started = time.monotonic()
        executor.shutdown()
        assert time.monotonic() - started < 5
    finally:
        started = time.monotonic()
        backend.shutdown()
        assert time.monotonic() - started < 15


# -- 2. a task kills its worker -----------------------------------------------------


@pytest.mark.parametrize(
    "how, death",
    [("os._exit", "exit code 3"), ("SIGKILL", "SIGKILL"), ("segfault", "SIGSEGV"), ("sys.exit", "exit code")],
)
def test_a_task_that_kills_its_worker_fails_alone_and_at_once(
    dask_backend: DaskParallelBackend, tmp_path: Path, how: str, death: str
) -> None:
    notes = tmp_path / "notes"
    with dask_backend.executor(max_workers=2) as executor:
        crash = executor.submit(note_then_die, str(notes), how)
        others = [executor.submit(tasks.sleep_then, 0.3, i) for i in range(6)]
        error = crash.exception(timeout=60)
        assert isinstance(error, WorkerCrashedError), repr(error)
        assert "note_then_die" in str(error) and death in str(error)
        assert type(error.__cause__).__name__ == "KilledWorker"
        # The tasks queued behind it on the same worker were run again, or finished.
        assert [f.result(timeout=60) for f in others] == list(range(6))
    assert _lines(notes) == ["ran"]  # not retried on other workers
    with dask_backend.executor() as executor:  # the backend stays usable, and whole
        assert list(executor.map(tasks.add, [1, 2], [3, 4])) == [4, 6]
    assert dask_backend.effective_n_jobs(-1) == 2


def test_a_killed_worker_on_a_cluster_by_address_is_a_worker_crash_and_its_task_runs_once(
    own_cluster: DaskTestCluster, tmp_path: Path
) -> None:
    """Dask gives a task whose worker died to another worker (allowed-failures times);
    the task had started, so the scheduler's claim makes that second run refuse."""
    with DaskParallelBackend(address=own_cluster.address, connect_timeout=30) as backend:
        for how in ("os._exit", "sys.exit"):  # (SystemExit passes through the task's wrapper)
            notes = tmp_path / f"notes-{how}"
            with backend.executor(max_workers=2) as executor:
                error = executor.submit(note_then_die, str(notes), how).exception(timeout=120)
                assert isinstance(error, WorkerCrashedError), (how, repr(error))
                assert "task note_then_die had already started" in str(error), (how, str(error))
                assert "not run a second time" in str(error), how
                assert executor.submit(tasks.add, 1, 2).result(timeout=60) == 3
            assert _lines(notes) == ["ran"], how  # once, not once per allowed failure


def test_an_executor_of_a_whole_joined_cluster_hands_dask_every_task_at_once(
    dask_cluster_address: str, tmp_path: Path
) -> None:
    """With no max_workers and no n_cpus, the cluster's own size is the bound: under
    NONE every task goes to the scheduler at once (no round trip per task), as with
    Dask's own submit. A max_workers of the caller's is still kept."""
    with DaskParallelBackend(address=dask_cluster_address, connect_timeout=30) as backend:
        for max_workers, handed in ((None, 6), (2, 2)):
            gate = tmp_path / f"gate-{max_workers}"
            with backend.executor(max_workers=max_workers, cancel_futures="NONE") as executor:
                futures = [executor.submit(tasks.wait_for_file, str(gate), 60.0, i) for i in range(6)]
                try:
                    assert wait_until(lambda: len(backend.client.futures) >= handed, 10)
                    time.sleep(0.5)
                    assert len(backend.client.futures) == handed, (max_workers, len(backend.client.futures))
                finally:
                    gate.touch()
                assert [f.result(timeout=60) for f in futures] == list(range(6))
        # The tasks' run claims go when the scheduler forgets the tasks: none is left.
        assert wait_until(lambda: backend.client.run_on_scheduler(_run_claims_left) == 0, 10)


def note_then_nap(path: str, i: int) -> int:
    """Append ``i`` to ``path``; the first item raises, the others take 0.3 s."""
    with open(path, "a") as notes:
        notes.write(f"{i}\n")
    if i == 0:
        raise ValueError("item 0")
    time.sleep(0.3)
    return i


def test_a_whole_joined_cluster_executor_still_takes_back_what_no_worker_started(
    dask_cluster_address: str, tmp_path: Path
) -> None:
    """Handing every task to the scheduler at once must not cost cancellation: a map
    abandoned at its first item cancels what waits on the scheduler, and RUNNING stops
    only the tasks that run (on a joined cluster: cancels them) while the rest run on."""
    notes = tmp_path / "notes"
    with DaskParallelBackend(address=dask_cluster_address, connect_timeout=30) as backend:
        with backend.executor(cancel_futures="NONE") as executor:
            assert executor._limit == float("inf")
            with pytest.raises(ValueError, match="item 0"):
                list(executor.map(note_then_nap, [str(notes)] * 20, range(20), chunksize=1))
        ran = len(_lines(notes))
        assert ran <= 8, f"{ran} of 20 tasks ran after the map was abandoned at its first item"
        executor = backend.executor(cancel_futures="RUNNING")
        futures = [executor.submit(tasks.sleep_then, 0.3, i) for i in range(10)]
        time.sleep(0.5)
        executor.shutdown()
        cancelled = [f for f in futures if f.cancelled()]
        assert 1 <= len(cancelled) <= 4, f"{len(cancelled)} of 10 cancelled: RUNNING must leave pending tasks to run"
        assert all(f.result(timeout=60) == i for i, f in enumerate(futures) if not f.cancelled())


def _run_claims_left(dask_scheduler: Any) -> int:
    return len(dask_scheduler.plugins["parallel_hydra-run-claims"]._taken)


def test_a_scheduler_that_cannot_import_parallel_hydra_is_warned_of_and_still_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the run-claims plugin (the scheduler lacks parallel_hydra) the backend
    says so once, naming the address; whole-cluster executors then keep their queue
    (nothing could be taken back from the scheduler)."""
    import json

    from dask_support import _dask_command

    preload = tmp_path / "no_parallel_hydra.py"
    preload.write_text("import sys\nsys.modules['parallel_hydra'] = None  # import parallel_hydra fails here\n")
    scheduler_file = tmp_path / "scheduler.json"
    with open(tmp_path / "scheduler.log", "ab") as log:
        scheduler = subprocess.Popen(
            _dask_command("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                          "--scheduler-file", str(scheduler_file), "--preload", str(preload)),
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    worker = None
    try:
        assert wait_until(lambda: scheduler_file.exists() and scheduler_file.read_text().strip(), 60)
        address = json.loads(scheduler_file.read_text())["address"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tasks.__file__).parent), os.environ.get("PYTHONPATH", "")]))
        with open(tmp_path / "worker.log", "ab") as log:
            worker = subprocess.Popen(
                _dask_command("worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
                              "--no-dashboard", "--local-directory", str(tmp_path)),
                cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        caplog.set_level("WARNING", logger="parallel_hydra.backends.dask")
        with DaskParallelBackend(address=address, connect_timeout=30) as backend:
            assert backend._claims is None
            warnings = [r.getMessage() for r in caplog.records if "run claims" in r.getMessage()]
            assert len(warnings) == 1 and address in warnings[0], warnings
            # (Tasks cannot run here: this Dask's scheduler unpickles each task, and ours
            # name parallel_hydra's wrappers.)
            with backend.executor(cancel_futures="NONE") as executor:
                assert executor._limit < float("inf")
    finally:
        if worker is not None:
            _stop_group(worker)
        _stop_group(scheduler)


def test_a_keyword_argument_named_func_reaches_the_task(dask_backend: DaskParallelBackend, dask_cluster_address: str) -> None:
    with dask_backend.executor() as executor:
        assert executor.submit(takes_func, 1, func=2, key=3, pure=4).result(timeout=60) == 10
    with DaskParallelBackend(address=dask_cluster_address, connect_timeout=30) as backend:
        with backend.executor() as executor:
            assert executor.submit(takes_func, 1, func=2).result(timeout=60) == 3
            assert executor.submit(takes_func, 1, func=2, key=3).result(timeout=60) == 6


# -- 3. finished tasks are not run again --------------------------------------------


def test_running_policy_does_not_run_finished_tasks_again(dask_backend: DaskParallelBackend, tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    beats = [tmp_path / "beat0", tmp_path / "beat1"]
    folder = dask_backend._start_log.folder

    def claims() -> set:
        return {name for name in os.listdir(folder) if name.startswith("ran.")}

    with dask_backend.executor(max_workers=2, cancel_futures=CancellationPolicy.RUNNING) as executor:
        assert [f.result(timeout=60) for f in [executor.submit(append_line, str(notes), f"x{i}") for i in range(2)]] == ["x0", "x1"]
        before = claims()
        for beat in beats:  # one long task on each worker: both workers get killed
            executor.submit(tasks.heartbeat, str(beat), 60.0)
        for beat in beats:
            wait_for_path(beat)
    time.sleep(1.0)  # a recomputation would have started by now
    assert dask_backend.effective_n_jobs(-1) == 2
    assert sorted(_lines(notes)) == ["x0", "x1"]
    assert claims() - before == set()  # the stopped tasks gave their claims back


def _lose_a_finished_result(backend: DaskParallelBackend, tmp_path: Path) -> Any:
    """Run a task to its end while the client's event loop is held (nothing reaches the
    client meanwhile), SIGKILL the worker holding its result, give the scheduler time
    to compute it again, then let go of the loop. The task's future, its worker's pid,
    and the file where each run notes its pid."""
    notes, go = tmp_path / "notes", tmp_path / "go"
    released, holding = threading.Event(), threading.Event()

    def hold_the_loop() -> None:  # runs on the client's event loop
        holding.set()
        released.wait(30)

    with backend.executor(cancel_futures="NONE") as executor:
        future = executor.submit(note_pid_then_return_when, str(notes), str(go))
        assert wait_until(lambda: len(_lines(notes)) == 1, 60)
        pid = int(_lines(notes)[0])
        backend.client.loop.add_callback(hold_the_loop)
        try:
            assert holding.wait(10)
            go.touch()  # the task ends; its result stays on its worker
            time.sleep(1.0)
            os.kill(pid, signal.SIGKILL)
            time.sleep(3.0)  # the scheduler hears of the death and computes the task again
        finally:
            released.set()
        future.exception(timeout=60)
    return future, pid, notes


def test_a_finished_task_whose_result_died_with_its_worker_is_not_run_again(tmp_path: Path) -> None:
    """Dask computes a finished task again when the worker holding its only result dies
    before the client fetched it: the second run must refuse, and say why."""
    with DaskParallelBackend(n_cpus=2) as backend:
        future, pid, notes = _lose_a_finished_result(backend, tmp_path)
        error = future.exception()
        assert isinstance(error, NeighborCrashedError), repr(error)
        assert "not run a second time" in str(error)
    assert _lines(notes) == [str(pid)]  # it ran once


def test_a_finished_task_whose_result_died_with_its_worker_on_a_cluster_by_address_is_not_run_again(
    own_cluster: DaskTestCluster, tmp_path: Path
) -> None:
    """The same on a cluster the backend only joined: the claim is kept by the scheduler."""
    with DaskParallelBackend(address=own_cluster.address, connect_timeout=30) as backend:
        future, pid, notes = _lose_a_finished_result(backend, tmp_path)
        error = future.exception()
        assert isinstance(error, WorkerCrashedError), repr(error)
        assert "not run a second time" in str(error)
    assert _lines(notes) == [str(pid)]


def test_a_task_that_raised_is_still_run_again_by_dasks_retries(tmp_path: Path, dask_cluster_address: str) -> None:
    """The claim that stops a second run of a finished task is given back when the task
    raises: ``retries`` runs it again, as Dask users expect (claims in files on a cluster
    the backend started, on the scheduler of one it joined)."""
    for name, config in (("owned", {"n_cpus": 2}), ("joined", {"address": dask_cluster_address})):
        notes = tmp_path / f"notes-{name}"
        with DaskParallelBackend(**config) as backend, backend.executor() as executor:
            assert executor.with_options(retries=1).submit(fail_the_first_time, str(notes)).result(timeout=60) == "second run"
        assert _lines(notes) == ["ran", "ran"], name


# -- 4. what cannot be pickled ------------------------------------------------------


def test_an_unpicklable_argument_or_result_fails_its_future(dask_backend: DaskParallelBackend, dask_cluster_address: str) -> None:
    with DaskParallelBackend(address=dask_cluster_address, connect_timeout=30) as joined:
        for backend in (dask_backend, joined):
            with backend.executor() as executor:
                by_position = executor.submit(tasks.length, threading.Lock())
                by_name = executor.submit(tasks.add, 1, b=threading.Lock())
                result = executor.submit(make_lock)
                fine = executor.submit(tasks.add, 1, 2)
                error = by_position.exception(timeout=60)
                assert isinstance(error, pickle.PicklingError), repr(error)
                assert "length" in str(error) and "positional argument 0" in str(error) and error.__cause__ is not None
                error = by_name.exception(timeout=60)
                assert isinstance(error, pickle.PicklingError), repr(error)
                assert "add" in str(error) and "keyword argument 'b'" in str(error)
                error = result.exception(timeout=60)
                assert isinstance(error, pickle.PicklingError), repr(error)
                assert "make_lock" in str(error) and "result" in str(error)
                assert fine.result(timeout=60) == 3


def test_a_result_whose_pickling_kills_the_worker_ends_with_an_error(dask_backend: DaskParallelBackend) -> None:
    with dask_backend.executor() as executor:
        error = executor.submit(make_pickle_bomb).exception(timeout=60)
        assert isinstance(error, WorkerCrashedError), repr(error)
        assert "make_pickle_bomb" in str(error) and "exit code 7" in str(error)
    with dask_backend.executor() as executor:
        assert executor.submit(tasks.add, 1, 2).result(timeout=60) == 3


# -- 5. an abandoned map ------------------------------------------------------------


def test_an_abandoned_map_is_withdrawn_in_one_scheduler_call(
    dask_backend: DaskParallelBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    from parallel_hydra.backends.dask import workers as dask_workers

    client = dask_backend.client
    cancel_calls: List[Any] = []
    scheduler_calls: List[int] = []
    real_run, real_cancel = client.run_on_scheduler, client.cancel

    def run_on_scheduler(function: Any, *args: Any, **kwargs: Any) -> Any:
        if function is dask_workers._cancel_on_scheduler:
            scheduler_calls.append(len(kwargs["keys"]))
        return real_run(function, *args, **kwargs)

    def cancel(futures: Any, *args: Any, **kwargs: Any) -> Any:
        cancel_calls.append(futures)
        return real_cancel(futures, *args, **kwargs)

    monkeypatch.setattr(client, "run_on_scheduler", run_on_scheduler)
    monkeypatch.setattr(client, "cancel", cancel)
    with dask_backend.executor(max_workers=2, cancel_futures=CancellationPolicy.ALL) as executor:
        results = executor.map(tasks.sleep_then, [0.2] * 40, range(40), chunksize=1)
        assert next(results) == 0
        results.close()
        assert len(scheduler_calls) == 1 and scheduler_calls[0] >= 30, scheduler_calls
    assert all(isinstance(futures, list) for futures in cancel_calls)


# -- 6. after shutdown --------------------------------------------------------------


def test_get_and_wait_after_shutdown_say_so() -> None:
    backend = DaskParallelBackend(n_cpus=1, processes=False)
    handle = backend.put([1, 2])
    assert backend.get(handle, timeout=30) == [1, 2]
    backend.shutdown()
    with pytest.raises(RuntimeError, match="the dask backend was shut down"):
        backend.get(handle)
    with pytest.raises(RuntimeError, match="the dask backend was shut down"):
        backend.wait([handle])


# -- 7. Ctrl-C ----------------------------------------------------------------------

CTRL_C_APP = """\
import os
import time
from pathlib import Path

from parallel_hydra import MapReduceJob
from parallel_hydra.backends.dask import DaskParallelBackend


def work(chunk):
    Path(os.environ["RUNNING_FLAG"]).joinpath(str(os.getpid())).touch()
    time.sleep(300)
    return chunk


if __name__ == "__main__":
    with DaskParallelBackend(n_cpus=2) as backend:
        print(MapReduceJob(list(range(4)), work, sum, config=backend, n_jobs=2)(), flush=True)
"""


def test_ctrl_c_on_an_app_running_a_map_reduce_job_exits_promptly(tmp_path: Path) -> None:
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(CTRL_C_APP))
    flags = tmp_path / "running"
    flags.mkdir()
    marker = uuid.uuid4().hex
    env = dict(os.environ, RUNNING_FLAG=str(flags), **{MARKER: marker})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    log = open(tmp_path / "app.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(app)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        assert wait_until(lambda: len(list(flags.iterdir())) == 2, 120), (tmp_path / "app.log").read_text()
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: the whole group
        interrupted = time.monotonic()
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the app did not exit within 30 s of Ctrl-C:\n{(tmp_path / 'app.log').read_text()[-3000:]}")
        elapsed = time.monotonic() - interrupted
        assert code != 0
        assert leftovers(marker) == []
        print(f"exited {elapsed:.1f} s after Ctrl-C with code {code}")
    finally:
        log.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        else:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
