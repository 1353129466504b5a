"""The executor contract (test_executor_contract.py) once more, on a Dask backend whose
workers run in SLURM batch jobs (see slurm_support.py).

The ``backend`` fixture here replaces conftest's for the tests of this module. It holds
both CPUs of the test node while the module runs, so it lives in a module of its own:
other SLURM tests would otherwise wait for CPUs.
"""

from __future__ import annotations

import os
import uuid
from typing import Iterator

import pytest

import tasks
from slurm_support import SlurmTestCluster, slurm_cluster  # noqa: F401  (the session fixture)
from test_executor_contract import *  # noqa: F401,F403  (the contract's tests)

from parallel_hydra.backends.dask import DaskParallelBackend


@pytest.fixture(scope="module")
def backend(slurm_cluster: SlurmTestCluster) -> Iterator[DaskParallelBackend]:  # noqa: F811
    """A Dask backend on 2 SLURM jobs of one single-threaded worker each."""
    name = f"ph-{uuid.uuid4().hex[:10]}"
    backend = DaskParallelBackend(n_workers=2, connect_timeout=60, cluster=slurm_cluster.cluster_fields(name))
    try:
        yield backend
    finally:
        backend.shutdown()
    assert slurm_cluster.jobs(name) == []


def slurm_job_id() -> str:
    """The SLURM job a task runs in (workers import this module by name)."""
    return os.environ.get("SLURM_JOB_ID", "")


def test_a_task_runs_in_a_slurm_job(backend: DaskParallelBackend) -> None:
    with backend.executor() as executor:
        assert executor.submit(slurm_job_id).result(timeout=60).isdigit()
        assert executor.submit(tasks.add, 1, 2).result(timeout=60) == 3
