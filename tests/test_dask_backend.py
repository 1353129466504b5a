"""What only the Dask backend does: pure=False, owning or joining a cluster, killing work.

The behaviour every engine shares (submit, map, policies, put/get/wait) is checked by
the conformance suite in ``test_executor_contract.py``; this module checks how the Dask
backend maps it onto Dask, with a real ``LocalCluster`` and a real ``dask scheduler``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

import psutil
import pytest

import tasks
from apps import beats_after, leftovers, wait_for_path, wait_until
from dask_support import DaskTestCluster
from parallel_hydra import CancellationPolicy, DaskConfig, effective_n_jobs
from parallel_hydra.backends.dask import DaskParallelBackend

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


# -- helpers ------------------------------------------------------------------------


def _run_app(code: str, env: Dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` as a user's script (``__main__``) in a fresh interpreter."""
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), full_env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
    )


def _worker_threads(address: str) -> Dict[str, int]:
    from distributed import Client

    with Client(address, timeout=30) as client:
        return dict(client.nthreads())


# -- pure=False ---------------------------------------------------------------------


def test_equal_submits_are_distinct_tasks_unlike_dask_own_executor(dask_backend: DaskParallelBackend) -> None:
    with dask_backend.executor() as executor:
        ours = [executor.submit(tasks.draw) for _ in range(10)]
        assert len({f.result(timeout=60) for f in ours}) == 10
    # Dask's own executor submits with pure=True: equal calls share one key and value.
    theirs = dask_backend.client.get_executor()
    futures = [theirs.submit(tasks.draw) for _ in range(10)]
    assert len({f.result(timeout=60) for f in futures}) == 1
    wrapped = dask_backend.wrap(tasks.draw)
    assert len(set(dask_backend.get([wrapped() for _ in range(10)], timeout=60))) == 10


def test_put_stores_a_new_object_each_time(dask_backend: DaskParallelBackend) -> None:
    first, second = dask_backend.put([1, 2]), dask_backend.put([1, 2])
    assert first.key != second.key  # hash=False: no content hashing, no shared key
    assert dask_backend.get([first, second], timeout=60) == [[1, 2], [1, 2]]


# -- owning a LocalCluster ----------------------------------------------------------


def test_local_cluster_leaves_no_process_behind() -> None:
    marker = uuid.uuid4().hex
    result = _run_app(
        """
        import json, os
        from parallel_hydra.backends.dask import DaskParallelBackend

        if __name__ == "__main__":
            with DaskParallelBackend(n_cpus=2) as backend:
                with backend.executor() as executor:
                    pids = {f.result() for f in [executor.submit(os.getpid) for _ in range(8)]}
                print(json.dumps(sorted(pids)))
        """,
        {"PARALLEL_HYDRA_TEST_MARKER": marker},
    )
    assert result.returncode == 0, result.stderr
    worker_pids = json.loads(result.stdout.strip().splitlines()[-1])
    assert worker_pids and os.getpid() not in worker_pids
    assert leftovers(marker) == []
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in worker_pids)


def test_local_cluster_layout_and_its_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="parallel_hydra.backends.dask")
    with DaskParallelBackend(n_workers=1, threads_per_worker=2, processes=False) as backend:
        assert backend.owns_cluster
        assert list(backend.client.nthreads().values()) == [2]
        assert backend.effective_n_jobs(-1) == 2
        assert backend.client.scheduler.address.startswith("tcp://127.0.0.1:")
    assert "LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol='tcp://', host='127.0.0.1'" in caplog.text
    assert backend.cluster.status.name == "closed"


@pytest.mark.parametrize(
    "fields, total",
    [({"n_cpus": 3}, 3), ({"n_workers": 2, "threads_per_worker": 2}, 4), ({"n_cpus": 4, "n_workers": 2}, 4),
     ({"n_cpus": 4, "threads_per_worker": 2}, 4)],
)
def test_effective_n_jobs_of_a_local_cluster_needs_no_cluster(fields: Dict[str, Any], total: int) -> None:
    config = DaskConfig(**fields)
    assert effective_n_jobs(-1, config) == total
    assert effective_n_jobs(64, config) == total
    assert effective_n_jobs(1, config) == 1


@pytest.mark.parametrize(
    "fields",
    [{"n_cpus": 3, "n_workers": 2, "threads_per_worker": 2}, {"n_cpus": 3, "n_workers": 2}, {"n_cpus": 3, "threads_per_worker": 2}],
)
def test_contradictory_layout_is_refused_naming_the_fields(fields: Dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"n_cpus \(3\).*(n_workers|threads_per_worker)"):
        effective_n_jobs(-1, DaskConfig(**fields))
    with pytest.raises(ValueError, match="n_cpus"):
        DaskParallelBackend(**fields)


def test_effective_n_jobs_is_the_thread_total_capped_by_n_cpus(dask_backend: DaskParallelBackend, dask_cluster_address: str) -> None:
    assert dask_backend.effective_n_jobs(-1) == 2
    assert dask_backend.effective_n_jobs(64) == 2
    assert effective_n_jobs(64, DaskConfig(address=dask_cluster_address)) == 2
    assert effective_n_jobs(64, DaskConfig(address=dask_cluster_address, n_cpus=1)) == 1


# -- stopping running work ----------------------------------------------------------


def test_running_policy_kills_the_work_on_an_owned_cluster(dask_backend: DaskParallelBackend, tmp_path: Path) -> None:
    beat = tmp_path / "beat"
    pids_before = set(dask_backend.client.run(os.getpid).values())
    executor = dask_backend.executor(cancel_futures=CancellationPolicy.RUNNING)
    future = executor.submit(tasks.heartbeat, str(beat), 60.0)
    wait_for_path(beat)
    started = time.monotonic()
    executor.shutdown()
    assert time.monotonic() - started < 30
    assert future.cancelled()
    # The worker running it was killed (and not re-run elsewhere): the beat has stopped.
    assert not beats_after(beat, 1.5)
    pids_after = set(dask_backend.client.run(os.getpid).values())
    assert len(pids_before - pids_after) == 1 and len(pids_after) == 2
    # The backend goes on working, with all its workers back.
    assert dask_backend.effective_n_jobs(-1) == 2
    with dask_backend.executor() as executor:
        assert executor.submit(tasks.add, 1, 2).result(timeout=60) == 3


def test_repeated_kills_leave_the_owned_cluster_whole(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A LocalCluster closes for good the nanny of a worker that is not back when it
    # checks, lost-worker-timeout after the worker left. With that timeout at 0 s every
    # kill is checked while its worker is still down: the cluster must keep its nannies
    # (no drop for the safety net to repair), and each round's two long tasks must start
    # together on its two workers.
    import dask

    caplog.set_level(logging.WARNING, logger="parallel_hydra")
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "0s"}):
        with DaskParallelBackend(n_cpus=2) as backend:
            for round_ in range(3):
                beats = [tmp_path / f"beat{round_}_{i}" for i in range(2)]
                with backend.executor(max_workers=2, cancel_futures=CancellationPolicy.ALL) as executor:
                    for beat in beats:
                        executor.submit(tasks.heartbeat, str(beat), 60.0)
                    for beat in beats:
                        wait_for_path(beat)
                assert len(backend.client.nthreads()) == 2, f"a worker is missing after round {round_}"
            time.sleep(1.0)  # the cluster's own checks of the last kills have run
            assert backend.effective_n_jobs(-1) == 2
            assert len(backend.cluster.workers) == 2
            with backend.executor() as executor:
                assert list(executor.map(tasks.add, [1, 2], [3, 4])) == [4, 6]
    assert "dropped" not in caplog.text


def test_a_worker_the_cluster_dropped_is_started_again(caplog: pytest.LogCaptureFixture) -> None:
    # The safety net: should a Dask release close a nanny of our cluster anyway (as a
    # plain LocalCluster does for a worker it thinks lost), the backend starts it again
    # when it next needs the whole cluster, instead of running a worker short.
    caplog.set_level(logging.WARNING, logger="parallel_hydra")
    with DaskParallelBackend(n_cpus=2) as backend:
        cluster = backend.cluster
        name = next(iter(cluster.workers))
        cluster.sync(cluster.workers[name].close)  # what LocalCluster does to a lost worker
        del cluster.workers[name]
        assert wait_until(lambda: len(backend.client.nthreads()) == 1, 30)
        assert backend.effective_n_jobs(-1) == 2  # waits for the worker started again
        assert wait_until(lambda: len(cluster.workers) == 2, 30)  # its nanny is listed once started
        assert "which the cluster dropped" in caplog.text
        with backend.executor() as executor:
            assert list(executor.map(tasks.add, [1, 2], [3, 4])) == [4, 6]


def test_running_policy_only_cancels_on_a_cluster_it_did_not_start(
    dask_cluster: DaskTestCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="parallel_hydra.backends.dask")
    with DaskParallelBackend(address=dask_cluster.address, connect_timeout=30) as backend:
        assert not backend.owns_cluster
        for round_ in range(2):
            beat = tmp_path / f"beat{round_}"
            executor = backend.executor(cancel_futures="RUNNING")
            future = executor.submit(tasks.heartbeat, str(beat), 1.5)
            wait_for_path(beat)
            executor.shutdown()
            assert future.cancelled()
            # As documented: Dask forgot the task, but its thread runs on to its end.
            assert beats_after(beat, 1.0)
        warnings = [r for r in caplog.records if "cannot interrupt" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        with backend.executor() as executor:
            assert executor.submit(tasks.add, 2, 3).result(timeout=60) == 5
    assert dask_cluster.alive()
    assert sorted(_worker_threads(dask_cluster.address).values()) == [1, 1]


def test_running_policy_with_thread_workers_cancels_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="parallel_hydra.backends.dask")
    with DaskParallelBackend(n_cpus=1, processes=False) as backend:
        beat = tmp_path / "beat"
        with backend.executor(cancel_futures="RUNNING") as executor:
            future = executor.submit(tasks.heartbeat, str(beat), 0.5)
            wait_for_path(beat)
        assert future.cancelled()
        assert "processes: false" in caplog.text
        with backend.executor() as executor:
            assert executor.submit(tasks.add, 1).result(timeout=60) == 1


# -- joining a cluster --------------------------------------------------------------


def test_an_app_connecting_by_address_leaves_the_cluster_running(dask_cluster: DaskTestCluster) -> None:
    marker = uuid.uuid4().hex
    result = _run_app(
        f"""
        from parallel_hydra.backends.dask import DaskParallelBackend

        if __name__ == "__main__":
            with DaskParallelBackend(address={dask_cluster.address!r}, connect_timeout=30) as backend:
                with backend.executor() as executor:
                    print(sum(executor.map(abs, range(-20, 0), chunksize=1)))
                print(backend.get(backend.wrap(len)(backend.put([1, 2, 3])), timeout=60))
        """,
        {"PARALLEL_HYDRA_TEST_MARKER": marker},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["210", "3"]
    assert leftovers(marker) == []
    assert dask_cluster.alive()
    assert sorted(_worker_threads(dask_cluster.address).values()) == [1, 1]


def test_an_unreachable_address_fails_in_bounded_time_naming_it() -> None:
    result = _run_app(
        """
        import time
        from parallel_hydra.backends.dask import DaskParallelBackend

        if __name__ == "__main__":
            started = time.monotonic()
            try:
                DaskParallelBackend(address="tcp://127.0.0.1:1", connect_timeout=3)
            except Exception as exc:
                print(type(exc).__name__, "|", exc, "|", exc.__cause__ is None and exc.__context__ is None or exc.__suppress_context__)
            print(round(time.monotonic() - started, 1))
        """,
        {},
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    error, elapsed = result.stdout.strip().splitlines()[-2:]
    name, message, clean = (part.strip() for part in error.split("|"))
    assert name == "ConnectionError"
    assert "tcp://127.0.0.1:1" in message
    assert "connect_timeout" in message or "connection refused" in message
    assert clean == "True"  # raised from None: no engine traceback chained to it
    assert float(elapsed) < 60


# -- per-task options ---------------------------------------------------------------


def _restricted_tasks(backend: DaskParallelBackend, resource: str) -> List[Dict[str, Any]]:
    """What the scheduler knows of the tasks that ask for ``resource``."""

    def inspect(dask_scheduler: Any, resource: str) -> List[Dict[str, Any]]:
        return [
            {"retries": ts.retries, "priority": ts.priority[0], "resources": dict(ts.resource_restrictions or {})}
            for ts in dask_scheduler.tasks.values()
            if resource in (ts.resource_restrictions or {})
        ]

    return backend.client.run_on_scheduler(inspect, resource=resource)


def test_task_options_reach_dask_and_bad_ones_are_refused() -> None:
    resource = f"ph-test-{uuid.uuid4().hex[:8]}"  # no worker has it: the tasks wait
    with DaskParallelBackend(n_cpus=1, processes=False, task={"retries": 3, "resources": {resource: 1}}) as backend:
        executor = backend.executor(cancel_futures="ALL")
        executor.submit(tasks.add, 1)
        executor.with_options(priority=7, retries=1).submit(tasks.add, 2)
        handle = backend.wrap(tasks.add, priority=-2)(3)
        end = time.monotonic() + 30
        seen: List[Dict[str, Any]] = []
        while len(seen) < 3 and time.monotonic() < end:
            seen = _restricted_tasks(backend, resource)
        got = sorted((t["retries"], t["priority"]) for t in seen)
        # The scheduler stores the negated user priority.
        assert got == [(1, -7), (3, 0), (3, 2)]
        assert all(t["resources"] == {resource: 1} for t in seen)
        executor.shutdown()
        handle.cancel()

        with pytest.raises(ValueError, match="'gpus'.*resources, retries, priority"):
            executor.with_options(gpus=1)
        with pytest.raises(ValueError, match="task.retries"):
            backend.executor().with_options(retries=-1)
        with pytest.raises(ValueError, match="'workers'"):
            backend.wrap(tasks.add, workers=["x"])
