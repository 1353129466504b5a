"""Ray fixtures for the whole session: a local runtime, and a cluster reached by address.

Ray allows one session per process, so the session's local runtime (``ray_backend``)
and a connection to ``ray_cluster_address`` cannot live in the same process: tests use
the cluster from subprocess apps, which is what a user's app does anyway.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import pytest

__all__ = [
    "ray_backend",
    "ray_cluster_address",
    "ray_head",
    "REPO_ROOT",
    "free_port",
    "port_accepts",
    "run_app",
]

#: The repository root: subprocess apps run there so they import this checkout.
REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"

#: Environment variable of CI that names a running head (HOST:PORT).
ADDRESS_ENV = "PARALLEL_HYDRA_TEST_RAY_ADDRESS"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def app_env(**extra: str) -> dict:
    """Environment of a subprocess app: this checkout first on the path.

    ``RAY_AUTH_MODE`` is dropped: a local ``ray.init`` in this process sets it, and the
    apps must work as a user's would, from a clean environment.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    env.update(extra)
    return env


def run_app(code: str, timeout: float = 120.0, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` as a Python app in a subprocess, bounded by ``timeout`` seconds."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(REPO_ROOT),
        env=app_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def ray_backend() -> Iterator["object"]:
    """A local 2-CPU Ray runtime shared by the whole session, stopped at its end."""
    from parallel_hydra.backends.ray import RayParallelBackend

    # Workers import test functions by name (tests/tasks.py, test modules): put the
    # test folder and this checkout on their path, through the job's runtime_env.
    path = os.pathsep.join([str(TESTS_DIR), str(REPO_ROOT)])
    with RayParallelBackend(n_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": path}}) as backend:
        yield backend


def _stop_head(proc: subprocess.Popen) -> None:
    """Stop the head we started: its process group and descendants, by PID only."""
    import psutil

    try:
        family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        family = [proc.pid]
    def gone_within(grace: float) -> bool:
        end = time.monotonic() + grace
        while True:
            alive = []
            for pid in family:
                try:
                    if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                        alive.append(pid)
                except psutil.Error:
                    pass
            if not alive:
                return True
            if time.monotonic() > end:
                return False
            time.sleep(0.2)

    # A SIGTERMed Ray node drains for up to 30 s; give it a moment, then kill.
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for pid in family:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if gone_within(grace):
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


@contextmanager
def ray_head(log_path: Path) -> Iterator[Tuple[str, subprocess.Popen]]:
    """Start a Ray head on 127.0.0.1 in a process group of its own; ``(address, process)``.

    Stopped by PID when the block ends (never with ``ray stop``, which would stop every
    Ray on the machine).
    """
    port = free_port()
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli) if ray_cli.exists() else "ray",
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    log = open(log_path, "w")
    proc = subprocess.Popen(command, cwd=str(REPO_ROOT), env=app_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.monotonic() + 90
        ready: Optional[bool] = None
        while time.monotonic() < end:
            if proc.poll() is not None:
                break
            if port_accepts("127.0.0.1", port) and "Ray runtime started" in log_path.read_text(errors="replace"):
                ready = True
                break
            time.sleep(0.25)
        if not ready:
            raise RuntimeError(f"the Ray head did not start within 90 s; its log:\n{log_path.read_text(errors='replace')[-3000:]}")
        yield f"127.0.0.1:{port}", proc
    finally:
        _stop_head(proc)
        log.close()


@pytest.fixture(scope="session")
def ray_cluster_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``HOST:PORT`` of a running Ray head: CI's, or one started here for the session."""
    given = os.environ.get(ADDRESS_ENV)
    if given:
        yield given
        return
    with ray_head(tmp_path_factory.mktemp("ray_head") / "head.log") as (address, _):
        yield address
