"""How much parallel_hydra costs over the raw engines, and how close it gets to ideal.

    python benchmarks/bench.py                      # every engine, 2 workers
    python benchmarks/bench.py --engines joblib --tasks 2000 --rounds 5

For each engine, in one process:

- overhead: N trivial tasks, submitted all at once and then collected, in alternating
  rounds. Each ratio is shown two ways: best round over best round, and the median
  over rounds of the two contenders' times in the same round (steadier when the
  machine's load drifts; use ``--rounds 11`` or more for it). The contenders:

  - ours under the ``NONE`` and the ``PENDING`` policy, each *warm* (one executor for
    every round) and *cold* (a new executor each round, as code that calls
    ``MapReduceJob`` or ``init_executor`` per step makes them);
  - the raw engine as its users drive it (loky's executor, ``ray.remote`` + ``ray.get``,
    ``client.submit`` + ``result``), the raw engine held to the bound that
    ``PENDING`` keeps on Ray (``2 * max_workers`` tasks in flight, refilled from
    completion callbacks; on loky too, for comparison: there our pool holds the tasks
    itself and keeps ``2 * size`` calls out, quick tasks in batches; Dask needs none:
    its scheduler queues tasks), and the raw engine with every task at once but a
    completion callback per task, which is how our executor hears of each task's end
    (what that style costs is the engine's);

- map: ``executor.map`` of the same tiny function, against ``joblib.Parallel``;
- sleep: 100 tasks of 50 ms on 2 workers, against the ideal 2.5 s;
- put: one 100 MB array sent by ``put`` handle to 20 tasks, against passing it each time;
- large map: ``executor.map(abs, <--map-items items>)`` on each engine, and
  ``joblib.Parallel(n_jobs=2)`` on the same items, each in a process of its own, so that
  its time and peak memory (RSS of the submitting process) are its own.

With ``--dask-address``, also a Dask cluster the backend only joins (start one with
``dask scheduler --host 127.0.0.1 --port 8786`` and ``dask worker tcp://127.0.0.1:8786
--nworkers 2 --nthreads 1``): ours with no ``max_workers`` (the whole cluster), with
``max_workers=2``, and under ``PENDING``, against ``client.submit`` + ``result``.

Goals: ours/raw <= 1.10 under NONE and ours/(raw, same bound) <= 1.10 under PENDING;
cold within 1.15 of raw and cold/warm < 1.1; large map on Dask within 3x of
joblib.Parallel's time and 2x its peak memory; sleep <= 1.05 x ideal.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
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
    return {name: min(times) for name, times in alternate_rounds(contenders, rounds).items()}


def alternate_rounds(contenders: Dict[str, Callable[[], Any]], rounds: int) -> Dict[str, List[float]]:
    """Each contender's time in each of ``rounds`` rounds, run in turn."""
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
    return times


def paired_median(times: Dict[str, List[float]], ours: str, reference: str) -> float:
    """The median, over rounds, of ``ours / reference`` measured in the same round.

    On 2 busy cores the load drifts from round to round; a ratio of two times taken
    back to back is steadier than a ratio of two bests taken rounds apart."""
    ratios = sorted(a / b for a, b in zip(times[ours], times[reference]))
    middle = len(ratios) // 2
    return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2


def collect(executor: Any, n: int) -> None:
    for future in [executor.submit(noop, i) for i in range(n)]:
        future.result()


def raw_contenders(engine: str, backend: Any, n: int, cleanup: List[Callable[[], Any]]) -> Dict[str, Callable[[], Any]]:
    """``{"raw": ..., "raw, same bound": ...}`` and any other raw reference."""
    if engine == "joblib":
        from joblib.externals.loky.process_executor import ProcessPoolExecutor

        pool = ProcessPoolExecutor(WORKERS)
        cleanup.append(pool.shutdown)
        pool.submit(noop, 0).result()

        def on_loky(i: int, then: Callable[[Any], None]) -> None:
            pool.submit(noop, i).add_done_callback(then)

        return {
            "raw": lambda: collect(pool, n),
            "raw, same bound": lambda: windowed(on_loky, n, 2 * WORKERS),
            "raw, callback per task": lambda: windowed(on_loky, n, n),
        }
    if engine == "ray":
        import ray

        remote_noop = ray.remote(noop)

        def on_ray(i: int, then: Callable[[Any], None]) -> None:
            remote_noop.remote(i)._on_completed(then)

        return {
            "raw": lambda: ray.get([remote_noop.remote(i) for i in range(n)]),
            "raw, same bound": lambda: windowed(on_ray, n, 2 * WORKERS),
            "raw, callback per task": lambda: windowed(on_ray, n, n),
        }
    if engine == "dask":
        client = backend.client
        dask_executor = client.get_executor(pure=False)
        return {
            "raw": lambda: [f.result() for f in [client.submit(noop, i, pure=False) for i in range(n)]],
            "dask get_executor": lambda: collect(dask_executor, n),
        }
    raise ValueError(engine)


def raw_sleep(engine: str, backend: Any, cleanup: List[Callable[[], Any]]) -> Callable[[], Any]:
    """The sleep-bound tasks on the raw engine: what the engine itself costs there."""
    if engine == "joblib":
        from joblib.externals.loky.process_executor import ProcessPoolExecutor

        pool = ProcessPoolExecutor(WORKERS)
        cleanup.append(pool.shutdown)
        return lambda: [f.result() for f in [pool.submit(nap, 0.05) for _ in range(100)]]
    if engine == "ray":
        import ray

        remote_nap = ray.remote(nap)
        return lambda: ray.get([remote_nap.remote(0.05) for _ in range(100)])
    if engine == "dask":
        client = backend.client
        return lambda: client.gather([client.submit(nap, 0.05, pure=False) for _ in range(100)])
    raise ValueError(engine)


def windowed(start: Callable[[int, Callable[[Any], None]], None], n: int, window: int) -> None:
    """The raw engine driven with ``window`` tasks in flight, refilled from completion
    callbacks (``start(i, then)`` starts task ``i`` and calls ``then`` when it ends): what
    ``PENDING``'s bound costs on the engine, apart from our executor's own work."""
    import threading

    lock, done = threading.Lock(), threading.Event()
    state = {"next": 0, "finished": 0}

    def launch() -> None:
        with lock:
            if state["next"] >= n:
                return
            i = state["next"]
            state["next"] += 1
        start(i, finished)

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


def bench_engine(engine: str, n: int, rounds: int) -> List[str]:
    lines = []
    cleanup: List[Callable[[], Any]] = []

    def line(what: str, text: str) -> None:
        lines.append(f"{engine:7s} {what:9s} {text}")

    with init_parallel_backend({"backend": engine, "n_cpus": WORKERS}) as backend:
        none = backend.executor(max_workers=WORKERS, cancel_futures="NONE")
        pending = backend.executor(max_workers=WORKERS, cancel_futures="PENDING")

        def cold(policy: str) -> None:
            with backend.executor(max_workers=WORKERS, cancel_futures=policy) as executor:
                collect(executor, n)

        with none, pending:
            collect(none, 10)
            collect(pending, 10)
            contenders: Dict[str, Callable[[], Any]] = {
                "ours NONE, warm": lambda: collect(none, n),
                "ours NONE, cold": lambda: cold("NONE"),
                "ours PENDING, warm": lambda: collect(pending, n),
                "ours PENDING, cold": lambda: cold("PENDING"),
            }
            contenders.update(raw_contenders(engine, backend, n, cleanup))
            times = alternate_rounds(contenders, rounds)
            best = {name: min(t) for name, t in times.items()}
            for name, seconds in best.items():
                line("overhead", f"{name:24s} {seconds / n * 1e6:9.1f} us/task")
            bound = "raw, same bound" if "raw, same bound" in times else "raw"
            for text, ours, reference, goal in (
                ("NONE warm / raw", "ours NONE, warm", "raw", "<= 1.10"),
                ("NONE cold / raw", "ours NONE, cold", "raw", "<= 1.15"),
                ("NONE cold / warm", "ours NONE, cold", "ours NONE, warm", "< 1.10"),
                ("PENDING warm / raw, same bound", "ours PENDING, warm", bound, "<= 1.10"),
                ("PENDING cold / raw, same bound", "ours PENDING, cold", bound, "<= 1.15"),
                ("PENDING cold / warm", "ours PENDING, cold", "ours PENDING, warm", "< 1.10"),
            ):
                ratio = best[ours] / best[reference]
                paired = paired_median(times, ours, reference)
                line("ratio", f"{text:31s} {ratio:6.3f} best/best, {paired:6.3f} paired median  (goal {goal})")

            map_best = alternate({"map": lambda: list(none.map(noop, range(n)))}, rounds)["map"]
            line("map", f"ours, auto chunks        {map_best / n * 1e6:9.1f} us/task")

            sleeps = alternate(
                {"ours": lambda: [f.result() for f in [none.submit(nap, 0.05) for _ in range(100)]],
                 "raw": raw_sleep(engine, backend, cleanup)},
                max(1, rounds // 2),
            )
            for name, seconds in sleeps.items():
                line("sleep", f"100 x 50 ms on 2, {name:6s} {seconds:9.3f} s = {seconds / 2.5:.3f} x ideal (goal <= 1.05)")

            array = np.ones(100 * 2**20 // 8)
            by_value = timed(lambda: [f.result() for f in [none.submit(nbytes, array) for _ in range(20)]])
            handle = backend.put(array)
            by_handle = timed(lambda: [f.result() for f in [none.submit(nbytes, handle) for _ in range(20)]])
            line("put", f"100 MB to 20 tasks       by value {by_value:7.3f} s, by handle {by_handle:7.3f} s")
    for step in cleanup:
        step()
    return lines


def bench_joined_dask(address: str, n: int, rounds: int) -> List[str]:
    """Our executor on a Dask cluster it only joined, against Dask's own submit."""
    lines = []
    with init_parallel_backend({"backend": "dask", "address": address}) as backend:
        client = backend.client
        whole = backend.executor(cancel_futures="NONE")
        capped = backend.executor(max_workers=WORKERS, cancel_futures="NONE")
        pending = backend.executor(cancel_futures="PENDING")
        with whole, capped, pending:
            for executor in (whole, capped, pending):
                collect(executor, 10)
            times = alternate_rounds(
                {
                    "ours NONE, whole cluster": lambda: collect(whole, n),
                    f"ours NONE, max_workers={WORKERS}": lambda: collect(capped, n),
                    "ours PENDING, whole": lambda: collect(pending, n),
                    "raw": lambda: [f.result() for f in [client.submit(noop, i, pure=False) for i in range(n)]],
                },
                rounds,
            )
        best = {name: min(t) for name, t in times.items()}
        for name, seconds in best.items():
            lines.append(f"joined  overhead  {name:24s} {seconds / n * 1e6:9.1f} us/task")
        for name in best:
            if name != "raw":
                lines.append(
                    f"joined  ratio     {name + ' / raw':31s} {best[name] / best['raw']:6.3f} best/best, "
                    f"{paired_median(times, name, 'raw'):6.3f} paired median"
                )
        claims = "on" if backend._claims is not None else "off (the scheduler cannot load parallel_hydra)"
        lines.append(f"joined  claims    {claims}")
    return lines


def bench_joblib_parallel(n: int, rounds: int) -> str:
    from joblib import Parallel, delayed

    with Parallel(n_jobs=WORKERS) as parallel:
        parallel(delayed(noop)(i) for i in range(10))
        best = alternate({"p": lambda: parallel(delayed(noop)(i) for i in range(n))}, rounds)["p"]
    return f"joblib  map       joblib.Parallel          {best / n * 1e6:9.1f} us/task  (the bar for map)"


# -- the large map, one process per contender -------------------------------------------


def _peak_rss_mb() -> float:
    """This process's peak RSS so far. VmHWM, not ``getrusage``: ru_maxrss survives
    ``exec`` on Linux, so a child would report its parent's peak if larger."""
    try:
        with open("/proc/self/status") as status:
            for row in status:
                if row.startswith("VmHWM:"):
                    return int(row.split()[1]) / 1024
    except OSError:  # not Linux: the best there is
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * (1024 if sys.platform == "darwin" else 1))


def large_map_child(contender: str, items: int) -> None:
    """In a process of its own: map ``abs`` over ``items`` ints; print one JSON line."""
    values = list(range(-(items // 2), items - items // 2))
    expected = sum(abs(v) for v in values)
    if contender == "joblib.Parallel":
        from joblib import Parallel, delayed

        with Parallel(n_jobs=WORKERS) as parallel:
            parallel(delayed(abs)(i) for i in range(10))
            before = _peak_rss_mb()
            start = time.perf_counter()
            results = parallel(delayed(abs)(v) for v in values)
            seconds = time.perf_counter() - start
    else:
        with init_parallel_backend({"backend": contender, "n_cpus": WORKERS}) as backend:
            with backend.executor(max_workers=WORKERS, cancel_futures="NONE") as executor:
                list(executor.map(abs, range(10)))
                before = _peak_rss_mb()
                start = time.perf_counter()
                results = list(executor.map(abs, values))
                seconds = time.perf_counter() - start
    assert len(results) == items and sum(results) == expected, "wrong results"
    print(json.dumps({"seconds": seconds, "peak_mb": _peak_rss_mb(), "before_mb": before}))


def bench_large_map(engines: List[str], items: int) -> List[str]:
    lines = []
    figures: Dict[str, Dict[str, float]] = {}
    for contender in ["joblib.Parallel", *engines]:
        run = subprocess.run(
            [sys.executable, __file__, "--large-map-child", contender, "--map-items", str(items)],
            capture_output=True, text=True, timeout=3600,
        )
        if run.returncode != 0:
            raise RuntimeError(f"large map on {contender} failed:\n{run.stdout[-2000:]}{run.stderr[-3000:]}")
        figures[contender] = json.loads(run.stdout.strip().splitlines()[-1])
        f = figures[contender]
        label = contender if contender == "joblib.Parallel" else f"ours on {contender}"
        lines.append(
            f"large   map       {label:24s} {f['seconds']:9.2f} s, peak RSS {f['peak_mb']:6.0f} MB "
            f"({f['peak_mb'] - f['before_mb']:+5.0f} MB during the map), {items} items"
        )
    bar = figures["joblib.Parallel"]
    for engine in engines:
        f = figures[engine]
        lines.append(
            f"large   ratio     {engine} / joblib.Parallel     time {f['seconds'] / bar['seconds']:5.2f} (goal <= 3), "
            f"peak memory {f['peak_mb'] / bar['peak_mb']:5.2f} (goal <= 2)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="joblib,ray,dask")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--map-items", type=int, default=1_000_000, help="items of the large map (0: skip it)")
    parser.add_argument("--dask-address", help="also bench a Dask cluster joined at this address")
    parser.add_argument("--large-map-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.large_map_child:
        large_map_child(args.large_map_child, args.map_items)
        return
    engines = [engine for engine in args.engines.split(",") if engine]
    print(f"{args.tasks} tasks, {WORKERS} workers, best of {args.rounds} alternating rounds; load {os.getloadavg()[0]:.2f}")
    print(bench_joblib_parallel(args.tasks, args.rounds), flush=True)
    for engine in engines:
        for line in bench_engine(engine, args.tasks, args.rounds):
            print(line, flush=True)
    if args.dask_address:
        for line in bench_joined_dask(args.dask_address, args.tasks, args.rounds):
            print(line, flush=True)
    if args.map_items and engines:
        for line in bench_large_map(engines, args.map_items):
            print(line, flush=True)
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
