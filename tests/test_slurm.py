"""Dask on a batch cluster, against a real SLURM (see slurm_support.py): no mocks.

A user's Hydra app runs its tasks inside SLURM jobs; a sweep runs through the launcher on
SLURM (the executor contract suite runs on SLURM in test_slurm_contract.py); and the ways it
can go wrong (a queue that never starts a job, Ctrl-C, no sbatch, a typo'd option) end
with a clear error and nothing left in the queue or on the machine.

Each test's jobs carry a job name of their own, so "nothing left in the queue" is checked
for exactly the jobs it made.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import List

import pytest

from apps import MARKER, interrupt_group, leftovers, run_app
from ray_support import REPO_ROOT, app_env
from slurm_support import SlurmTestCluster, slurm_cluster  # noqa: F401  (the session fixture)

from parallel_hydra import DaskConfig
from parallel_hydra.backends.dask import DaskParallelBackend


def _name() -> str:
    return f"ph-{uuid.uuid4().hex[:10]}"


# -- a user's app ------------------------------------------------------------------------

# A research repo's script that knows nothing of parallel_hydra but the group's name.
SLURM_APP = '''\
import os
import time

import hydra
from hydra.utils import instantiate


def square_where(x):
    return x * x, os.environ.get("SLURM_JOB_ID")


def linger(seconds):
    time.sleep(seconds)
    return seconds


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    with instantiate(cfg.parallel) as backend:
        with backend.executor() as executor:
            if cfg.get("linger"):
                futures = [executor.submit(linger, 600) for _ in range(4)]
                while not any(f.running() for f in futures):
                    time.sleep(0.05)
                time.sleep(1.0)
                print("STARTED", flush=True)
                futures[0].result()
            pairs = list(executor.map(square_where, range(10)))
    total = sum(value for value, _ in pairs)
    jobs = sorted({job for _, job in pairs if job})
    print(f"RESULT total={total} in_jobs={sum(1 for _, job in pairs if job)} jobs={','.join(jobs)}", flush=True)
    return os.environ.get("SLURM_JOB_ID")


if __name__ == "__main__":
    main()
'''

SLURM_CONFIG = """\
defaults:
  - parallel: joblib
  - _self_
"""


def _write_app(folder: Path) -> Path:
    (folder / "config.yaml").write_text(SLURM_CONFIG)
    app = folder / "train.py"
    app.write_text(textwrap.dedent(SLURM_APP))
    return app


def _jobs_of(output: str) -> List[str]:
    """The batch job ids the backend logged as submitted."""
    found = re.findall(r"batch job\(s\) (\d+(?:, \d+)*)", output)
    return sorted({job for group in found for job in group.split(", ")})


def test_an_apps_tasks_run_inside_slurm_jobs_and_leave_nothing(slurm_cluster: SlurmTestCluster, tmp_path: Path) -> None:
    app = _write_app(tmp_path)
    name = _name()
    started = time.monotonic()
    run = run_app(app, ["parallel=dask", "+parallel/cluster=slurm", "parallel.n_workers=2",
                        f"parallel.cluster.job_name={name}", "parallel.cluster.memory=1GB",
                        # any other keyword argument of SLURMCluster passes through
                        "+parallel.cluster.job_mem=700M"],
                  cwd=tmp_path, env=app_env(**slurm_cluster.env), timeout=180)
    assert run.returncode == 0, run.output[-4000:]
    (result,) = run.results()
    assert "total=285 in_jobs=10" in result, result
    jobs = re.search(r" jobs=(\S+)", result).group(1).split(",")
    assert set(jobs) <= set(_jobs_of(run.output)) and jobs, run.output[-3000:]
    # The exact call and the job script are logged at INFO (Hydra apps log INFO).
    assert "dask_jobqueue.SLURMCluster(" in run.output and "#SBATCH --mem=700M" in run.output
    assert f"#SBATCH -J {name}" in run.output
    assert slurm_cluster.jobs(name) == []
    assert leftovers(run.marker) == []
    assert time.monotonic() - started < 60


def test_a_sweep_runs_through_the_launcher_on_slurm(slurm_cluster: SlurmTestCluster, tmp_path: Path) -> None:
    app = _write_app(tmp_path)
    name = _name()
    run = run_app(app, ["-m", "hydra/launcher=parallel_dask", "+hydra/launcher/cluster=slurm",
                        "hydra.launcher.n_workers=2", f"hydra.launcher.cluster.job_name={name}", "+seed=range(4)"],
                  cwd=tmp_path, env=app_env(**slurm_cluster.env), timeout=180)
    assert run.returncode == 0, run.output[-4000:]
    (results,) = list((tmp_path / "multirun").glob("*/*/results.jsonl"))
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [row["status"] for row in rows] == ["COMPLETED"] * 4
    # Each job ran in a SLURM job (its return value), and its own tasks on joblib there.
    assert all(row["return_value"] in _jobs_of(run.output) for row in rows), rows
    assert slurm_cluster.jobs(name) == []
    assert leftovers(run.marker) == []


def test_ctrl_c_of_an_app_on_slurm_leaves_no_job_queued(slurm_cluster: SlurmTestCluster, tmp_path: Path) -> None:
    app = _write_app(tmp_path)
    name = _name()
    marker = uuid.uuid4().hex
    env = app_env(**slurm_cluster.env, **{MARKER: marker})
    proc = subprocess.Popen(
        [sys.executable, str(app), "parallel=dask", "+parallel/cluster=slurm", "parallel.n_workers=2",
         f"parallel.cluster.job_name={name}", "parallel.cluster.memory=1GB", "+linger=true"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines: List[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("STARTED"):
                break
        assert lines and lines[-1].startswith("STARTED"), "".join(lines)[-3000:]
        assert slurm_cluster.jobs(name), "no job of the app in the queue while its tasks run"
        output, seconds = interrupt_group(proc, timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert seconds < 30, f"the app took {seconds:.1f} s to exit after Ctrl-C"
    assert slurm_cluster.jobs(name) == [], "".join(lines) + output
    assert leftovers(marker) == []


# -- what goes wrong -------------------------------------------------------------------


def test_a_queue_that_never_starts_a_job_fails_within_connect_timeout(slurm_cluster: SlurmTestCluster) -> None:
    name = _name()
    fields = {**slurm_cluster.cluster_fields(name), "queue": "down"}
    started = time.monotonic()
    with pytest.raises(TimeoutError) as failure:
        DaskParallelBackend(n_workers=2, connect_timeout=3, cluster=fields)
    took = time.monotonic() - started
    message = str(failure.value)
    assert took < 3 + 15, f"took {took:.1f} s"
    assert "connect_timeout" in message and "still queued" in message and "PartitionDown" in message, message
    ids = re.findall(r"batch job\(s\) (\d+(?:, \d+)*)", message)[0].split(", ")
    assert len(ids) == 2, message
    assert slurm_cluster.jobs(name) == []


def test_no_sbatch_on_path_fails_at_once_saying_so(slurm_cluster: SlurmTestCluster, monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder with no sbatch in it
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"'sbatch'.*no sbatch is on PATH"):
        DaskParallelBackend(n_workers=1, cluster=slurm_cluster.cluster_fields(_name()))
    assert time.monotonic() - started < 5


def test_a_submission_the_scheduler_refuses_fails_at_once_with_its_message(slurm_cluster: SlurmTestCluster) -> None:
    name = _name()
    fields = {**slurm_cluster.cluster_fields(name), "queue": "nosuchpartition"}
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="submitting a batch job failed.*(?i:invalid partition)"):
        DaskParallelBackend(n_workers=1, connect_timeout=60, cluster=fields)
    assert time.monotonic() - started < 20
    assert slurm_cluster.jobs(name) == []


def test_an_unknown_cluster_option_lists_the_options(tmp_path: Path) -> None:
    app = _write_app(tmp_path)
    run = run_app(app, ["parallel=dask", "+parallel/cluster=slrum"], cwd=tmp_path, env=app_env(), timeout=120)
    assert run.returncode != 0
    for option in ("local", "slurm", "pbs", "sge", "lsf", "htcondor"):
        assert option in run.output, run.output[-2000:]
    with pytest.raises(ValueError, match="cluster must be null or one of local, slurm, pbs, sge, lsf, htcondor"):
        DaskConfig(cluster="slrum")


def test_bad_cluster_fields_are_refused_naming_the_key(tmp_path: Path) -> None:
    app = _write_app(tmp_path)
    run = run_app(app, ["parallel=dask", "+parallel/cluster=slurm", "parallel.cluster.cores=abc"],
                  cwd=tmp_path, env=app_env(), timeout=120)
    assert run.returncode != 0 and "parallel.cluster.cores" in run.output, run.output[-2000:]
    with pytest.raises(ValueError, match=r"cluster\.processes \(4\) must be at most cluster\.cores \(2\)"):
        DaskConfig(cluster={"_target_": "dask_jobqueue.SLURMCluster", "cores": 2, "processes": 4})
    with pytest.raises(ValueError, match=r"cluster\.memory must be a size"):
        DaskConfig(cluster={"_target_": "dask_jobqueue.PBSCluster", "memory": "lots"})
    with pytest.raises(ValueError, match=r"cluster.*address"):
        DaskConfig(cluster="slurm", address="tcp://127.0.0.1:8786")


def test_local_is_todays_local_cluster() -> None:
    assert DaskConfig(cluster="local").cluster is None
    assert DaskConfig(cluster={"_target_": "distributed.LocalCluster"}).cluster is None
    kwargs = DaskConfig(cluster="pbs").cluster
    assert kwargs is not None and kwargs["_target_"] == "dask_jobqueue.PBSCluster" and "account" not in kwargs


# -- the README's HPC commands ---------------------------------------------------------


def _readme_hpc_lines() -> List[str]:
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    lines = []
    for block in blocks:
        if "cluster=slurm" not in block:
            continue
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_the_readme_hpc_commands_run_on_slurm(slurm_cluster: SlurmTestCluster, tmp_path: Path) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    (config,) = re.findall(r"^```yaml\n(.*?)^```", readme, flags=re.S | re.M)
    (app,) = [code for code in re.findall(r"^```python\n(.*?)^```", readme, flags=re.S | re.M) if "@hydra.main" in code]
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(config)
    (tmp_path / "train.py").write_text(app)
    lines = _readme_hpc_lines()
    assert len(lines) >= 2, lines
    for line in lines:
        words = shlex.split(line)
        assert words[:2] == ["python", "train.py"], line
        run = run_app(tmp_path / "train.py", words[2:], cwd=tmp_path, env=app_env(**slurm_cluster.env), timeout=180)
        assert run.returncode == 0, f"{line}\n{run.output[-3000:]}"
        assert leftovers(run.marker) == []
        if "-m" not in words:
            assert re.search(r"^10000$", run.stdout, flags=re.M), f"{line} printed {run.stdout!r}"
    assert slurm_cluster.jobs("dask-worker") == []
