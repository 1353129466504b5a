"""Research code inside tasks: BLAS thread caps, logs that reach the app, progress bars.

Every engine runs these (the ``backend`` fixture), a Ray and a Dask cluster reached by
address too, and a Hydra app whose job log file must hold what its tasks logged.
"""

from __future__ import annotations

import json
import logging
import os
import textwrap
from pathlib import Path
from typing import Any, List

import pytest

import tasks
from apps import run_app as run_hydra_app
from parallel_hydra import (
    BaseParallelBackend,
    DaskConfig,
    JoblibParallelBackend,
    MapReduceJob,
    ParallelConfig,
    init_parallel_backend,
)
from ray_support import run_app

CAPPED_APIS = {"openblas", "mkl", "blis", "openmp"}


def _capped(info: List[Any]) -> List[int]:
    """The thread counts of the thread pools a cap applies to."""
    counts = [threads for api, threads in info if api in CAPPED_APIS]
    assert counts, f"numpy loaded no BLAS/OpenMP library that threadpoolctl knows: {info}"
    return counts


# -- thread caps ------------------------------------------------------------------------


def test_each_task_gets_its_share_of_the_cpus_as_blas_threads(backend: BaseParallelBackend) -> None:
    slots = backend.effective_n_jobs(-1)
    assert slots == 2, "the session backends have 2 slots"
    with backend.executor(max_workers=2) as executor:
        assert executor.threads_per_task == 1
        infos = [f.result(timeout=120) for f in [executor.submit(tasks.blas_threads) for _ in range(4)]]
    for info in infos:
        assert set(_capped(info)) == {1}, info
    with backend.executor(max_workers=1) as executor:
        assert executor.threads_per_task == 2
        assert set(_capped(executor.submit(tasks.blas_threads).result(timeout=120))) == {2}


def test_threads_per_task_in_the_config_is_applied_as_written() -> None:
    with JoblibParallelBackend(n_cpus=2, threads_per_task=2) as backend:
        with backend.executor(max_workers=2) as executor:
            assert executor.threads_per_task == 2
            assert set(_capped(executor.submit(tasks.blas_threads).result(timeout=60))) == {2}
        # wrap()'s calls run on every slot at once: the config's cap applies to them too.
        assert set(_capped(backend.get(backend.wrap(tasks.blas_threads)()))) == {2}


def test_wrapped_calls_share_the_cpus_by_default(joblib_backend: BaseParallelBackend) -> None:
    assert set(_capped(joblib_backend.get(joblib_backend.wrap(tasks.blas_threads)()))) == {1}


@pytest.mark.parametrize("value", [0, -1, 1.5, "two", True])
def test_a_bad_threads_per_task_is_refused_naming_the_key(value: Any) -> None:
    with pytest.raises(ValueError, match="threads_per_task must be an integer >= 1 or null"):
        ParallelConfig(threads_per_task=value)


def test_progress_must_be_a_boolean() -> None:
    with pytest.raises(ValueError, match="progress must be true or false"):
        ParallelConfig(progress="yes")


# -- logs -------------------------------------------------------------------------------


def _task_records(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "research.task"]


def test_what_a_task_logs_reaches_the_loggers_of_the_app(backend: BaseParallelBackend, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="research.task")
    with backend.executor(max_workers=2) as executor:
        assert sorted(executor.map(tasks.log_and_return, range(4), chunksize=1)) == [0, 1, 2, 3]
        # INFO is below the backend's logging_level (WARNING): it stays in the worker.
        assert executor.submit(tasks.log_and_return, 9, logging.INFO).result(timeout=60) == 9
    records = _task_records(caplog)
    assert sorted(r.getMessage().split(" logs")[0] for r in records) == [f"task {i}" for i in range(4)]
    assert {r.levelname for r in records} == {"WARNING"}
    assert all(r.process != os.getpid() for r in records), "the records were made in the workers"


def test_a_failed_task_brings_its_logs_with_its_exception(backend: BaseParallelBackend, caplog: pytest.LogCaptureFixture) -> None:
    with backend.executor(max_workers=2) as executor:
        future = executor.submit(tasks.log_and_raise, "no convergence")
        error = future.exception(timeout=60)
    assert isinstance(error, tasks.Boom)
    assert not hasattr(error, "_parallel_hydra_logs"), "the records travel on the exception, then leave it"
    assert [r.getMessage() for r in _task_records(caplog)] == ["about to fail: no convergence"]


def test_logging_level_info_forwards_info_records(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with JoblibParallelBackend(n_cpus=2, logging_level=logging.INFO) as backend:
        with backend.executor() as executor:
            executor.submit(tasks.log_and_return, 5, logging.INFO).result(timeout=60)
    assert [r.levelname for r in _task_records(caplog)] == ["INFO"]


def test_a_dask_cluster_by_address_forwards_logs_and_caps_threads(dask_cluster_address: str, caplog: pytest.LogCaptureFixture) -> None:
    with init_parallel_backend(DaskConfig(address=dask_cluster_address, connect_timeout=30)) as backend:
        with backend.executor(max_workers=1) as executor:
            assert executor.submit(tasks.log_and_return, 7).result(timeout=60) == 7
            assert set(_capped(executor.submit(tasks.blas_threads).result(timeout=60))) == {2}
    assert [r.getMessage().split(" logs")[0] for r in _task_records(caplog)] == ["task 7"]


def test_a_ray_cluster_by_address_forwards_logs_and_caps_threads(ray_cluster_address: str) -> None:
    code = textwrap.dedent(
        f"""
        import json, logging, os
        from parallel_hydra import RayParallelBackend

        def work(x):
            logging.getLogger("research.task").warning("task %d from pid %d", x, os.getpid())
            from threadpoolctl import threadpool_info
            import numpy
            return [i["num_threads"] for i in threadpool_info() if i["internal_api"] in {sorted(CAPPED_APIS)!r}]

        logging.basicConfig(level=logging.WARNING, format="FORWARDED %(name)s %(levelname)s %(message)s")
        with RayParallelBackend(address={ray_cluster_address!r}, connect_timeout=30) as backend:
            with backend.executor(max_workers=2) as executor:
                print("THREADS", json.dumps(executor.submit(work, 3).result(timeout=120)))
        """
    )
    result = run_app(code)
    assert result.returncode == 0, result.stderr
    assert "FORWARDED research.task WARNING task 3 from pid" in result.stderr
    threads = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("THREADS"))[8:])
    assert threads and set(threads) == {1}, threads


@pytest.mark.parametrize("engine", ["joblib", "ray", "dask"])
def test_an_app_console_shows_task_logs_once_and_no_engine_chatter(engine: str) -> None:
    code = textwrap.dedent(
        f"""
        import logging
        from parallel_hydra import ParallelConfig, init_parallel_backend

        def work(x):
            logging.getLogger("research.task").warning("task %d says hello", x)
            if x == 1:
                raise ValueError("task 1 fails")
            return x

        if __name__ == "__main__":
            logging.basicConfig(level=logging.INFO)
            with init_parallel_backend(ParallelConfig(backend={engine!r}, n_cpus=2)) as backend:
                with backend.executor() as executor:
                    futures = [executor.submit(work, i) for i in range(2)]
                    print("RESULT", futures[0].result(), repr(futures[1].exception()))
        """
    )
    result = run_app(code, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "RESULT 0 ValueError('task 1 fails')" in result.stdout
    for x in (0, 1):
        assert result.stderr.count(f"task {x} says hello") == 1, result.stderr
        assert f"WARNING:research.task:task {x} says hello" in result.stderr
    assert "Compute Failed" not in result.stderr
    assert "Token authentication is enabled" not in result.stderr
    assert "INFO:distributed" not in result.stderr


HYDRA_APP = '''\
import logging

import hydra
from hydra.utils import instantiate


def work(x):
    logging.getLogger("research.task").warning("task %d was here", x)
    return x


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    with instantiate(cfg.parallel) as backend:
        with backend.executor() as executor:
            print("RESULT", sum(executor.map(work, range(3), chunksize=1)), flush=True)


if __name__ == "__main__":
    main()
'''


@pytest.mark.parametrize("engine", ["joblib", "ray", "dask"])
def test_a_hydra_job_log_file_has_what_its_tasks_logged(engine: str, tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("defaults:\n  - parallel: joblib\n  - _self_\n")
    (tmp_path / "app.py").write_text(HYDRA_APP)
    run = run_hydra_app(tmp_path / "app.py", [f"parallel={engine}", "parallel.n_cpus=2", "hydra.run.dir=out"],
                        cwd=tmp_path, timeout=240, env=_app_path())
    assert run.returncode == 0, run.output
    assert run.results() == ["RESULT 3"]
    log = (tmp_path / "out" / "app.log").read_text()
    for x in range(3):
        assert f"[research.task][WARNING] - task {x} was here" in log, log


def _app_path() -> dict:
    from ray_support import app_env

    return {"PYTHONPATH": app_env()["PYTHONPATH"]}


# -- progress ---------------------------------------------------------------------------


def test_map_shows_a_bar_that_ends_at_the_number_of_items(joblib_backend: BaseParallelBackend, capsys: pytest.CaptureFixture) -> None:
    with joblib_backend.executor(max_workers=2) as executor:
        assert list(executor.map(tasks.square, range(50), progress=True)) == [x * x for x in range(50)]
        assert list(executor.map(tasks.square, range(6), chunksize=1, progress=True)) == [x * x for x in range(6)]
    err = capsys.readouterr().err
    assert "50/50" in err and "6/6" in err, err


def test_a_bar_is_shown_only_when_asked(capsys: pytest.CaptureFixture) -> None:
    with JoblibParallelBackend(n_cpus=2, progress=True) as backend:
        with backend.executor() as executor:
            list(executor.map(tasks.square, range(8)))
            assert "8/8" in capsys.readouterr().err
            list(executor.map(tasks.square, range(8), progress=False))
            assert "8/8" not in capsys.readouterr().err


def test_map_reduce_job_shows_items_done_and_gives_the_same_result(
    joblib_backend: BaseParallelBackend, capsys: pytest.CaptureFixture
) -> None:
    def job(progress: bool) -> Any:
        return MapReduceJob(list(range(40)), tasks.draw_mean, reduce_func=sum, config=joblib_backend, n_jobs=4,
                            progress=progress)(seed=7)

    quiet = job(False)
    assert "40/40" not in capsys.readouterr().err
    shown = job(True)
    assert "40/40" in capsys.readouterr().err
    assert shown == quiet, "a bar must not change the chunks nor their random streams"


def test_importing_the_package_loads_neither_tqdm_nor_threadpoolctl() -> None:
    code = "import sys, parallel_hydra; print(sorted(m for m in ('tqdm', 'threadpoolctl') if m in sys.modules))"
    result = run_app(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_bar_in_a_script_goes_to_stderr_not_stdout() -> None:
    code = textwrap.dedent(
        """
        from parallel_hydra import init_parallel_backend
        if __name__ == "__main__":
            with init_parallel_backend() as backend, backend.executor(2) as executor:
                print(sum(executor.map(abs, range(-5, 5), progress=True)))
        """
    )
    result = run_app(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "25"
    assert "10/10" in result.stderr


def test_a_logged_in_task_call_pickles_as_one_object_and_runs_the_same() -> None:
    """The start log's wrapper of an InTask pickles flat (one class named, not two);
    what arrives is the same call: number, cap, log level and arguments."""
    import pickle

    from parallel_hydra.in_task import InTask
    from parallel_hydra.start_log import LoggedCall

    call = LoggedCall("", 7, InTask(divmod, 3, logging.INFO, -1), (17, 5), {})
    copy = pickle.loads(pickle.dumps(call))
    assert type(copy) is LoggedCall and type(copy.fn) is InTask
    assert (copy.number, copy.fn.fn, copy.fn.threads, copy.fn.log_level, copy.args) == (7, divmod, 3, logging.INFO, (17, 5))
    assert copy() == (3, 2)
    assert pickle.dumps(call).count(b"InTask") == 0  # flattened: only the rebuilding function is named
