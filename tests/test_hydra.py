"""The ``parallel`` config group, as a user's own Hydra app sees it.

Every test runs a small app in a temporary folder of its own, in a subprocess, against
the installed package: the app's config has only ``defaults: [{parallel: joblib}]``
and no YAML of ours. After each app exits, nothing it started may still run.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from apps import leftovers, run_app, write_user_app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def user_app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_user_app(tmp_path_factory.mktemp("research_repo"))


def run_ok(app: Path, *args: str):
    run = run_app(app, args, cwd=app.parent)
    assert run.returncode == 0, run.output
    assert leftovers(run.marker) == [], "the app left processes running"
    return run


def test_composes_in_a_foreign_app_with_no_yaml_of_ours(user_app: Path) -> None:
    run = run_ok(user_app, "parallel=joblib", "parallel.n_cpus=1")
    assert run.results() == ["RESULT backend=joblib workers=1 total=285 policy=PENDING"]


def test_every_field_can_be_overridden(user_app: Path) -> None:
    run = run_ok(user_app, "parallel.cancel_futures=ALL", "parallel.wait_timeout=0.5", "parallel.logging_level=20")
    assert run.results()[0].endswith("policy=ALL")


def test_mapping_fields_can_be_set_on_the_command_line(user_app: Path) -> None:
    # OmegaConf cannot merge a mapping into a null Optional[Dict]: these fields take Any.
    for engine, field, value, shown in (
        ("dask", "task.resources", "{GPU:1}", "GPU: 1"),
        ("ray", "task.resources", "{special:2}", "special: 2"),
        ("ray", "runtime_env", "{env_vars:{A:'1'}}", "A: '1'"),
        ("ray", "task.runtime_env", "{env_vars:{B:'2'}}", "B: '2'"),
    ):
        run = run_ok(user_app, f"parallel={engine}", f"parallel.{field}={value}", "--cfg", "job")
        assert shown in run.output, (field, run.output[-2000:])
    run = run_app(user_app, ["parallel=dask", "parallel.n_cpus=1", "parallel.task.resources={GPU:-1}"], cwd=user_app.parent)
    assert run.returncode != 0
    assert "task.resources.GPU" in run.output and "Traceback" not in run.output, run.output[-2000:]


@pytest.mark.parametrize("engine", ["ray", "dask"])
def test_each_engine_is_one_override_away(user_app: Path, engine: str) -> None:
    run = run_ok(user_app, f"parallel={engine}", "parallel.n_cpus=2")
    assert run.results() == [f"RESULT backend={engine} workers=2 total=285 policy=PENDING"]


def test_multirun_gives_each_job_its_own_backend(user_app: Path) -> None:
    run = run_ok(user_app, "-m", "parallel.n_cpus=1,2")
    assert [r.split()[2] for r in run.results()] == ["workers=1", "workers=2"]


def test_multirun_gives_each_ray_job_a_runtime_of_its_size(user_app: Path) -> None:
    run = run_ok(user_app, "-m", "parallel=ray", "parallel.n_cpus=1,2")
    assert [r.split()[1:3] for r in run.results()] == [["backend=ray", "workers=1"], ["backend=ray", "workers=2"]]


def test_multirun_sweeps_engines(user_app: Path) -> None:
    run = run_ok(user_app, "-m", "parallel=joblib,ray")
    assert [r.split()[1] for r in run.results()] == ["backend=joblib", "backend=ray"]


def test_multirun_sweeps_engines_and_sizes(user_app: Path) -> None:
    run = run_ok(user_app, "-m", "parallel=joblib,dask", "parallel.n_cpus=1,2")
    got = sorted(tuple(r.split()[1:3]) for r in run.results())
    assert got == sorted((f"backend={b}", f"workers={n}") for b in ("joblib", "dask") for n in (1, 2))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("parallel=nosuch", r"Could not find 'parallel/nosuch'[\s\S]*dask[\s\S]*joblib[\s\S]*ray"),
        ("parallel.n_cpus=abc", r"parallel\.n_cpus"),
        ("parallel.n_cpus=0", r"n_cpus must be an integer >= 1 or null; got 0"),
        ("parallel.n_cpus=-3", r"n_cpus must be an integer >= 1 or null; got -3"),
        ("parallel.ncpus=4", r"Key 'ncpus' not in 'JoblibNode'[\s\S]*parallel\.ncpus"),
        ("parallel.cancel_futures=SOMETIMES", r"SOMETIMES[\s\S]*NONE, PENDING, RUNNING, ALL[\s\S]*parallel\.cancel_futures"),
        ("parallel.wait_timeout=0", r"wait_timeout must be a number > 0"),
        ("parallel.address=somewhere:1", r"address must be null for the joblib backend"),
        ("parallel.backend=ray", r"backend is 'ray', but this is the 'joblib' backend"),
        # The launcher's fields, checked when a sweep starts (-m): as short.
        ("-m hydra/launcher=parallel_joblib hydra.launcher.n_cpus=0", r"parallel_joblib: .*n_cpus must be an integer >= 1"),
        ("-m hydra/launcher=parallel_ray hydra.launcher.max_concurrent_jobs=-3",
         r"hydra\.launcher\.max_concurrent_jobs must be an integer >= 1 or null; got -3"),
        ("-m hydra/launcher=parallel_dask hydra.launcher.fail_fast=maybe", r"hydra\.launcher\.fail_fast"),
    ],
)
def test_bad_overrides_fail_naming_the_key(user_app: Path, override: str, expected: str) -> None:
    run = run_app(user_app, override.split(), cwd=user_app.parent, timeout=120)
    assert run.returncode != 0
    assert re.search(expected, run.output), run.output
    assert "Traceback" not in run.output


@pytest.mark.parametrize("engine, address", [("ray", "127.0.0.1:1"), ("dask", "tcp://127.0.0.1:1")])
def test_an_unreachable_address_fails_soon_naming_it(user_app: Path, engine: str, address: str) -> None:
    # Nothing listens there: known at once, so the default connect_timeout (60 s) is not waited out.
    started = time.monotonic()
    run = run_app(user_app, [f"parallel={engine}", f"parallel.address={address}"], cwd=user_app.parent, timeout=180)
    assert time.monotonic() - started < 30, "a refused connection waited for the whole connect_timeout"
    assert run.returncode != 0
    assert "connection refused" in run.output
    assert address in run.output, run.output
    assert leftovers(run.marker) == []


def test_the_example_app_runs_on_the_default(tmp_path: Path) -> None:
    run = run_app(REPO / "examples" / "train.py", ["bootstrap.n_resamples=40"], cwd=tmp_path)
    assert run.returncode == 0, run.output
    assert re.search(r"backend=joblib workers=\d+ cv_r2=0\.\d+ bootstrap_r2_95%_ci=\[0\.\d+, 0\.\d+\] resamples=40", run.stdout)
    assert leftovers(run.marker) == []


def test_the_example_app_sweeps_policies(tmp_path: Path) -> None:
    run = run_app(REPO / "examples" / "train.py",
                  ["parallel.n_cpus=1", "bootstrap.n_resamples=20", "-m", "parallel.cancel_futures=NONE,ALL"], cwd=tmp_path)
    assert run.returncode == 0, run.output
    assert len(re.findall(r"backend=joblib workers=1 ", run.stdout)) == 2


def test_the_example_gives_one_interval_on_any_machine_and_engine(tmp_path: Path) -> None:
    # One seed, one result: the CPU count and the engine change how fast, never what.
    settings = [["parallel.n_cpus=1"], ["parallel.n_cpus=2"], ["parallel=ray", "parallel.n_cpus=2"],
                ["parallel=dask", "parallel.n_cpus=1"]]
    runs = [run_app(REPO / "examples" / "train.py", ["bootstrap.n_resamples=40", *extra], cwd=tmp_path)
            for extra in settings]
    for run in runs:
        assert run.returncode == 0, run.output
    intervals = {re.search(r"ci=(\[[^\]]+\])", r.stdout).group(1) for r in runs}
    assert len(intervals) == 1, intervals


def test_the_example_is_reproducible_by_seed(tmp_path: Path) -> None:
    runs = [run_app(REPO / "examples" / "train.py", ["bootstrap.n_resamples=40", f"bootstrap.seed={s}"], cwd=tmp_path)
            for s in (1, 1, 2)]
    intervals = [re.search(r"ci=(\[[^\]]+\])", r.stdout).group(1) for r in runs]
    assert intervals[0] == intervals[1] != intervals[2]
