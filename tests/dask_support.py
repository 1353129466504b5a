"""Dask fixtures for the whole test session: a local-cluster backend and a cluster address.

``dask_backend`` is the backend every contract test of the Dask engine uses (a
``LocalCluster`` of two single-threaded worker processes). ``dask_cluster_address`` is a
scheduler with two workers that the backend did not start: CI starts one and passes its
address in ``PARALLEL_HYDRA_TEST_DASK_ADDRESS``; otherwise the fixture starts
``dask scheduler`` and ``dask worker`` itself, each in a process group of its own, and
stops those groups (by PID) at the end of the session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List

import pytest

if TYPE_CHECKING:
    from parallel_hydra import BaseParallelBackend

__all__ = ["dask_backend", "dask_cluster", "dask_cluster_address", "DaskTestCluster"]

#: Set by CI to a running scheduler (``tcp://127.0.0.1:PORT``) with two 1-thread workers.
ADDRESS_ENV = "PARALLEL_HYDRA_TEST_DASK_ADDRESS"
_TESTS_DIR = Path(__file__).resolve().parent


@dataclass
class DaskTestCluster:
    """A scheduler with workers, for tests that connect by address."""

    address: str
    #: The processes the fixture started (scheduler, worker launcher); empty in CI.
    processes: List[subprocess.Popen] = field(default_factory=list)

    def alive(self) -> bool:
        """Whether every process the fixture started is still running."""
        return all(p.poll() is None for p in self.processes)


def _dask_command(*args: str) -> List[str]:
    """``dask <args>`` from this interpreter's environment."""
    exe = Path(sys.executable).with_name("dask")
    if exe.exists():
        return [str(exe), *args]
    module = {"scheduler": "distributed.cli.dask_scheduler", "worker": "distributed.cli.dask_worker"}[args[0]]
    return [sys.executable, "-m", module, *args[1:]]


def _stop_group(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a process we started in its own session, and everything in its group."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    # Worker processes of `dask worker` live in the same group; make sure none stayed.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _start_cluster(workdir: Path) -> DaskTestCluster:
    """Start ``dask scheduler`` and ``dask worker --nworkers 2 --nthreads 1`` on 127.0.0.1."""
    env = dict(os.environ)
    # Workers import the tests' task functions (tests/tasks.py) by name.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_TESTS_DIR), env.get("PYTHONPATH", "")) if p)
    scheduler_file = workdir / "scheduler.json"
    log = open(workdir / "cluster.log", "ab")
    processes: List[subprocess.Popen] = []
    try:
        processes.append(
            subprocess.Popen(
                _dask_command("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                              "--scheduler-file", str(scheduler_file)),
                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        )
        end = time.monotonic() + 60
        while not scheduler_file.exists() or not scheduler_file.read_text().strip():
            if time.monotonic() > end or processes[0].poll() is not None:
                raise RuntimeError(f"dask scheduler did not start; see {workdir / 'cluster.log'}")
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        processes.append(
            subprocess.Popen(
                _dask_command("worker", address, "--host", "127.0.0.1", "--nworkers", "2", "--nthreads", "1",
                              "--no-dashboard", "--local-directory", str(workdir)),
                cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        )
        from distributed import Client

        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        return DaskTestCluster(address, processes)
    except BaseException:
        for process in reversed(processes):
            _stop_group(process)
        raise
    finally:
        log.close()


@pytest.fixture(scope="session")
def dask_backend() -> Iterator["BaseParallelBackend"]:
    """A Dask backend on a local cluster of 2 worker processes x 1 thread, for the session."""
    from parallel_hydra.backends.dask import DaskParallelBackend

    backend = DaskParallelBackend(n_cpus=2)
    try:
        yield backend
    finally:
        backend.shutdown()


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[DaskTestCluster]:
    """A Dask cluster the backend does not own: CI's, or one started here."""
    address = os.environ.get(ADDRESS_ENV)
    if address:
        yield DaskTestCluster(address)
        return
    workdir = Path(tempfile.mkdtemp(prefix="parallel_hydra-dask-"))
    cluster = _start_cluster(workdir)
    try:
        yield cluster
    finally:
        for process in reversed(cluster.processes):
            _stop_group(process)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def dask_cluster_address(dask_cluster: DaskTestCluster) -> str:
    """The address (``tcp://127.0.0.1:PORT``) of a cluster with two 1-thread workers."""
    return dask_cluster.address
