"""How much parallel_hydra costs over the raw engines, and how close it gets to ideal.

    python benchmarks/bench.py                      # every engine, 2 workers
    python benchmarks/bench.py --engines joblib --tasks 2000 --rounds 5

For each engine, in one process:

- overhead: N trivial tasks, submitted all at once and then collected, through our
  executor and through the raw engine (loky's executor, ``ray.remote`` + ``ray.get``,
  ``client.submit`` + ``result``, and Dask's own ``client.get_executor()``), in
  alternating rounds; the best round of each is kept, and the ratio ours/raw printed;
- map: ``executor.map`` of the same tiny function, against ``joblib.Parallel``;
- sleep: 100 tasks of 50 ms on 2 workers, against the ideal 2.5 s;
- put: one 100 MB array sent by ``put`` handle to 20 tasks, against passing it each time.

Goals: overhead ratio <= 1.15; map within reach of joblib.Parallel; sleep <= 1.05 x ideal.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable, Dict, List

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402

from parallel_hydra import init_parallel_backend  # noqa: E402

WORKERS = 2


def noop(x: Any) -> Any:
    return x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def nbytes(array: np.ndarray) -> int:
    return int(array.nbytes)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(contenders: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, float]:
    """Best time of each contender over ``rounds`` rounds, run in turn."""
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            best[name] = min(best[name], timed(fn))
    return best


def raw_contenders(engine: str, backend: Any, n: int) -> Dict[str, Callable[[], Any]]:
    if engine == "joblib":
        from joblib.externals.loky.process_executor import ProcessPoolExecutor

        from parallel_hydra.backends.joblib import _BoundedLokyPool

        pool = ProcessPoolExecutor(WORKERS)
        # loky's own executor, with the call queue our contract allows (max_workers
        # tasks ahead of the running ones, where loky's default is 2 * max_workers + 1):
        # it tells what the bound costs and what our executor costs on top.
        bounded = _BoundedLokyPool(WORKERS)
        for p in (pool, bounded):
            raw_contenders.cleanup.append(p.shutdown)
            p.submit(noop, 0).result()
        return {
            "raw loky executor": lambda: [f.result() for f in [pool.submit(noop, i) for i in range(n)]],
            "loky, our queue bound": lambda: [f.result() for f in [bounded.submit(noop, i) for i in range(n)]],
        }
    if engine == "ray":
        import ray

        remote_noop = ray.remote(noop)
        return {
            "raw ray.remote+get": lambda: ray.get([remote_noop.remote(i) for i in range(n)]),
            "ray, our window": lambda: ray_windowed(remote_noop, n, 2 * WORKERS),
        }
    if engine == "dask":
        client = backend.client
        dask_executor = client.get_executor(pure=False)
        return {
            "raw client.submit": lambda: [f.result() for f in [client.submit(noop, i, pure=False) for i in range(n)]],
            "dask get_executor": lambda: [f.result() for f in [dask_executor.submit(noop, i) for i in range(n)]],
        }
    raise ValueError(engine)


def ray_windowed(remote_fn: Any, n: int, window: int) -> None:
    """Raw Ray driven as our executor drives it: ``window`` tasks in flight, refilled
    from completion callbacks. It tells what the hand-ahead bound of our contract costs
    on Ray, apart from our executor's own work."""
    import threading

    lock, done = threading.Lock(), threading.Event()
    state = {"next": 0, "finished": 0}

    def launch() -> None:
        with lock:
            if state["next"] >= n:
                return
            i = state["next"]
            state["next"] += 1
        remote_fn.remote(i)._on_completed(finished)

    def finished(_value: Any) -> None:
        with lock:
            state["finished"] += 1
            last = state["finished"] == n
        if last:
            done.set()
        else:
            launch()

    for _ in range(min(window, n)):
        launch()
    done.wait()


raw_contenders.cleanup = []  # type: ignore[attr-defined]


def bench_engine(engine: str, n: int, rounds: int) -> List[str]:
    lines = []
    with init_parallel_backend({"backend": engine, "n_cpus": WORKERS}) as backend:
        with backend.executor(max_workers=WORKERS) as executor:
            executor.submit(noop, 0).result()
            contenders = {"ours": lambda: [f.result() for f in [executor.submit(noop, i) for i in range(n)]]}
            contenders.update(raw_contenders(engine, backend, n))
            best = alternate(contenders, rounds)
            raw_name = next(k for k in contenders if k.startswith("raw"))
            for name, seconds in best.items():
                lines.append(f"{engine:7s} overhead  {name:22s} {seconds / n * 1e6:9.1f} us/task")
            lines.append(f"{engine:7s} overhead  ratio ours/raw         {best['ours'] / best[raw_name]:9.3f}  (goal <= 1.15)")
            for same_bound in ("loky, our queue bound", "ray, our window"):
                if same_bound in best:
                    ratio = best["ours"] / best[same_bound]
                    lines.append(f"{engine:7s} overhead  ratio ours/({same_bound}) {ratio:6.3f}")

            map_best = alternate({"map": lambda: list(executor.map(noop, range(n)))}, rounds)["map"]
            lines.append(f"{engine:7s} map       ours, auto chunks      {map_best / n * 1e6:9.1f} us/task")

            sleep = timed(lambda: [f.result() for f in [executor.submit(nap, 0.05) for _ in range(100)]])
            lines.append(f"{engine:7s} sleep     100 x 50 ms on 2       {sleep:9.3f} s = {sleep / 2.5:.3f} x ideal (goal <= 1.05)")

            array = np.ones(100 * 2**20 // 8)
            by_value = timed(lambda: [f.result() for f in [executor.submit(nbytes, array) for _ in range(20)]])
            handle = backend.put(array)
            by_handle = timed(lambda: [f.result() for f in [executor.submit(nbytes, handle) for _ in range(20)]])
            lines.append(f"{engine:7s} put       100 MB to 20 tasks      by value {by_value:7.3f} s, by handle {by_handle:7.3f} s")
    for cleanup in raw_contenders.cleanup:  # type: ignore[attr-defined]
        cleanup()
    raw_contenders.cleanup.clear()  # type: ignore[attr-defined]
    return lines


def bench_joblib_parallel(n: int, rounds: int) -> str:
    from joblib import Parallel, delayed

    with Parallel(n_jobs=WORKERS) as parallel:
        parallel(delayed(noop)(i) for i in range(10))
        best = alternate({"p": lambda: parallel(delayed(noop)(i) for i in range(n))}, rounds)["p"]
    return f"joblib  map       joblib.Parallel        {best / n * 1e6:9.1f} us/task  (the bar for map)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="joblib,ray,dask")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.tasks} tasks, {WORKERS} workers, best of {args.rounds} alternating rounds")
    print(bench_joblib_parallel(args.tasks, args.rounds), flush=True)
    for engine in args.engines.split(","):
        for line in bench_engine(engine, args.tasks, args.rounds):
            print(line, flush=True)


if __name__ == "__main__":
    main()
