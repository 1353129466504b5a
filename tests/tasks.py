"""Task functions for the tests. They live in a module of their own so that every
engine's workers can import them by name (Ray and Dask pickle test functions by value
anyway, loky by reference)."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Tuple


class Boom(ValueError):
    """An exception type of our own, to see that the type survives the trip back."""


def add(a: int, b: int = 0) -> int:
    return a + b


def square(x: int) -> int:
    return x * x


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise Boom(f"bad item {x}")
    return x


def raise_timeout(message: str) -> None:
    raise TimeoutError(message)


def raise_boom(message: str) -> None:
    raise Boom(message)


def draw(_: Any = None) -> float:
    return random.random()


def span(seconds: float) -> Tuple[float, float]:
    """Sleep, and report when this task started and ended (to measure overlap)."""
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def sleep_then(seconds: float, value: Any = None) -> Any:
    time.sleep(seconds)
    return value


def heartbeat(path: str, seconds: float) -> str:
    """Touch ``path`` every 20 ms for ``seconds``: while it beats, the work is running."""
    end = time.time() + seconds
    target = Path(path)
    while time.time() < end:
        target.write_text(str(time.time()))
        time.sleep(0.02)
    return "finished"


def wait_for_file(path: str, timeout: float = 60.0, value: Any = None) -> Any:
    """Block until ``path`` exists (a gate the test opens), then return ``value``."""
    end = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > end:
            raise TimeoutError(f"gate {path} never opened")
        time.sleep(0.01)
    return value


def length(obj: Any) -> int:
    return len(obj)


def where() -> str:
    """Which engine runs this code."""
    try:
        from distributed import get_worker

        get_worker()
        return "dask"
    except (ImportError, ValueError):
        pass
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().get_task_id() is not None:
            return "ray"
    except ImportError:
        pass
    return f"pid:{os.getpid()}"


def total(array: Any) -> float:
    return float(array.sum())


# -- crashes and other field cases ------------------------------------------------------


def exit_hard(code: int = 1) -> None:
    """End the worker process at once, as a crashing extension would."""
    os._exit(code)


def exit_on(x: int, bad: int) -> int:
    """``x``, or the worker process ends at once where ``x == bad``."""
    if x == bad:
        os._exit(3)
    return x


def exit_on_any(chunk: Any) -> int:
    """A MapReduceJob map function whose worker process ends."""
    os._exit(3)


def kill_self() -> None:
    """SIGKILL the worker process, as the out-of-memory killer does."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)


def segfault() -> None:
    """Read address 0: a segmentation fault in the worker process."""
    import ctypes

    ctypes.string_at(0)


def exit_softly() -> None:
    """``sys.exit`` from inside a task."""
    import sys

    sys.exit(3)


def return_unpicklable() -> Any:
    """A result that cannot be pickled back to the caller."""
    import threading

    return threading.Lock()


def keywords(**kwargs: Any) -> Any:
    """Return the keyword arguments the task received, sorted."""
    return sorted(kwargs.items())


def touch(path: str, value: Any = None) -> Any:
    """Append a line to ``path`` (to count how often a task ran), return ``value``."""
    with open(path, "a") as out:
        out.write(f"{os.getpid()}\n")
    return value


class Box:
    """A result that can be referenced weakly, to see who keeps it alive."""

    def __init__(self, value: Any) -> None:
        self.value = value


def boxed(value: Any) -> Box:
    return Box(value)


# -- research code inside tasks (test_in_task.py) --------------------------------------


def blas_threads(_: Any = None) -> Any:
    """The thread counts of the BLAS/OpenMP libraries numpy loaded, as this task sees them."""
    import numpy as np  # noqa: F401  (loads the BLAS library)
    from threadpoolctl import threadpool_info

    np.ones((4, 4)) @ np.ones((4, 4))
    return [(info["internal_api"], info["num_threads"]) for info in threadpool_info()]


def log_and_return(x: int, level: int = 30) -> int:
    import logging

    logging.getLogger("research.task").log(level, "task %d logs from pid %d", x, os.getpid())
    return x


def log_and_raise(message: str) -> None:
    import logging

    logging.getLogger("research.task").warning("about to fail: %s", message)
    raise Boom(message)


def draw_mean(chunk: Any, seed: Any = None) -> float:
    """A Monte-Carlo map function: its result depends on the chunk and its stream."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return float(np.mean(rng.random(len(chunk))))


def mark_then_wait(mark: str, gate: str, timeout: float = 60.0, value: Any = None) -> Any:
    """Say that the task started (create ``mark``), then wait for the gate like ``wait_for_file``."""
    Path(mark).touch()
    return wait_for_file(gate, timeout, value)


def append_then_wait(path: str, gate: str, timeout: float = 60.0, value: Any = None) -> Any:
    """Append a line to ``path`` (the task started; count how often), then wait for the gate."""
    with open(path, "a") as out:
        out.write(f"{os.getpid()}\n")
    return wait_for_file(gate, timeout, value)


class TwoArgError(Exception):
    """Pickles, but cannot be unpickled: its ``__init__`` takes other arguments than it
    passes on (a common way to write one)."""

    def __init__(self, path: str, code: int) -> None:
        super().__init__(f"{path} failed with {code}")
        self.code = code


class LockedError(Exception):
    """Cannot be pickled at all: it holds a lock."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def raise_two_arg(path: str, code: int) -> None:
    raise TwoArgError(path, code)


def raise_locked(message: str) -> None:
    raise LockedError(message)


def log_oddly(x: int) -> int:
    """Log with a bad format string and with an ``extra`` that cannot be pickled."""
    logging.getLogger("tasks.oddly").warning("loss %d", "nan")
    logging.getLogger("tasks.oddly").warning("done %s", x, extra={"lock": threading.Lock()})
    return x


def _refuse_to_load(message: str) -> Any:
    raise ValueError(message)


class Unloadable:
    """Pickles in the worker, fails to unpickle in the caller."""

    def __reduce__(self) -> Any:
        return _refuse_to_load, ("this result does not unpickle",)


def maybe_unloadable(unloadable: bool) -> Any:
    """A result that fails to unpickle in the caller, or (``False``) a plain one."""
    return Unloadable() if unloadable else 1


def touch_or_exit(path: str, value: Any, exit: bool) -> Any:
    """``touch``, or (``exit``) end the worker process at once."""
    if exit:
        os._exit(3)
    return touch(path, value)


def ones(n: int) -> Any:
    """A numpy array of ``n`` ones (its data large enough to travel out of band)."""
    import numpy as np

    return np.ones(n)


def note_run(folder: str, i: int) -> int:
    """Append ``i`` to this worker's own file in ``folder`` (to count the runs of each task)."""
    with open(os.path.join(folder, str(os.getpid())), "a") as out:
        out.write(f"{i}\n")
    return i


def wait_or_exit(door: str, bomb: str, timeout: float = 60.0, started: str = "") -> str:
    """Wait for ``door``; end the worker process at once if ``bomb`` appears first.
    ``started``: a file made when the task starts."""
    if started:
        Path(started).touch()
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(bomb):
            os._exit(7)
        if os.path.exists(door):
            return "door"
        time.sleep(0.002)
    return "timeout"


class BadRepr:
    """A callable object whose ``repr`` raises; it waits for a gate like ``wait_for_file``."""

    def __call__(self, path: str, timeout: float = 60.0) -> Any:
        return wait_for_file(path, timeout, "door")

    def __repr__(self) -> str:
        raise RuntimeError("no repr for this one")
