"""Ctrl-C, signals and interpreter exit in a real app, on every engine.

A terminal's Ctrl-C sends SIGINT to the whole foreground process group: the app and
every worker process it started on this machine. The app below runs a ``MapReduceJob``
of long tasks with the default policy (``PENDING``) in its own process group; the test
interrupts the group and checks that the app exits promptly, that the tasks stop, and
that nothing the app started is left running.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from apps import MARKER, beats_after, interrupt_group, leftovers, wait_until
from ray_support import app_env

ENGINES = ["joblib", "ray", "dask"]

INTERRUPTED_APP = '''\
import os
import sys
import time

import hydra
from hydra.utils import instantiate


def beat(chunk, job_id):
    path = os.path.join(os.environ["BEAT_DIR"], f"beat{job_id}")
    end = time.time() + 300
    while time.time() < end:
        with open(path, "w") as out:
            out.write(str(time.time()))
        time.sleep(0.02)
    return job_id


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg):
    from parallel_hydra import MapReduceJob

    with instantiate(cfg.parallel) as backend:
        print("STARTED", flush=True)
        MapReduceJob(list(range(4)), beat, config=backend, n_jobs=4)()


if __name__ == "__main__":
    main()
'''

EXITING_APP = '''\
import os
import sys

from parallel_hydra import ParallelConfig, init_parallel_backend


def mark(i):
    import time

    time.sleep(0.2)
    open(os.path.join(os.environ["BEAT_DIR"], f"done{i}"), "w").close()


if __name__ == "__main__":
    backend = init_parallel_backend({"backend": sys.argv[1], "n_cpus": 2})
    executor = backend.executor(max_workers=1, cancel_futures="NONE")
    for i in range(6):
        executor.submit(mark, i)
    print("SUBMITTED", flush=True)
    # No shutdown: the interpreter exits with tasks pending, which NONE must still run.
'''


def _start(script: Path, args: list, beat_dir: Path) -> "tuple[subprocess.Popen, str]":
    marker = uuid.uuid4().hex
    env = app_env(BEAT_DIR=str(beat_dir), HYDRA_FULL_ERROR="1", **{MARKER: marker})
    proc = subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=script.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal gives a job
    )
    return proc, marker


def _start_interrupted_app(tmp_path: Path, engine: str, beat_dir: Path) -> "tuple[subprocess.Popen, str]":
    """The app of long tasks above, on ``engine``, started in its own process group."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "config.yaml").write_text("defaults:\n  - parallel: joblib\n  - _self_\n")
    script = app_dir / "train.py"
    script.write_text(INTERRUPTED_APP)
    beat_dir.mkdir()
    return _start(script, [f"parallel={engine}", "parallel.n_cpus=2"], beat_dir)


@pytest.mark.parametrize("engine", ENGINES)
def test_ctrl_c_on_the_process_group_stops_the_app_and_everything_it_started(engine: str, tmp_path: Path) -> None:
    beat_dir = tmp_path / "beats"
    proc, marker = _start_interrupted_app(tmp_path, engine, beat_dir)
    try:
        started = wait_until(lambda: len(list(beat_dir.glob("beat*"))) >= 2, 120)
        assert started, "the app's tasks never started"
    finally:
        output, elapsed = interrupt_group(proc)
    assert proc.returncode != 0, output
    assert elapsed < 30, f"Ctrl-C took {elapsed:.1f} s to stop the app"
    assert "KeyboardInterrupt" in output, output[-3000:]
    for beat in beat_dir.glob("beat*"):
        assert not beats_after(beat, 1.0), f"{beat.name} still beats after Ctrl-C"
    assert leftovers(marker) == [], "the app left processes running after Ctrl-C"


#: The command lines of the agents a Ray runtime starts beside its raylet.
_RAY_AGENT = re.compile(r"ray/dashboard/agent\.py|ray/_private/runtime_env/agent/main\.py")


def _ray_version() -> "tuple[int, ...]":
    from importlib.metadata import version

    return tuple(int(part) for part in version("ray").split(".")[:2])


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
@pytest.mark.parametrize("engine", ENGINES)
def test_an_app_ended_by_a_signal_to_it_alone_leaves_nothing_running(engine: str, how: str, tmp_path: Path) -> None:
    # `kill PID`, a process manager, or the out-of-memory killer: only the app gets the
    # signal, and it may run no clean-up at all. Its workers must notice and end, with
    # the tasks they run (the app's tasks start no processes of their own here).
    beat_dir = tmp_path / "beats"
    proc, marker = _start_interrupted_app(tmp_path, engine, beat_dir)
    try:
        assert wait_until(lambda: len(list(beat_dir.glob("beat*"))) >= 2, 120), "the app's tasks never started"
        os.kill(proc.pid, getattr(signal, how))
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = leftovers(marker, grace=30.0)
    try:
        unexpected = left
        if engine == "ray" and _ray_version() < (2, 60):
            # Ray 2.9 (our floor) ends its runtime with its driver, but not the two
            # agents the runtime started; Ray 2.60 ends them too (see the README).
            unexpected = [line for line in left if not _RAY_AGENT.search(line)]
        assert unexpected == [], f"after {how} to the app alone, its processes ran on"
        for beat in beat_dir.glob("beat*"):
            assert not beats_after(beat, 1.0), f"{beat.name} still beats"
    finally:
        for line in left:  # by PID, only what this app started (its marker)
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.parametrize("engine", ENGINES)
def test_pending_tasks_under_none_still_run_when_the_program_ends(engine: str, tmp_path: Path) -> None:
    script = tmp_path / "exiting.py"
    script.write_text(EXITING_APP)
    proc, marker = _start(script, [engine], tmp_path)
    try:
        output, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert sorted(p.name for p in tmp_path.glob("done*")) == [f"done{i}" for i in range(6)], output[-3000:]
    assert leftovers(marker) == []
