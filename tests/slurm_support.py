"""SLURM for the tests of Dask on batch clusters: CI's, or a private one started here.

CI starts a one-node SLURM with ``.ci/slurm.sh`` and says so with
``PARALLEL_HYDRA_TEST_SLURM=1`` and ``SLURM_CONF``. Elsewhere, when the SLURM and munge
binaries are installed, :func:`slurm_cluster` starts its own with the same script (in a
temporary folder, on free ports) and stops it at the end of the session; without them,
the tests that need SLURM are skipped (and in CI a skip fails the run).

Everything runs on 127.0.0.1: the Dask scheduler (in the test process or the app) and
the workers in the batch jobs listen there. Apps get that from Dask's config in their
environment (:attr:`SlurmTestCluster.env`), as a site's ``jobqueue.yaml`` would give it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

__all__ = ["slurm_cluster", "SlurmTestCluster", "SLURM_ENV", "slurm_binaries"]

#: Set by CI when it runs a SLURM for the tests (SLURM_CONF then points at it).
SLURM_ENV = "PARALLEL_HYDRA_TEST_SLURM"
_REPO = Path(__file__).resolve().parent.parent
_SCRIPT = _REPO / ".ci" / "slurm.sh"
_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def slurm_binaries() -> List[str]:
    """The SLURM and munge programs that are missing here."""
    return [name for name in _BINARIES if shutil.which(name) is None]


def dask_env(log_directory: Path) -> Dict[str, str]:
    """Dask config (as environment variables) that keeps a SLURM cluster on 127.0.0.1."""
    return {
        "DASK_JOBQUEUE__SLURM__SCHEDULER_OPTIONS": '{"host": "127.0.0.1"}',
        "DASK_JOBQUEUE__SLURM__WORKER_EXTRA_ARGS": '["--host", "127.0.0.1"]',
        "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(log_directory),
    }


@dataclass
class SlurmTestCluster:
    """A SLURM the tests may submit to."""

    #: Its slurm.conf.
    conf: str
    #: A folder for the jobs' output files.
    log_directory: Path
    #: What an app needs in its environment: SLURM_CONF and Dask's config for 127.0.0.1.
    env: Dict[str, str] = field(default_factory=dict)

    def jobs(self, name: str = "") -> List[str]:
        """``ID STATE NAME`` of each job in the queue (of job name ``name``, if given)."""
        done = subprocess.run(["squeue", "--noheader", "--format=%i %T %j"], capture_output=True, text=True,
                              timeout=30, env={**os.environ, "SLURM_CONF": self.conf})
        assert done.returncode == 0, done.stderr
        lines = [line.split() for line in done.stdout.splitlines() if line.strip()]
        return [" ".join(words) for words in lines if not name or words[2] == name]

    def cluster_fields(self, job_name: str) -> Dict[str, object]:
        """``cluster`` fields for a backend in the test process (whose Dask config was read
        before the fixture ran): 127.0.0.1, the jobs' log folder, the tests on the path."""
        return {
            "_target_": "dask_jobqueue.SLURMCluster",
            "cores": 1,
            "memory": "1GB",
            "job_name": job_name,
            "host": "127.0.0.1",
            "worker_extra_args": ["--host", "127.0.0.1"],
            "log_directory": str(self.log_directory),
            # The workers import the tests' task functions by name.
            "job_script_prologue": [f"export PYTHONPATH={Path(__file__).resolve().parent}:$PYTHONPATH"],
        }


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmTestCluster]:
    """CI's SLURM, or one started here with .ci/slurm.sh (stopped at the end)."""
    logs = Path(tempfile.mkdtemp(prefix="parallel_hydra-slurm-jobs-"))
    try:
        if os.environ.get(SLURM_ENV):
            conf = os.environ.get("SLURM_CONF")
            assert conf, f"{SLURM_ENV} is set but SLURM_CONF is not"
            yield SlurmTestCluster(conf, logs, {"SLURM_CONF": conf, **dask_env(logs)})
            return
        missing = slurm_binaries()
        if missing:
            pytest.skip(f"SLURM is not installed here (no {', '.join(missing)}): apt-get install slurm-wlm munge")
        workdir = Path(tempfile.mkdtemp(prefix="parallel_hydra-slurm-"))
        started = subprocess.run(["bash", str(_SCRIPT), "start", str(workdir)], capture_output=True, text=True, timeout=120)
        try:
            assert started.returncode == 0, f"could not start SLURM:\n{started.stdout}{started.stderr}"
            conf = str(workdir / "slurm.conf")
            # The backends of the test process run sbatch too.
            before = os.environ.get("SLURM_CONF")
            os.environ["SLURM_CONF"] = conf
            try:
                yield SlurmTestCluster(conf, logs, {"SLURM_CONF": conf, **dask_env(logs)})
            finally:
                if before is None:
                    os.environ.pop("SLURM_CONF", None)
                else:
                    os.environ["SLURM_CONF"] = before
        finally:
            subprocess.run(["bash", str(_SCRIPT), "stop", str(workdir)], capture_output=True, text=True, timeout=120)
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
