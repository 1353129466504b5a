"""The Hydra launcher: ``-m hydra/launcher=parallel_joblib|parallel_ray|parallel_dask``.

Hydra's own launcher conformance suites run against each option, as Hydra's launcher
plugins run them: in this process for the ``LauncherTestSuite`` and as a user's app for
the ``IntegrationTestSuite``. Ray and Dask run them against the session's cluster by
address (an engine start per test would cost minutes); the tests below start each
engine locally too.

The other tests run a small research app in a subprocess, as a user runs it, and read
what the sweep left: ``results.jsonl``, the jobs' folders and log files, the console.
After each app, nothing it started may still run (``leftovers``).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)
from hydra.test_utils.test_utils import TSweepRunner

from apps import MARKER, AppRun, beats_after, interrupt_group, leftovers, wait_until, write_user_app
from ray_support import app_env, port_accepts

ENGINES = ["joblib", "ray", "dask"]

# -- Hydra's conformance suites ---------------------------------------------------------


def _address_overrides(request: pytest.FixtureRequest, engine: str) -> List[str]:
    fixture = {"ray": "ray_cluster_address", "dask": "dask_cluster_address"}[engine]
    return [f"hydra.launcher.address={request.getfixturevalue(fixture)}"]


@pytest.mark.parametrize("launcher_name, overrides", [("parallel_joblib", ["hydra.launcher.n_cpus=2"])])
class TestJoblibLauncher(LauncherTestSuite):
    pass


class TestRayLauncherByAddress(LauncherTestSuite):
    @pytest.fixture
    def launcher_name(self) -> str:
        return "parallel_ray"

    @pytest.fixture
    def overrides(self, request: pytest.FixtureRequest) -> List[str]:
        return _address_overrides(request, "ray")


class TestDaskLauncherByAddress(LauncherTestSuite):
    @pytest.fixture
    def launcher_name(self) -> str:
        return "parallel_dask"

    @pytest.fixture
    def overrides(self, request: pytest.FixtureRequest) -> List[str]:
        return _address_overrides(request, "dask")


@pytest.mark.parametrize(
    "launcher_name, overrides", [("parallel_joblib", ["hydra.launcher.n_cpus=2", "hydra.sweeper.max_batch_size=2"])]
)
class TestJoblibLauncherInBatches(BatchedSweeperTestSuite):
    pass


@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [({}, ["-m", "hydra/launcher=parallel_joblib", "hydra.launcher.n_cpus=2"])],
)
class TestJoblibLauncherIntegration(IntegrationTestSuite):
    pass


class TestRayLauncherIntegration(IntegrationTestSuite):
    @pytest.fixture
    def task_launcher_cfg(self) -> Dict[str, Any]:
        return {}

    @pytest.fixture
    def extra_flags(self, request: pytest.FixtureRequest) -> List[str]:
        return ["-m", "hydra/launcher=parallel_ray", *_address_overrides(request, "ray")]


class TestDaskLauncherIntegration(IntegrationTestSuite):
    @pytest.fixture
    def task_launcher_cfg(self) -> Dict[str, Any]:
        return {}

    @pytest.fixture
    def extra_flags(self, request: pytest.FixtureRequest) -> List[str]:
        return ["-m", "hydra/launcher=parallel_dask", *_address_overrides(request, "dask")]


def test_the_launcher_and_its_options_are_discovered() -> None:
    assert "ParallelLauncher" in [cls.__name__ for cls in Plugins.instance().discover(Launcher)]
    options = ConfigStore.instance().list("hydra/launcher")
    assert {"parallel_joblib.yaml", "parallel_ray.yaml", "parallel_dask.yaml"} <= set(options)


def test_importing_the_launcher_plugin_imports_no_engine() -> None:
    code = (
        "import sys\n"
        "from hydra.core.plugins import Plugins\n"
        "import hydra_plugins.parallel_hydra_plugin.launcher\n"
        "Plugins.instance()\n"
        "print(sorted(m for m in ('ray', 'dask', 'distributed', 'numpy', 'parallel_hydra.launcher') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.usefixtures("hydra_restore_singletons")
@pytest.mark.parametrize(
    "override, expected",
    [
        ("hydra.launcher.max_concurrent_jobs=0", r"hydra\.launcher\.max_concurrent_jobs must be an integer >= 1"),
        ("hydra.launcher.n_cpus=0", r"hydra/launcher=parallel_joblib: .*n_cpus must be an integer >= 1"),
    ],
)
def test_a_bad_launcher_field_fails_naming_it(hydra_sweep_runner: TSweepRunner, tmp_path: Path, override: str,
                                               expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        with hydra_sweep_runner(
            calling_file=None,
            calling_module="hydra.test_utils.a_module",
            task_function=None,
            config_path="configs",
            config_name="compose.yaml",
            overrides=["hydra/launcher=parallel_joblib", override],
            temp_dir=tmp_path,
        ):
            pass


# -- a research app's sweeps ------------------------------------------------------------

APP_CONFIG = """\
x: 0
sleep: 0.0
fail: -1
fail_after: 0.0
beat: false
crash: -1
"""

# Each job logs, sleeps, and returns where and when it ran; ``fail`` names a job that
# raises, ``beat`` makes every job write a heartbeat file until it is stopped.
APP = '''\
import logging
import os
import time

import hydra

log = logging.getLogger("sweep_app")


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    start = time.time()
    log.info("hello from job x=%s", cfg.x)
    if cfg.x == cfg.fail:
        time.sleep(cfg.fail_after)
        raise ValueError(f"boom {cfg.x}")
    if cfg.x == cfg.crash:
        os._exit(3)
    if cfg.beat:
        path = os.path.join(os.environ["BEAT_DIR"], f"beat{cfg.x}")
        while time.time() < start + 300:
            with open(path, "w") as out:
                out.write(str(time.time()))
            time.sleep(0.02)
    time.sleep(cfg.sleep)
    log.info("job x=%s done", cfg.x)
    return {"x": cfg.x, "pid": os.getpid(), "start": start, "end": time.time()}


if __name__ == "__main__":
    print(f"APP_PID {os.getpid()}", flush=True)
    main()
'''


@pytest.fixture
def app(tmp_path: Path) -> Path:
    folder = tmp_path / "research_repo"
    folder.mkdir()
    (folder / "config.yaml").write_text(APP_CONFIG)
    script = folder / "app.py"
    script.write_text(APP)
    return script


def _env(marker: str, beat_dir: Path) -> Dict[str, str]:
    return app_env(**{MARKER: marker, "HYDRA_FULL_ERROR": "0", "BEAT_DIR": str(beat_dir)})


def sweep(script: Path, *args: str, timeout: float = 240) -> AppRun:
    """Run ``script -m args`` as a user would, in its folder, with a fresh marker."""
    marker = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, str(script), "-m", f"hydra.sweep.dir={script.parent / 'sweep'}", *args],
        cwd=script.parent, env=_env(marker, script.parent), capture_output=True, text=True, timeout=timeout,
    )
    return AppRun(proc.returncode, proc.stdout, proc.stderr, marker)


def results(script: Path) -> List[Dict[str, Any]]:
    path = script.parent / "sweep" / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def app_pid(run: AppRun) -> int:
    return int(re.search(r"APP_PID (\d+)", run.stdout).group(1))


def peak_and_span(lines: List[Dict[str, Any]]) -> Tuple[int, float]:
    """The most jobs that ran at once, and seconds from the first start to the last end."""
    spans = [(line["return_value"]["start"], line["return_value"]["end"]) for line in lines]
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda ev: (ev[0], ev[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak, max(e for _, e in spans) - min(s for s, _ in spans)


def check_jobs(script: Path, run: AppRun, n: int, worker_prefix: str) -> List[Dict[str, Any]]:
    """Every job completed in order, on an engine worker, with its own folder and log."""
    assert run.returncode == 0, run.output[-4000:]
    lines = results(script)
    assert [line["job"] for line in lines] == list(range(n))
    assert [line["status"] for line in lines] == ["COMPLETED"] * n
    assert [line["return_value"]["x"] for line in lines] == list(range(n))
    pid = app_pid(run)
    for line in lines:
        assert line["pid"] == line["return_value"]["pid"] != pid, "a job ran in the app's process"
        assert line["worker"].startswith(worker_prefix), line
        job_dir = script.parent / "sweep" / str(line["job"])
        assert line["output_dir"] == str(job_dir)
        assert (job_dir / ".hydra" / "overrides.yaml").exists()
        log = (job_dir / "app.log").read_text()
        assert f"hello from job x={line['job']}" in log and f"job x={line['job']} done" in log
        assert len(re.findall(r"hello from job", log)) == 1, f"another job's logging in {job_dir}/app.log:\n{log}"
    return lines


@pytest.mark.parametrize("engine", ENGINES)
def test_jobs_run_concurrently_on_local_engine_workers(app: Path, engine: str) -> None:
    # Ray starts a fresh worker process per job by default (task.max_calls=1): the
    # bound is about concurrency, so its workers are reused here.
    reuse = ["hydra.launcher.task.max_calls=0"] if engine == "ray" else []
    run = sweep(app, f"hydra/launcher=parallel_{engine}", "hydra.launcher.n_cpus=2", *reuse, "x=0,1,2,3", "sleep=1.5")
    lines = check_jobs(app, run, 4, {"joblib": "process", "ray": "ray worker", "dask": "dask worker"}[engine])
    peak, span = peak_and_span(lines)
    assert peak == 2, f"{peak} jobs ran at once on 2 slots"
    assert span < 4.5, f"4 jobs of 1.5 s on 2 slots took {span:.1f} s (ideal 3 s, one after another 6 s)"
    assert re.search(r"init_parallel_backend\(\{'backend': '" + engine, run.output)
    assert "backend.executor(max_workers=2, cancel_futures=ALL)" in run.output
    assert leftovers(run.marker) == [], "the sweep left processes running"


def test_max_concurrent_jobs_bounds_the_sweep_and_batches_add_to_the_results(app: Path) -> None:
    # max_batch_size=2: the sweeper calls launch() twice, for jobs 0-1 and for job 2.
    run = sweep(app, "hydra/launcher=parallel_joblib", "hydra.launcher.n_cpus=2", "hydra.sweeper.max_batch_size=2",
                "hydra.launcher.max_concurrent_jobs=1", "x=0,1,2", "sleep=0.5")
    peak, _ = peak_and_span(check_jobs(app, run, 3, "process"))
    assert peak == 1
    assert leftovers(run.marker) == []


def test_ray_jobs_do_not_share_a_worker_process(app: Path) -> None:
    # One job at a time: Ray would otherwise run them all in the one worker it keeps.
    run = sweep(app, "hydra/launcher=parallel_ray", "hydra.launcher.n_cpus=2", "hydra.launcher.max_concurrent_jobs=1",
                "x=0,1,2")
    lines = check_jobs(app, run, 3, "ray worker")
    assert len({line["pid"] for line in lines}) == 3, "jobs shared a worker process (task.max_calls=1 is the default)"
    assert leftovers(run.marker) == []


@pytest.mark.parametrize("engine", ["ray", "dask"])
def test_a_sweep_on_a_cluster_by_address_leaves_the_cluster_running(
    app: Path, engine: str, request: pytest.FixtureRequest
) -> None:
    address = _address_overrides(request, engine)
    reuse = ["hydra.launcher.task.max_calls=0"] if engine == "ray" else []  # as above
    run = sweep(app, f"hydra/launcher=parallel_{engine}", *address, *reuse, "x=0,1,2,3", "sleep=1")
    lines = check_jobs(app, run, 4, {"ray": "ray worker", "dask": "dask worker"}[engine])
    peak, span = peak_and_span(lines)
    assert peak == 2 and span < 3.5, (peak, span)  # the cluster has 2 slots
    assert leftovers(run.marker) == []
    if engine == "ray":
        host, port = request.getfixturevalue("ray_cluster_address").rsplit(":", 1)
        assert port_accepts(host, int(port)), "the Ray head is gone"
    else:
        assert request.getfixturevalue("dask_cluster").alive(), "the Dask cluster is gone"


def _stamp(line: str) -> datetime:
    return datetime.strptime(re.match(r"\[([^\]]+)\]", line).group(1), "%Y-%m-%d %H:%M:%S,%f")


def test_a_failed_job_is_reported_at_once_and_the_others_go_on(app: Path) -> None:
    run = sweep(app, "hydra/launcher=parallel_joblib", "hydra.launcher.n_cpus=2", "x=0,1,2", "sleep=3", "fail=1")
    assert run.returncode != 0
    assert "ValueError: boom 1" in run.stderr
    lines = results(app)
    assert [line["status"] for line in lines] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert lines[1]["error"] == "ValueError: boom 1"
    failed_log = app.parent / "sweep" / "1" / "app.log"
    reported = [line for line in run.output.splitlines() if re.search(r"job #1 \(x=1 .*\) failed: ValueError: boom 1", line)]
    assert len(reported) == 1, run.output[-4000:]
    assert str(failed_log) in reported[0]
    # Reported while job 0 still ran, not at the end of the sweep.
    done = [line for line in (app.parent / "sweep" / "0" / "app.log").read_text().splitlines() if "done" in line]
    assert _stamp(reported[0]) < _stamp(done[0])
    log = failed_log.read_text()
    assert "Traceback" in log and 'raise ValueError(f"boom {cfg.x}")' in log
    assert leftovers(run.marker) == []


@pytest.mark.parametrize("engine", ["joblib", "ray", "dask"])
def test_a_job_whose_worker_dies_is_reported_naming_the_apps_task_function(app: Path, engine: str) -> None:
    run = sweep(app, f"hydra/launcher=parallel_{engine}", "hydra.launcher.n_cpus=2", "x=0,1,2", "crash=1")
    assert run.returncode != 0
    lines = results(app)
    assert lines[1]["status"] == "FAILED" and lines[1]["error"].startswith("WorkerCrashedError"), lines[1]
    # The other jobs completed, or were stopped by the crash after they had started
    # (on joblib loky stops every worker of the pool): those are not run again.
    for line in lines[::2]:
        assert line["status"] == "COMPLETED" or line["error"].startswith("NeighborCrashedError"), line
    reported = [line for line in run.output.splitlines() if re.search(r"job #1 \(x=1 .*\) failed: WorkerCrashedError", line)]
    assert len(reported) == 1, run.output[-4000:]
    assert "task main " in reported[0] and "execute_job" not in run.output, reported[0]
    assert leftovers(run.marker) == []


# A job's exception whose __init__ takes other arguments than it gives Exception (it
# pickles, and fails to unpickle), and a job that returns what cannot be pickled.
ODD_APP = '''\
import threading
import time

import hydra


class DataError(Exception):
    def __init__(self, path, code):
        super().__init__(f"{path}: code {code}")


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    if cfg.x == 1:
        time.sleep(0.5)
        raise DataError("/data/x.csv", 3)
    if cfg.x == 2:
        return threading.Lock()
    time.sleep(2)
    return cfg.x


if __name__ == "__main__":
    main()
'''


@pytest.mark.parametrize("engine", ENGINES)
def test_a_job_error_or_value_that_cannot_travel_as_it_is_still_arrives(tmp_path: Path, engine: str) -> None:
    """Such an error arrives as itself, fails only its own job (on joblib it used to
    break the pool and fail its neighbour), and such a value is shown by its repr."""
    folder = tmp_path / "odd_repo"
    folder.mkdir()
    (folder / "config.yaml").write_text("x: 0\n")
    script = folder / "app.py"
    script.write_text(ODD_APP)
    run = sweep(script, f"hydra/launcher=parallel_{engine}", "hydra.launcher.n_cpus=2", "x=0,1,2")
    lines = results(script)
    assert [line["status"] for line in lines] == ["COMPLETED", "FAILED", "COMPLETED"], (lines, run.output[-3000:])
    assert lines[0]["return_value"] == 0
    assert lines[1]["error"] == "DataError: /data/x.csv: code 3", lines[1]
    assert "lock" in lines[2]["return_repr"], lines[2]
    assert leftovers(run.marker) == []


@pytest.mark.parametrize("engine", ["joblib", "dask"])
def test_fail_fast_stops_the_running_jobs_and_exits_non_zero(app: Path, engine: str) -> None:
    started = time.monotonic()
    run = sweep(app, f"hydra/launcher=parallel_{engine}", "hydra.launcher.n_cpus=2", "hydra.launcher.fail_fast=true",
                "x=0,1,2,3", "beat=true", "fail=0", "fail_after=1.0")
    elapsed = time.monotonic() - started
    assert run.returncode != 0
    assert "ValueError: boom 0" in run.stderr
    assert "fail_fast: job #0 failed; stopping the other 3 job(s) (policy ALL)" in run.output
    assert [line["status"] for line in results(app)] == ["FAILED", "CANCELLED", "CANCELLED", "CANCELLED"]
    assert elapsed < 60, f"the sweep took {elapsed:.0f} s to stop"
    beat = app.parent / "beat1"
    assert beat.exists(), "job 1 never ran"
    assert not beats_after(beat, 1.0), "job 1 still runs"
    assert leftovers(run.marker) == []


@pytest.mark.parametrize("engine", ENGINES)
def test_ctrl_c_stops_the_sweep_promptly(app: Path, engine: str) -> None:
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, str(app), "-m", f"hydra.sweep.dir={app.parent / 'sweep'}", f"hydra/launcher=parallel_{engine}",
         "hydra.launcher.n_cpus=2", "x=0,1,2", "beat=true"],
        cwd=app.parent, env=_env(marker, app.parent), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # a process group of its own, as a terminal gives a job
    )
    try:
        assert wait_until(lambda: len(list(app.parent.glob("beat*"))) >= 2, 120), "the jobs never started"
    finally:
        output, elapsed = interrupt_group(proc)
    assert proc.returncode != 0, output
    assert elapsed < 30, f"Ctrl-C took {elapsed:.1f} s to stop the sweep"
    for beat in app.parent.glob("beat*"):
        assert not beats_after(beat, 1.0), f"{beat.name} still beats after Ctrl-C"
    assert {line["status"] for line in results(app)} == {"INTERRUPTED"}
    assert leftovers(marker) == [], "the sweep left processes running after Ctrl-C"


@pytest.mark.parametrize(
    "launcher, job_engine, extra",
    [
        # Dask's workers may start processes (loky's) only because the launcher's cluster
        # starts them as non-daemon processes.
        ("parallel_dask", "joblib", []),
        # The job's tasks go to the launcher's own Ray runtime: the jobs must leave it CPUs.
        ("parallel_ray", "ray", ["hydra.launcher.task.num_cpus=0"]),
    ],
)
def test_a_job_can_use_the_parallel_group_itself(tmp_path: Path, launcher: str, job_engine: str, extra: List[str]) -> None:
    script = write_user_app(tmp_path / "nested")
    marker = uuid.uuid4().hex
    proc = subprocess.run(
        [sys.executable, str(script), "-m", f"hydra.sweep.dir={tmp_path / 'nested' / 'sweep'}",
         f"hydra/launcher={launcher}", "hydra.launcher.n_cpus=2", *extra, f"parallel={job_engine}",
         "parallel.n_cpus=1,2"],
        cwd=script.parent, env=_env(marker, tmp_path), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = [json.loads(line) for line in (script.parent / "sweep" / "results.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines] == ["COMPLETED", "COMPLETED"]
    assert leftovers(marker) == []
