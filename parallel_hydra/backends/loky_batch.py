"""Several small tasks in one loky call, and what sizes such batches.

A loky call costs the process that submits it more than a trivial task takes (the call
is pickled, queued, sent and its result read back by loky's threads), which is why
``joblib.Parallel`` batches tasks too. The joblib backend's pool sends tasks it holds
back as :class:`Batch` calls, sized by :class:`Pace`: how long the tasks of one function
of one executor take. Every task goes as a batch, of one where it goes alone.

What runs in the worker keeps each task apart: each notes its own start in the start
log (its :class:`~parallel_hydra.start_log.LoggedCall` does), and each outcome travels
pickled on its own, so that one that cannot be pickled here or unpickled there fails
its own task, not its batch-mates or the pool.
"""

from __future__ import annotations

import pickle
import time
from typing import Any, List, Optional, Tuple

from ..sendable import cloudpickle_dumps
from ..start_log import LoggedCall

__all__ = ["Batch", "Pace", "Unsendable", "light", "unpacked", "MAX_BATCH"]

#: The most tasks in one batch. The start log keeps a worker's last 512 starts, which
#: must cover a batch that dies with its worker and the ones before it whose results
#: were still on their way.
MAX_BATCH = 64

#: About the longest a batch should take: a task in a batch is reported when its whole
#: batch ends, and a batch holds a worker for that long.
BATCH_SECONDS = 0.005

#: Tasks whose arguments look larger than this go alone: a batch of them would be one
#: large message to one worker.
LIGHT_BYTES = 64 * 1024


def light(args: Tuple[Any, ...], kwargs: Any) -> bool:
    """Whether a task's arguments look small enough to share a loky call with others.

    A shallow look, a few type checks per argument: strings and buffers count their
    length, arrays their bytes, anything else with a length 64 bytes an item (a
    ``map``'s chunk too), anything else 256 bytes.
    """
    size = 0
    for value in (*args, *kwargs.values()) if kwargs else args:
        kind = type(value)
        if kind is int or kind is float or kind is bool or value is None:
            size += 32
        elif kind is str or kind is bytes or kind is bytearray:
            size += len(value)
        elif kind is list or kind is tuple or kind is dict or kind is set:
            size += 64 * len(value)
        else:
            nbytes = getattr(value, "nbytes", None)  # numpy arrays, memoryviews
            if type(nbytes) is int:
                size += nbytes
            elif hasattr(kind, "__len__"):
                try:
                    size += 64 * len(value)
                except Exception:  # a length that cannot be had: take it as large
                    return False
            else:
                size += 256
    return size <= LIGHT_BYTES


class Pace:
    """How long the tasks of one function of one executor take, which sizes their batches.

    It follows a slower task at once and a quicker one slowly: a batch sized for quick
    tasks but filled with slow ones holds a worker for long while others idle, which
    costs far more than a batch too small. Unmeasured, tasks go alone.
    """

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds: Optional[float] = None

    def note(self, seconds: float) -> None:
        known = self.seconds
        self.seconds = seconds if known is None or seconds > known else 0.8 * known + 0.2 * seconds

    def batch_size(self, waiting: int, calls: int) -> int:
        """Tasks in the next batch, ``waiting`` being held and ``calls`` loky calls out
        at most: what fits in ``BATCH_SECONDS``, and no more than a share of what waits,
        so that the last batches spread over the workers."""
        seconds = self.seconds
        if seconds is None:
            return 1
        by_time = MAX_BATCH if seconds <= 0 else int(BATCH_SECONDS / seconds)
        return max(1, min(MAX_BATCH, by_time, -(-waiting // calls)))


class Unsendable:
    """Stands for a task's outcome that could not be pickled in the worker."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return Unsendable, (self.text,)


#: One task's outcome as it travels: whether it succeeded, its pickle, and the buffers
#: pickled out of band (a numpy array's data), which loky sends as they are.
Packed = Tuple[bool, bytes, List[Any]]


def _packed(ok: bool, value: Any) -> Packed:
    """One outcome, pickled on its own (with cloudpickle where pickle cannot: a class
    defined in the app's ``__main__``, say). Large buffers stay out of the pickle: loky
    sends them as they are, and they are read back without one more copy."""
    buffers: List[Any] = []
    try:
        return ok, pickle.dumps(value, 5, buffer_callback=buffers.append), buffers
    except Exception:
        pass
    buffers = []
    try:
        return ok, cloudpickle_dumps(value, buffers.append), buffers
    except Exception as exc:
        return False, pickle.dumps(Unsendable(f"{type(exc).__name__}: {exc}"), 5), []


class Batch:
    """One or more tasks as one loky call, run in turn by one worker.

    Returns each task's outcome pickled on its own (see :func:`unpacked`), and the
    longest time one of them ran, by which the pool sizes the next batches.
    """

    __slots__ = ("calls",)

    def __init__(self, calls: List[LoggedCall]) -> None:
        self.calls = calls

    def __call__(self) -> Tuple[List[Packed], float]:
        outcomes = []
        longest = 0.0
        clock = time.perf_counter
        for call in self.calls:
            start = clock()
            try:
                outcome = _packed(True, call())
            except BaseException as exc:  # as loky reports a task's: with the worker's traceback
                from joblib.externals.loky.process_executor import _ExceptionWithTraceback

                outcome = _packed(False, _ExceptionWithTraceback(exc))
            longest = max(longest, clock() - start)
            outcomes.append(outcome)
        return outcomes, longest

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return Batch, (self.calls,)


def unpacked(name: str, packed: Packed) -> Tuple[bool, Any]:
    """A task's outcome, as :class:`Batch` sent it, here: ``(ok, value)``."""
    ok, payload, buffers = packed
    try:
        value = pickle.loads(payload, buffers=buffers)
    except Exception as exc:
        error = pickle.UnpicklingError(f"the result of task {name} could not be unpickled here: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return False, error
    if type(value) is Unsendable:
        return False, pickle.PicklingError(f"the result of task {name} could not be pickled: {value.text}")
    return ok, value
