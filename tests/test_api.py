"""The public functions and classes, apart from the executor contract."""

from __future__ import annotations

import subprocess
import sys
import time

import os

import psutil
import pytest
from omegaconf import OmegaConf

import parallel_hydra as ph
from parallel_hydra import (
    CancellationPolicy,
    DaskConfig,
    JoblibParallelBackend,
    MapReduceJob,
    ParallelConfig,
    RayConfig,
    available_cpus,
    effective_n_jobs,
    init_executor,
    init_parallel_backend,
)
from parallel_hydra.policy import as_policy

import tasks
from apps import wait_until


def python(code: str, *prefix: str) -> str:
    result = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_the_package_imports_no_engine() -> None:
    out = python(
        "import sys, parallel_hydra, hydra_plugins.parallel_hydra_plugin\n"
        "print(sorted(m for m in ('ray', 'dask', 'distributed', 'numpy') if m in sys.modules))"
    )
    assert out == "[]"


def test_counting_cpus_for_a_local_engine_starts_nothing() -> None:
    out = python(
        "import psutil\n"
        "from parallel_hydra import effective_n_jobs, RayConfig, DaskConfig\n"
        "print(effective_n_jobs(-1, RayConfig(n_cpus=1)), effective_n_jobs(8, DaskConfig(n_cpus=1)),\n"
        "      len(psutil.Process().children(recursive=True)))"
    )
    assert out == "1 1 0"


def test_available_cpus_respects_affinity() -> None:
    assert python("import parallel_hydra; print(parallel_hydra.available_cpus())", "taskset", "-c", "0") == "1"
    assert available_cpus() >= 1


def test_cancellation_policy_is_a_flag() -> None:
    assert CancellationPolicy.NONE.value == 0
    assert CancellationPolicy.ALL == CancellationPolicy.PENDING | CancellationPolicy.RUNNING
    assert CancellationPolicy.RUNNING in CancellationPolicy.ALL
    assert CancellationPolicy.RUNNING not in CancellationPolicy.PENDING
    assert as_policy("all") is CancellationPolicy.ALL
    assert as_policy(False) is CancellationPolicy.NONE
    with pytest.raises(ValueError, match="cancel_futures must be one of NONE, PENDING, RUNNING, ALL; got 'SOMETIMES'"):
        as_policy("SOMETIMES")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_cpus": 0}, "n_cpus must be an integer >= 1"),
        ({"n_cpus": 1.5}, "n_cpus must be an integer"),
        ({"wait_timeout": -1}, "wait_timeout must be a number > 0"),
        ({"logging_level": -5}, "logging_level must be an integer >= 0"),
        ({"cancel_futures": "often"}, "cancel_futures must be one of"),
        ({"backend": ""}, "backend must be the name of a backend"),
        ({"address": ""}, "address must be a cluster address"),
    ],
)
def test_parallel_config_refuses_bad_values(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**fields)


def test_engine_configs_check_their_own_fields() -> None:
    with pytest.raises(ValueError, match=r"task\.num_gpus must be a number >= 0"):
        RayConfig(task={"num_gpus": -1})
    with pytest.raises(ValueError, match=r"task\.gpus must be one of"):
        RayConfig(task={"gpus": 1})
    with pytest.raises(ValueError, match="n_workers must be an integer >= 1"):
        DaskConfig(n_workers=0)
    with pytest.raises(ValueError, match=r"task\.resources\.GPU must be a number >= 0"):
        DaskConfig(task={"resources": {"GPU": -1}})
    # Checked here rather than by the engine, whose own messages do not name our key.
    with pytest.raises(ValueError, match="memory_limit must be auto, 0, a byte count or a size such as 4GB; got 'lots'"):
        DaskConfig(memory_limit="lots")
    for size in ("auto", "0", "4GB", "512 MiB", "2g", "0.5", 4_000_000_000):
        assert DaskConfig(memory_limit=size).memory_limit == str(size)
    with pytest.raises(ValueError, match="object_store_memory must be an integer >= 78643200"):
        RayConfig(object_store_memory=10)
    assert ParallelConfig(cancel_futures="ALL").cancel_futures is CancellationPolicy.ALL


def test_init_parallel_backend_names_the_known_backends() -> None:
    with pytest.raises(ValueError, match="unknown backend 'spark'; known backends: dask, joblib, ray"):
        init_parallel_backend(ParallelConfig(backend="spark"))


@pytest.mark.parametrize(
    "config",
    [None, ParallelConfig(n_cpus=1), {"backend": "joblib", "n_cpus": 1},
     OmegaConf.create({"_target_": "x", "backend": "joblib", "n_cpus": 1})],
)
def test_init_parallel_backend_takes_any_form_of_config(config) -> None:
    with init_parallel_backend(config) as backend:
        assert isinstance(backend, JoblibParallelBackend)
        assert backend.effective_n_jobs(-1) == (available_cpus() if config is None else 1)


def test_unknown_keys_are_named() -> None:
    with pytest.raises(ValueError, match="unknown key 'ncpus' for the joblib backend"):
        init_parallel_backend({"ncpus": 2})


def test_module_effective_n_jobs() -> None:
    with pytest.raises(ValueError, match="n_jobs"):
        effective_n_jobs(0)
    assert effective_n_jobs(-1) == available_cpus()
    assert effective_n_jobs(1000, ParallelConfig(n_cpus=1)) == 1
    # One rule for a config and a running backend: -k is all but k - 1, never below 1.
    assert effective_n_jobs(-50) == 1
    assert effective_n_jobs(-2, ParallelConfig(n_cpus=2)) == 1
    with JoblibParallelBackend(n_cpus=2) as backend:
        assert effective_n_jobs(-50, backend) == 1
        assert effective_n_jobs(-2, backend) == effective_n_jobs(-2, ParallelConfig(n_cpus=2))


def test_a_shut_down_backend_refuses_work() -> None:
    backend = init_parallel_backend()
    backend.shutdown()
    backend.shutdown()  # twice is fine
    with pytest.raises(RuntimeError, match="shut down"):
        backend.executor()


def test_init_executor_yields_a_working_executor() -> None:
    with init_executor(max_workers=1, config=ParallelConfig(n_cpus=2), cancel_futures="NONE") as executor:
        assert executor.max_workers == 1
        assert executor.cancel_futures is CancellationPolicy.NONE
        assert executor.submit(tasks.add, 1, 2).result() == 3


def test_an_executor_leaves_no_worker_behind() -> None:
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    with init_executor(max_workers=2) as executor:
        assert sum(executor.map(tasks.square, range(20))) == sum(i * i for i in range(20))
        during = {p.pid for p in me.children(recursive=True)} - before
        assert during, "the executor should have started worker processes"
    end = time.monotonic() + 10
    while {p.pid for p in me.children(recursive=True)} & during and time.monotonic() < end:
        time.sleep(0.1)
    assert not {p.pid for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE} & during


def test_lazy_backend_classes_load_on_demand() -> None:
    assert ph.JoblibParallelBackend is JoblibParallelBackend
    with pytest.raises(AttributeError):
        ph.NoSuchThing  # noqa: B018


# -- MapReduceJob ---------------------------------------------------------------------


def chunk_sizes(chunk):
    return len(chunk)


def echo(chunk, job_id):
    return job_id, chunk


def total_with_offset(chunk, offset=0):
    return sum(chunk) + offset


def test_map_reduce_splits_sequences_evenly() -> None:
    # n_jobs as written makes the chunks, whatever the CPUs: 3 chunks on 2 CPUs.
    sizes = MapReduceJob(list(range(10)), chunk_sizes, n_jobs=3, config=ParallelConfig(n_cpus=2))()
    assert sizes == [4, 3, 3]
    sizes = MapReduceJob(list(range(3)), chunk_sizes, n_jobs=2)()
    assert sizes == [2, 1]


def test_map_reduce_repeats_other_inputs_per_job() -> None:
    assert MapReduceJob("abc", echo, n_jobs=2)() == [(0, "abc"), (1, "abc")]


def test_map_reduce_passes_kwargs_and_reduces() -> None:
    job = MapReduceJob([1, 2, 3, 4], total_with_offset, reduce_func=sum, map_kwargs={"offset": 10}, n_jobs=2)
    assert job() == 30


def test_map_reduce_passes_seed_only_to_functions_that_take_it() -> None:
    assert MapReduceJob([1, 2], chunk_sizes, n_jobs=2)(seed=3) == [1, 1]


def test_map_reduce_takes_a_numpy_generator_as_seed_as_pydvl_does() -> None:
    import numpy as np

    # A Generator seeds the jobs from its own SeedSequence (its state is left alone):
    # default_rng(5) gives what seed=5 gives, every time.
    job = MapReduceJob(list(range(6)), tasks.draw_mean, n_jobs=3, config={"n_cpus": 2})
    assert job(seed=np.random.default_rng(5)) == job(seed=np.random.default_rng(5)) == job(seed=5)
    assert job(seed=np.random.default_rng(6)) != job(seed=5)


def test_a_bad_max_workers_is_refused_naming_it() -> None:
    with JoblibParallelBackend(n_cpus=1) as backend:
        with pytest.raises(ValueError, match="max_workers"):
            backend.executor(max_workers=0)


def test_map_reduce_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="n_jobs"):
        MapReduceJob([1], chunk_sizes, n_jobs=0)
    with pytest.raises(ValueError, match="timeout"):
        MapReduceJob([1], chunk_sizes, timeout=0)


def test_joblib_shares_large_arrays_by_file_and_removes_the_file() -> None:
    import numpy as np

    array = np.ones(2**18)
    with JoblibParallelBackend(n_cpus=1) as backend:
        handle = backend.put(array)
        assert backend.get(handle) is array  # the caller gets its own object back
        folder = backend._shm_dir or backend._share_dir
        assert folder is not None and len(os.listdir(folder)) == 1
        with backend.executor() as executor:
            assert executor.submit(tasks.total, handle).result() == float(array.size)
            assert executor.submit(tasks.total, backend.put(array)).result() == float(array.size)
        del handle
        assert wait_until(lambda: os.listdir(folder) == [], 10), "dropped handles should free their files"
    assert not os.path.exists(folder)


def test_shutting_down_a_backend_shuts_down_its_open_executors(tmp_path) -> None:
    backend = JoblibParallelBackend(n_cpus=1)
    executor = backend.executor(cancel_futures="NONE")
    running = executor.submit(tasks.heartbeat, str(tmp_path / "beat"), 60.0)
    assert wait_until((tmp_path / "beat").exists, 30)
    started = time.monotonic()
    backend.shutdown()
    assert time.monotonic() - started < 30
    assert running.cancelled()
    with pytest.raises(RuntimeError, match="shutdown"):
        executor.submit(tasks.add, 1)


def test_ci_fails_a_run_in_which_a_test_skipped(tmp_path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text("import pytest\n\ndef test_engine_missing():\n    pytest.skip('no such engine here')\n")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
               "--rootdir", str(tmp_path), str(probe)]
    for ci, expected in (("true", 1), ("", 0)):
        env = {**os.environ, "CI": ci, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
        run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == expected, run.stdout + run.stderr
    assert "1 skipped" in run.stdout
