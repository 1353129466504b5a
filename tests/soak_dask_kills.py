"""Soak test, run by hand: many RUNNING kills in a row on one owned Dask cluster.

    python tests/soak_dask_kills.py --rounds 500

Each round starts two long tasks on a two-worker ``LocalCluster`` and leaves the
executor with the ``ALL`` policy, which kills both workers. A round fails when its two
tasks do not both start within 30 s, or when it takes longer than that to return; the
script then prints the scheduler's view and exits 1. Under load, this found three races
that the unit tests hit only now and then: the cluster dropping a nanny 15 s after a kill,
a restarted worker taking the port of the one it replaced, and tasks piling up on one
worker while the other had registered but was not running yet.

Not collected by pytest (no ``test_`` prefix): a round takes about a second, and the
races need hundreds of rounds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tasks  # noqa: E402
from parallel_hydra import CancellationPolicy  # noqa: E402
from parallel_hydra.backends.dask import DaskParallelBackend  # noqa: E402

ROUND_LIMIT = 30.0


def _scheduler_view(dask_scheduler: object) -> dict:
    workers = dask_scheduler.workers  # type: ignore[attr-defined]
    return {address: (ws.status.name, ws.pid, len(ws.processing)) for address, ws in workers.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    folder = Path(tempfile.mkdtemp(prefix="parallel_hydra_soak_"))
    slowest = 0.0
    with DaskParallelBackend(n_cpus=2) as backend:
        for round_ in range(args.rounds):
            started = time.monotonic()
            beats = [folder / f"beat{round_}_{i}" for i in range(2)]
            with backend.executor(max_workers=2, cancel_futures=CancellationPolicy.ALL) as executor:
                for beat in beats + [folder / f"later{round_}_{i}" for i in range(4)]:
                    executor.submit(tasks.heartbeat, str(beat), 60.0)
                while not all(beat.exists() for beat in beats):
                    if time.monotonic() - started > ROUND_LIMIT:
                        print(f"round {round_}: the two first tasks did not both start", file=sys.stderr)
                        print(backend.client.run_on_scheduler(_scheduler_view), file=sys.stderr)
                        return 1
                    time.sleep(0.02)
            took = time.monotonic() - started
            slowest = max(slowest, took)
            if took > ROUND_LIMIT:
                print(f"round {round_}: took {took:.1f} s", file=sys.stderr)
                print(backend.client.run_on_scheduler(_scheduler_view), file=sys.stderr)
                return 1
    print(f"{args.rounds} rounds, slowest {slowest:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
