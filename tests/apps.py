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
from typing import Dict, List, Optional, Sequence

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


def processes_with_marker(marker: str) -> List[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def leftovers(marker: str, grace: float = 20.0) -> List[str]:
    """Processes still carrying ``marker`` after ``grace`` seconds (they may be exiting)."""
    end = time.monotonic() + grace
    while True:
        alive = [p for p in processes_with_marker(marker) if p.status() != psutil.STATUS_ZOMBIE]
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
