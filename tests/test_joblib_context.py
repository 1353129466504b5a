"""joblib, and scikit-learn built on it, inside our backends (issue 9, parts 1 and 2).

``backend.joblib_context()`` makes ``joblib.Parallel`` run on the backend's engine,
sized by the backend; and a task may itself use joblib, scikit-learn's ``n_jobs`` or a
backend of its own. Which processes ran the work is checked by their PIDs against those
the engine reports, and "``n`` at once" by a rendezvous: each call waits until ``n``
distinct processes have arrived, which only ``n`` workers running at once can do.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import joblib
import psutil
import pytest
from joblib.parallel import get_active_backend

import tasks
from apps import MARKER, leftovers, wait_until
from conftest import ENGINES
from parallel_hydra import BaseParallelBackend, CancellationPolicy, JoblibParallelBackend, init_parallel_backend
from parallel_hydra.backend import SizedJoblibBackend
from ray_support import REPO_ROOT, app_env

TESTS = Path(__file__).resolve().parent


# -- what tasks run -------------------------------------------------------------------


def engine_of_this_process() -> str:
    """Which engine's worker this code runs in: ``ray`` (an actor or task), ``dask``,
    ``loky`` (a loky worker), else ``main``."""
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            return "ray"
    except ImportError:
        pass
    try:
        from distributed import get_worker

        get_worker()
        return "dask"
    except (ImportError, ValueError):
        pass
    from joblib.externals.loky.process_executor import _CURRENT_DEPTH

    return "loky" if _CURRENT_DEPTH > 0 else "main"


def meet(folder: str, n: int, timeout: float = 60.0) -> Tuple[int, str]:
    """Wait until ``n`` distinct processes have called this with ``folder``; return this
    process's PID and engine. Only ``n`` workers running at once get past it."""
    Path(folder, str(os.getpid())).touch()
    end = time.monotonic() + timeout
    while len(os.listdir(folder)) < n:
        if time.monotonic() > end:
            raise TimeoutError(f"only {len(os.listdir(folder))} of {n} processes met within {timeout} s")
        time.sleep(0.01)
    return os.getpid(), engine_of_this_process()


def meet_in_parallel(folder: str, n: int, n_jobs: int) -> Dict[str, Any]:
    """A task: ``joblib.Parallel(n_jobs)`` of ``n`` meetings; what ran them, and the
    warnings joblib gave (it warns when it falls back to one job)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        met = joblib.Parallel(n_jobs=n_jobs, batch_size=1)(joblib.delayed(meet)(folder, n) for _ in range(n))
    return {"pid": os.getpid(), "pids": sorted({pid for pid, _ in met}), "warnings": [str(w.message) for w in caught]}


def meet_in_own_backend(folder: str, n: int) -> Dict[str, Any]:
    """A task that starts a joblib backend of its own and meets in its workers."""
    with init_parallel_backend({"backend": "joblib", "n_cpus": n}) as inner:
        with inner.executor() as executor:
            met = list(executor.map(meet, [folder] * n, [n] * n, chunksize=1))
    return {"pid": os.getpid(), "pids": sorted({pid for pid, _ in met})}


def sum_on_own_dask() -> int:
    """A task that starts a Dask backend (a local cluster) of its own."""
    with init_parallel_backend({"backend": "dask", "n_cpus": 1}) as inner, inner.executor() as executor:
        return sum(executor.map(abs, range(-5, 5)))


def grid_search(n_jobs: Optional[int]) -> Tuple[Dict[str, Any], List[float]]:
    """A small, real scikit-learn grid search: its best parameters and mean scores."""
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    x, y = make_classification(n_samples=120, n_features=6, random_state=0)
    search = GridSearchCV(LogisticRegression(max_iter=200), {"C": [0.01, 0.1, 1.0, 10.0]}, cv=3, n_jobs=n_jobs)
    search.fit(x, y)
    return search.best_params_, [float(s) for s in search.cv_results_["mean_test_score"]]


def arrive_then_wait(folder: str, gate: str) -> None:
    """Say which process this is (a file named by its PID), then wait for ``gate``."""
    Path(folder, str(os.getpid())).touch()
    tasks.wait_for_file(gate, 120)


def wait_in_parallel(folder: str, gate: str) -> None:
    """A task whose work runs in loky workers it starts, until ``gate`` opens."""
    joblib.Parallel(n_jobs=2)(joblib.delayed(arrive_then_wait)(folder, gate) for _ in range(2))


def fail_with_boom(x: int) -> int:
    raise tasks.Boom(f"item {x}")


# -- the engine's own view of its workers ---------------------------------------------


def worker_pids(backend: BaseParallelBackend) -> Optional[set]:
    """The PIDs of the engine's worker processes as the engine reports them, where it
    can (Dask); ``None`` where the check is by the process's own view (Ray, loky)."""
    if backend.name == "dask":
        return set(backend.client.run(os.getpid).values())  # type: ignore[attr-defined]
    return None


def check_ran_on(backend: BaseParallelBackend, met: List[Tuple[int, str]]) -> None:
    """Every meeting ran in a worker of ``backend``'s engine, never in this process."""
    pids = {pid for pid, _ in met}
    assert os.getpid() not in pids
    engines = {engine for _, engine in met}
    expected = {"joblib": "loky", "ray": "ray", "dask": "dask"}[backend.name]
    assert engines == {expected}, f"ran in {engines}, not in the {backend.name} engine's workers"
    if backend.name == "joblib":  # joblib's loky pool: processes of this one
        children = {p.pid for p in psutil.Process().children()}
        assert pids <= children
    reported = worker_pids(backend)
    if reported is not None:
        assert pids <= reported, f"{pids} are not among the workers {reported} that Dask reports"


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[str]:
    """A fresh rendezvous folder."""
    path = tmp_path / uuid.uuid4().hex
    path.mkdir()
    yield str(path)


# -- 1. joblib on the chosen engine ---------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_parallel_runs_in_the_engines_workers_as_many_as_the_backend_has(
    request: pytest.FixtureRequest, engine: str, folder: str
) -> None:
    backend: BaseParallelBackend = request.getfixturevalue(f"{engine}_backend")
    n = backend.effective_n_jobs(-1)
    assert n == 2
    with backend.joblib_context():
        assert joblib.effective_n_jobs(-1) == n
        met = joblib.Parallel(n_jobs=-1, batch_size=1)(joblib.delayed(meet)(folder, n) for _ in range(n))
    check_ran_on(backend, met)
    assert len({pid for pid, _ in met}) == n


@pytest.mark.parametrize("engine", ENGINES)
def test_n_jobs_counts_as_the_backend_counts(request: pytest.FixtureRequest, engine: str) -> None:
    backend: BaseParallelBackend = request.getfixturevalue(f"{engine}_backend")
    with backend.joblib_context():
        for n_jobs in (-1, -2, 1, 2, 64):
            assert joblib.effective_n_jobs(n_jobs) == backend.effective_n_jobs(n_jobs), n_jobs
        assert joblib.effective_n_jobs(None) == 1  # unset: one job, on every engine
    with backend.joblib_context(n_jobs=-1):
        assert joblib.effective_n_jobs(None) == backend.effective_n_jobs(-1)
        assert joblib.effective_n_jobs(1) == 1


def test_n_jobs_minus_one_is_the_backends_cpus_not_the_machines() -> None:
    with JoblibParallelBackend(n_cpus=1) as backend, backend.joblib_context():
        assert joblib.effective_n_jobs(-1) == 1
        # One job: joblib runs the calls here, with no pool at all.
        assert set(joblib.Parallel(n_jobs=-1)(joblib.delayed(os.getpid)() for _ in range(3))) == {os.getpid()}


def test_n_cpus_caps_a_ray_backend_that_shares_the_session(ray_backend: BaseParallelBackend, folder: str) -> None:
    from parallel_hydra.backends.ray import RayParallelBackend

    with RayParallelBackend(n_cpus=1) as capped:  # shares the session's runtime (2 CPUs)
        with capped.joblib_context():
            assert joblib.effective_n_jobs(-1) == 1
            assert joblib.effective_n_jobs(8) == 1
    assert ray_backend.effective_n_jobs(-1) == 2


@pytest.mark.parametrize("engine", ENGINES)
def test_the_previous_joblib_config_is_back_after_the_block(request: pytest.FixtureRequest, engine: str) -> None:
    backend: BaseParallelBackend = request.getfixturevalue(f"{engine}_backend")
    other: BaseParallelBackend = request.getfixturevalue("joblib_backend")
    seen_elsewhere: List[Any] = []
    with joblib.parallel_config(backend="threading", n_jobs=3):
        with backend.joblib_context():
            active, _ = get_active_backend()
            assert isinstance(active, SizedJoblibBackend) and active._sized_by is backend
            # Another thread keeps joblib's default: the setting is this thread's.
            thread = threading.Thread(target=lambda: seen_elsewhere.append(type(get_active_backend()[0]).__name__))
            thread.start()
            thread.join()
            with other.joblib_context():  # blocks nest
                assert get_active_backend()[0]._sized_by is other
            assert get_active_backend()[0]._sized_by is backend
        assert type(get_active_backend()[0]).__name__ == "ThreadingBackend"
        assert get_active_backend()[1] == 3
        with pytest.raises(tasks.Boom):
            with backend.joblib_context():
                raise tasks.Boom("leaving by an exception")
        assert type(get_active_backend()[0]).__name__ == "ThreadingBackend"
    assert seen_elsewhere == ["LokyBackend"]
    assert type(get_active_backend()[0]).__name__ == "LokyBackend"


@pytest.mark.parametrize("engine", ENGINES)
def test_an_exception_in_a_call_surfaces_with_its_type(request: pytest.FixtureRequest, engine: str) -> None:
    backend: BaseParallelBackend = request.getfixturevalue(f"{engine}_backend")
    with backend.joblib_context():
        with pytest.raises(tasks.Boom, match="item [34]"):  # the first to fail, either
            joblib.Parallel(n_jobs=-1)(joblib.delayed(fail_with_boom)(x) for x in [3, 4])


def test_a_backend_that_was_shut_down_refuses_the_block() -> None:
    backend = JoblibParallelBackend(n_cpus=1)
    backend.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        with backend.joblib_context():
            pass
    with pytest.raises(ValueError, match="n_jobs"):
        with JoblibParallelBackend(n_cpus=1) as open_backend, open_backend.joblib_context(n_jobs=0):
            pass


def test_a_grid_search_gives_the_sequential_result_on_every_engine(
    joblib_backend: BaseParallelBackend, ray_backend: BaseParallelBackend, dask_backend: BaseParallelBackend
) -> None:
    expected = grid_search(None)
    for backend in (joblib_backend, ray_backend, dask_backend):
        with backend.joblib_context():
            best, scores = grid_search(-1)
        assert best == expected[0], backend.name
        assert scores == pytest.approx(expected[1]), backend.name


# -- by address -----------------------------------------------------------------------


def test_a_dask_cluster_reached_by_address(dask_cluster_address: str, folder: str) -> None:
    from parallel_hydra.backends.dask import DaskParallelBackend

    with DaskParallelBackend(address=dask_cluster_address, connect_timeout=30) as backend:
        with backend.joblib_context():
            assert joblib.effective_n_jobs(-1) == 2
            met = joblib.Parallel(n_jobs=-1, batch_size=1)(joblib.delayed(meet)(folder, 2) for _ in range(2))
        check_ran_on(backend, met)
        assert len({pid for pid, _ in met}) == 2
    with DaskParallelBackend(address=dask_cluster_address, connect_timeout=30, n_cpus=1) as capped:
        with capped.joblib_context():
            assert joblib.effective_n_jobs(-1) == 1


RAY_BY_ADDRESS_APP = """
import json, os, sys, time
from pathlib import Path
from typing import Tuple
import joblib
import ray
from parallel_hydra import RayParallelBackend

{functions}

with RayParallelBackend(address={address!r}, connect_timeout=30) as backend:
    with backend.joblib_context():
        n = joblib.effective_n_jobs(-1)
        met = joblib.Parallel(n_jobs=-1, batch_size=1)(joblib.delayed(meet)({folder!r}, n) for _ in range(n))
        where = joblib.Parallel(n_jobs=2)(
            joblib.delayed(lambda: ray.get_runtime_context().gcs_address)() for _ in range(2))
    print("RESULT", json.dumps(dict(n=n, expected=backend.effective_n_jobs(-1), met=met, app=os.getpid(),
                                    where=where, head=ray.get_runtime_context().gcs_address)))
"""


def test_a_ray_cluster_reached_by_address(ray_cluster_address: str, folder: str) -> None:
    import json

    marker = uuid.uuid4().hex
    # The app's own functions travel by value: the cluster's workers need not import this file.
    functions = "\n\n".join(inspect.getsource(fn) for fn in (engine_of_this_process, meet))
    code = RAY_BY_ADDRESS_APP.format(functions=functions, address=ray_cluster_address, folder=folder)
    run = subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), env=app_env(**{MARKER: marker}),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("RESULT")]
    result = json.loads(line.split(" ", 1)[1])
    assert result["n"] == result["expected"] == 2
    assert {engine for _, engine in result["met"]} == {"ray"}
    assert len({pid for pid, _ in result["met"]}) == 2 and result["app"] not in {pid for pid, _ in result["met"]}
    # The actors ran on the cluster the backend joined, not on a runtime of their own.
    assert set(result["where"]) == {result["head"]}
    assert result["head"].endswith(ray_cluster_address.rsplit(":", 1)[1])
    assert leftovers(marker, grace=30.0) == []


# -- 2. nested parallelism ------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_a_task_may_use_joblib_and_a_backend_of_its_own(request: pytest.FixtureRequest, engine: str, tmp_path: Path) -> None:
    backend: BaseParallelBackend = request.getfixturevalue(f"{engine}_backend")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with backend.executor(max_workers=2) as executor:
        by_joblib = executor.submit(meet_in_parallel, str(tmp_path / "a"), 2, 2)
        by_backend = executor.submit(meet_in_own_backend, str(tmp_path / "b"), 2)
        searched = executor.submit(grid_search, 2)
        for outcome in (by_joblib.result(timeout=120), by_backend.result(timeout=120)):
            assert len(outcome["pids"]) == 2 and outcome["pid"] not in outcome["pids"], outcome
        assert by_joblib.result()["warnings"] == []
        best, scores = searched.result(timeout=120)
        expected = grid_search(None)
        assert best == expected[0] and scores == pytest.approx(expected[1])


def test_a_restarted_dask_worker_may_start_processes_too(dask_backend: BaseParallelBackend, tmp_path: Path) -> None:
    import multiprocessing

    gate = tmp_path / "never"
    executor = dask_backend.executor(max_workers=2, cancel_futures=CancellationPolicy.RUNNING)
    with executor:
        # A task that started loky workers, stopped for real: its worker is killed, and
        # the processes it started with it; its nanny starts a fresh worker.
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        stuck = executor.submit(wait_in_parallel, str(tmp_path / "b"), str(gate))
        assert wait_until(lambda: len(os.listdir(tmp_path / "b")) == 2, 60), "the task's loky workers never ran"
        grandchildren = {int(name) for name in os.listdir(tmp_path / "b")}
        ours = {p.pid for p in psutil.Process().children(recursive=True)}
        assert grandchildren <= ours
    assert stuck.cancelled()
    assert wait_until(lambda: not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                                      for pid in grandchildren), 10), "the killed task's processes live on"
    # Every worker, the fresh one too, may have children.
    assert set(dask_backend.client.run(lambda: multiprocessing.current_process().daemon).values()) == {False}
    with dask_backend.executor(max_workers=2) as again:
        outcome = again.submit(meet_in_parallel, str(tmp_path / "a"), 2, 2).result(timeout=120)
    assert len(outcome["pids"]) == 2 and outcome["warnings"] == []


def test_on_a_dask_cluster_reached_by_address_joblib_falls_back_to_one_job(dask_cluster_address: str, tmp_path: Path) -> None:
    from parallel_hydra.backends.dask import DaskParallelBackend

    with DaskParallelBackend(address=dask_cluster_address, connect_timeout=30) as backend:
        with backend.executor() as executor:
            outcome = executor.submit(meet_in_parallel, str(tmp_path), 1, 2).result(timeout=120)
    # `dask worker` starts daemonic workers (see the README): joblib says so, and runs.
    assert outcome["pids"] == [outcome["pid"]]
    assert any("daemon" in message for message in outcome["warnings"])


NESTED_DASK_APP = """
import os, sys, time
from pathlib import Path
import joblib
from parallel_hydra import init_parallel_backend

def nested(folder):
    if sys.argv[2] == "joblib":  # joblib's own pool stays, idle, until the worker exits
        joblib.Parallel(n_jobs=2)(joblib.delayed(abs)(x) for x in range(4))
    with init_parallel_backend({{"n_cpus": 2}}) as inner, inner.executor() as executor:
        list(executor.map(abs, range(4), chunksize=1))
    Path(folder, "used").touch()
    time.sleep(float(sys.argv[1]))
    return os.getpid()

if __name__ == "__main__":
    with init_parallel_backend({{"backend": "dask", "n_cpus": 2}}) as backend, backend.executor() as executor:
        pids = list(executor.map(nested, [{folder!r}] * 2, chunksize=1))
    print("RESULT", pids, flush=True)
"""


@pytest.mark.parametrize("how", ["exits", "is killed"])
def test_an_app_whose_dask_tasks_started_processes_leaves_none(tmp_path: Path, how: str) -> None:
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(NESTED_DASK_APP.format(folder=str(tmp_path))))
    marker = uuid.uuid4().hex
    env = app_env(**{MARKER: marker})
    if how == "exits":
        run = subprocess.run([sys.executable, str(script), "0", "joblib"], cwd=str(tmp_path), env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "RESULT" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
    else:
        # The tasks' own backends are shut down; the killed app's Dask workers must go.
        # (Processes a task leaves running, such as joblib's idle pool, outlive a
        # SIGKILLed app until their work or idle timeout ends: see the README.)
        proc = subprocess.Popen([sys.executable, str(script), "120", "backend"], cwd=str(tmp_path), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_until((tmp_path / "used").exists, 90), "the tasks never ran"
            time.sleep(0.5)
        finally:
            proc.kill()  # SIGKILL: the app runs no clean-up at all
            proc.wait(30)
    assert leftovers(marker, grace=30.0) == []


def test_a_joblib_task_can_start_a_dask_backend_of_its_own(joblib_backend: BaseParallelBackend) -> None:
    # A loky worker's default start method is loky's, which Dask's spawned nannies
    # could not set again ("cannot find context for 'loky'").
    with joblib_backend.executor(max_workers=1) as executor:
        assert executor.submit(sum_on_own_dask).result(timeout=180) == 25
