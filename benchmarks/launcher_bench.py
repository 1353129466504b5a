"""How long a sweep takes through each launcher, against the ideal.

    python benchmarks/launcher_bench.py                    # 40 jobs of 0.5 s, 2 slots
    python benchmarks/launcher_bench.py --jobs 20 --seconds 0.2

A small Hydra app whose job sleeps is swept with ``-m`` through Hydra's basic launcher,
Hydra's joblib launcher (where installed), and our three launcher options, each in a
subprocess as a user would run it. For each launcher the start-up is measured too (a
sweep of one job of no work), so that the report separates what the engine costs to
start from what each job costs:

- wall: the whole sweep, start-up included;
- ideal: jobs / slots x seconds, plus that launcher's start-up;
- overhead per job: (wall - start-up - jobs / slots x seconds) / jobs.

Goal (the launcher issue): wall within 1.2x of ideal.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

APP = '''\
import time

import hydra


@hydra.main(version_base="1.3", config_path=None, config_name=None)
def main(cfg):
    time.sleep(float(cfg.get("seconds", 0.0)))


if __name__ == "__main__":
    main()
'''

SLOTS = 2


def launchers() -> Dict[str, List[str]]:
    """Each launcher to compare, as the overrides that pick it."""
    chosen = {
        "basic": [],
        "parallel_joblib": ["hydra/launcher=parallel_joblib", f"hydra.launcher.n_cpus={SLOTS}"],
        "parallel_ray": ["hydra/launcher=parallel_ray", f"hydra.launcher.n_cpus={SLOTS}"],
        # Jobs share Ray worker processes (the default gives each job a fresh one).
        "parallel_ray_reuse": ["hydra/launcher=parallel_ray", f"hydra.launcher.n_cpus={SLOTS}",
                               "hydra.launcher.task.max_calls=0"],
        "parallel_dask": ["hydra/launcher=parallel_dask", f"hydra.launcher.n_cpus={SLOTS}"],
    }
    if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is not None:
        chosen["hydra_joblib"] = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={SLOTS}"]
    return chosen


def sweep(app: Path, overrides: List[str], jobs: int, seconds: float) -> float:
    """Seconds the sweep of ``jobs`` jobs of ``seconds`` each takes, start to exit."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HYDRA_FULL_ERROR": "1"}
    command = [sys.executable, str(app), "-m", *overrides, f"+seconds={seconds}", f"+job=range({jobs})"]
    started = time.perf_counter()
    run = subprocess.run(command, cwd=app.parent, env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - started
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(overrides) or 'basic'} failed:\n{run.stderr[-3000:]}")
    return elapsed


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--launchers", default=",".join(launchers()))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="parallel_hydra_launcher_bench_") as folder:
        app = Path(folder) / "app.py"
        app.write_text(APP)
        print(f"{args.jobs} jobs of {args.seconds} s, {SLOTS} slots")
        print(f"{'launcher':<18} {'start-up s':>10} {'wall s':>8} {'ideal s':>8} {'wall/ideal':>10} {'ms/job':>8}")
        for name in args.launchers.split(","):
            overrides = launchers()[name]
            startup = sweep(app, overrides, 1, 0.0)
            wall = sweep(app, overrides, args.jobs, args.seconds)
            slots = 1 if name == "basic" else SLOTS
            work = math.ceil(args.jobs / slots) * args.seconds
            ideal = startup + work
            per_job = (wall - startup - work) / args.jobs * 1000
            print(f"{name:<18} {startup:>10.1f} {wall:>8.1f} {ideal:>8.1f} {wall / ideal:>10.2f} {per_job:>8.0f}")


if __name__ == "__main__":
    main()
