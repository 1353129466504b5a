"""Running a user's Hydra app in a subprocess, and finding what it left running.

Every app runs with a unique marker in its environment. Processes inherit their
parent's environment, so whatever the app started (loky workers, a Ray runtime, a Dask
cluster) carries the marker too; after the app exits, none of them may be left.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import psutil

MARKER = "PARALLEL_HYDRA_TEST_MARKER"

USER_CONFIG = """\
defaults:
  - parallel: joblib
  - _self_
"""

# A research repo's script: it knows nothing of parallel_hydra but the group name, and
# imports the package only inside the task function.
USER_APP = '''\
import hydra
from hydra.utils import instantiate


def square(x):
    return x * x


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    import parallel_hydra  # noqa: F401

    with instantiate(cfg.parallel) as backend:
        with backend.executor() as executor:
            total = sum(executor.map(square, range(10)))
        print(f"RESULT backend={backend.name} workers={backend.effective_n_jobs(-1)} "
              f"total={total} policy={backend.config.cancel_futures.name}", flush=True)


if __name__ == "__main__":
    main()
'''


def write_user_app(folder: Path) -> Path:
    """A minimal Hydra app in ``folder`` whose config only names our group; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(USER_CONFIG)
    app = folder / "train.py"
    app.write_text(textwrap.dedent(USER_APP))
    return app


def run_app(
    script: Path, args: Sequence[str], cwd: Path, timeout: float = 300, env: Optional[Dict[str, str]] = None
) -> "AppRun":
    """Run ``python script args`` in ``cwd`` with a fresh marker; never hangs past ``timeout``."""
    marker = uuid.uuid4().hex
    full_env = {**os.environ, **(env or {}), MARKER: marker, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return AppRun(proc.returncode, proc.stdout, proc.stderr, marker)


class AppRun:
    def __init__(self, returncode: int, stdout: str, stderr: str, marker: str) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.marker = marker

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def results(self) -> List[str]:
        return [line for line in self.stdout.splitlines() if line.startswith("RESULT")]


def processes_with_marker(marker: str, name: str = MARKER) -> List[psutil.Process]:
    """Live processes whose environment holds ``name=marker``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(name) == marker:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def leftovers(marker: str, grace: float = 20.0, name: str = MARKER) -> List[str]:
    """Processes still carrying ``marker`` after ``grace`` seconds (they may be exiting)."""
    end = time.monotonic() + grace
    while True:
        alive = processes_with_marker(marker, name)
        if not alive or time.monotonic() > end:
            break
        time.sleep(0.2)
    described = []
    for proc in alive:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            continue
    return described


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def wait_for_path(path: Path, timeout: float = 60.0) -> None:
    """Block until a task has created ``path``, failing the test after ``timeout``."""
    assert wait_until(path.exists, timeout), f"{path.name} did not appear within {timeout} s"


def beats_after(path: Path, seconds: float = 1.0) -> bool:
    """Whether the heartbeat file at ``path`` changes within the next ``seconds``."""

    def read() -> Optional[str]:
        try:
            return path.read_text()
        except OSError:
            return None

    before = read()
    return wait_until(lambda: read() != before, seconds)


def interrupt_group(proc: "subprocess.Popen[str]", timeout: float = 60.0) -> "Tuple[str, float]":
    """Ctrl-C as a terminal sends it: SIGINT to ``proc``'s whole process group.

    Returns the app's output and the seconds it took to exit after the signal. An app
    still running after ``timeout`` fails the test, and its group is killed either way.
    """
    import signal

    os.killpg(proc.pid, signal.SIGINT)
    interrupted = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=timeout)
        return output, time.monotonic() - interrupted
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {timeout:.0f} s after Ctrl-C") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
