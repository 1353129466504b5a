"""What only the Ray backend does: its runtime's lifecycle, clusters by address,
task options, the remote-function cache, and force-cancelling running tasks.

The executor contract (submit, map, policies, put/get/wait) is checked for every
engine by ``test_executor_contract.py``.
"""

from __future__ import annotations

import functools
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from parallel_hydra import RayConfig, effective_n_jobs
from parallel_hydra.backends.ray import RayParallelBackend
from apps import leftovers, wait_for_path
from ray_support import port_accepts, run_app

MARKER = "PARALLEL_HYDRA_TEST_MARKER"


def _assigned_cpus() -> float:
    import ray

    return ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)


def _write_after(started: str, done: str, delay: float) -> None:
    Path(started).write_text("started")
    time.sleep(delay)
    Path(done).write_text("done")


def _check(result, what: str) -> None:
    assert result.returncode == 0, f"{what} failed:\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


# -- lifecycle ---------------------------------------------------------------------------


def test_local_runtime_is_stopped_when_the_app_exits() -> None:
    marker = uuid.uuid4().hex
    code = textwrap.dedent(
        """
        import ray
        from parallel_hydra import RayParallelBackend
        with RayParallelBackend(n_cpus=1) as backend:
            with backend.executor() as executor:
                assert executor.submit(pow, 2, 8).result() == 256
        assert not ray.is_initialized()
        print("OK")
        """
    )
    result = run_app(code, **{MARKER: marker})
    _check(result, "the app")
    assert "OK" in result.stdout
    left = leftovers(marker, grace=30.0, name=MARKER)
    assert not left, f"processes started by the app are still running: {left}"


def test_ray_initialised_by_the_user_is_reused_and_left_running() -> None:
    code = textwrap.dedent(
        """
        import ray
        ray.init(address="local", num_cpus=1, include_dashboard=False)
        from parallel_hydra import RayParallelBackend
        backend = RayParallelBackend(n_cpus=1)
        with backend.executor() as executor:
            assert executor.submit(abs, -3).result() == 3
        backend.shutdown()
        assert ray.is_initialized()
        assert ray.get(ray.put(5)) == 5
        ray.shutdown()
        print("OK")
        """
    )
    result = run_app(code)
    _check(result, "the app")


def test_a_second_backend_shares_the_session_runtime(ray_backend: RayParallelBackend) -> None:
    import ray

    with RayParallelBackend(n_cpus=1) as other:
        assert other.effective_n_jobs(-1) == 1
    assert ray.is_initialized()
    with ray_backend.executor(max_workers=1) as executor:
        assert executor.submit(abs, -1).result() == 1


# -- clusters by address -----------------------------------------------------------------


def test_an_app_by_address_leaves_the_cluster_running(ray_cluster_address: str) -> None:
    marker = uuid.uuid4().hex
    code = textwrap.dedent(
        f"""
        from parallel_hydra import RayParallelBackend
        def square(x):
            return x * x
        with RayParallelBackend(address={ray_cluster_address!r}, connect_timeout=30) as backend:
            assert backend.effective_n_jobs(-1) >= 1
            with backend.executor(max_workers=2) as executor:
                assert list(executor.map(square, range(6), chunksize=1)) == [0, 1, 4, 9, 16, 25]
        print("OK")
        """
    )
    result = run_app(code, **{MARKER: marker})
    _check(result, "the app")
    left = leftovers(marker, grace=30.0, name=MARKER)
    assert not left, f"processes started by the app are still running: {left}"
    host, _, port = ray_cluster_address.rpartition(":")
    assert port_accepts(host, int(port)), "the cluster stopped when the app exited"
    # And it still takes work from the next app.
    again = run_app(code)
    _check(again, "a second app on the same cluster")


def test_an_unreachable_address_fails_promptly_naming_it() -> None:
    code = textwrap.dedent(
        """
        import time
        from parallel_hydra import RayParallelBackend
        start = time.monotonic()
        try:
            RayParallelBackend(address="127.0.0.1:1", connect_timeout=5)
        except (ConnectionError, RuntimeError) as exc:
            print("ERROR:", exc)
            print("SECONDS:", time.monotonic() - start)
        else:
            raise SystemExit("connected to 127.0.0.1:1?")
        """
    )
    result = run_app(code, timeout=90)
    _check(result, "the app")
    assert "ERROR:" in result.stdout and "127.0.0.1:1" in result.stdout.split("ERROR:", 1)[1]
    seconds = float(result.stdout.split("SECONDS:", 1)[1].split()[0])
    assert seconds < 30, f"failing took {seconds:.0f} s"


# -- task options ------------------------------------------------------------------------


def test_task_options_reach_ray(ray_backend: RayParallelBackend) -> None:
    with ray_backend.executor(max_workers=2) as executor:
        assert executor.submit(_assigned_cpus).result(timeout=60) == 1.0
        assert executor.with_options(num_cpus=2).submit(_assigned_cpus).result(timeout=60) == 2.0
    assert ray_backend.get(ray_backend.wrap(_assigned_cpus, num_cpus=0.5)(), timeout=60) == 0.5


def test_task_options_of_the_config_are_the_default(ray_backend: RayParallelBackend) -> None:
    with RayParallelBackend(task={"num_cpus": 2}) as backend:
        assert backend.effective_n_jobs(-1) == 1
        with backend.executor() as executor:
            assert executor.submit(_assigned_cpus).result(timeout=60) == 2.0


@pytest.mark.parametrize(
    "options, words",
    [({"num_cpu": 1}, ["num_cpu", "num_cpus"]), ({"num_cpus": -1}, ["num_cpus"]), ({"max_retries": "x"}, ["max_retries"])],
)
def test_bad_task_options_are_refused_clearly(ray_backend: RayParallelBackend, options: dict, words: list) -> None:
    with ray_backend.executor(max_workers=1) as executor:
        with pytest.raises(ValueError) as info:
            executor.with_options(**options)
    for word in words:
        assert word in str(info.value)
    with pytest.raises(ValueError):
        ray_backend.wrap(abs, **options)


def test_a_function_is_registered_with_ray_once(ray_backend: RayParallelBackend) -> None:
    def local_fn(x: int) -> int:
        return x + 1

    cache = ray_backend._remote_cache
    before = len(cache)
    with ray_backend.executor(max_workers=2) as executor:
        futures = [executor.submit(local_fn, i) for i in range(10)]
        futures += [executor.with_options(num_cpus=0.5).submit(local_fn, i) for i in range(3)]
        assert [f.result(timeout=60) for f in futures] == list(range(1, 11)) + [1, 2, 3]
    assert len(cache) == before + 1
    remote, _ = cache.lookup(local_fn)
    assert cache.lookup(local_fn)[0] is remote


def test_callables_that_are_not_functions_run(ray_backend: RayParallelBackend) -> None:
    with ray_backend.executor(max_workers=2) as executor:
        assert executor.submit(max, 3, 9).result(timeout=60) == 9
        assert executor.submit(functools.partial(pow, 2), 5).result(timeout=60) == 32
        assert executor.submit("a-b".split, "-").result(timeout=60) == ["a", "b"]


# -- stopping running tasks --------------------------------------------------------------


def test_running_policy_really_stops_the_task(ray_backend: RayParallelBackend, tmp_path: Path) -> None:
    started, done = tmp_path / "started", tmp_path / "done"
    executor = ray_backend.executor(max_workers=1)
    future = executor.submit(_write_after, str(started), str(done), 1.5)
    wait_for_path(started)
    executor.shutdown(cancel_futures="RUNNING")
    assert future.cancelled()
    time.sleep(3.0)  # well past the moment the task would have written its file
    assert not done.exists(), "the task went on running after it was cancelled"
    with ray_backend.executor(max_workers=2) as fresh:
        assert fresh.submit(abs, -7).result(timeout=60) == 7


# -- CPU counts --------------------------------------------------------------------------


def test_effective_n_jobs_is_cluster_cpus_capped_by_n_cpus(ray_backend: RayParallelBackend) -> None:
    assert ray_backend.effective_n_jobs(-1) == 2
    assert ray_backend.effective_n_jobs(64) == 2
    # Ray runs in this process already: the count comes from the cluster, capped.
    assert effective_n_jobs(-1, RayConfig(n_cpus=1)) == 1
    assert effective_n_jobs(8, RayConfig()) == 2


def test_slots_without_a_runtime_come_from_the_config() -> None:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        # Ray runs in this process: there is no "unstarted" answer to give.
        assert RayParallelBackend._count_slots_unstarted(RayConfig(n_cpus=3)) is None
    else:
        assert RayParallelBackend._count_slots_unstarted(RayConfig(n_cpus=3)) == 3
    assert RayParallelBackend._count_slots_unstarted(RayConfig(address="127.0.0.1:1")) is None
