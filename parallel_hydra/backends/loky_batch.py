"""Several small tasks in one loky call, and what sizes such batches.

A loky call costs the process that submits it more than a trivial task takes (the call
is pickled, queued, sent and its result read back by loky's threads), which is why
``joblib.Parallel`` batches tasks too. The joblib backend's pool sends tasks it holds
back as :class:`Batch` calls, sized by :class:`Pace`: how long the tasks of one function
of one executor take, and how large their results are (a batch of one, until a
function is measured).

What runs in the worker keeps each task apart: each notes its own start in the start
log (its :class:`~parallel_hydra.start_log.LoggedCall` does), and each outcome travels
pickled on its own, so that one that cannot be pickled here or unpickled there fails
its own task, not its batch-mates or the pool.
"""

from __future__ import annotations

import functools
import pickle
import time
import types
from typing import Any, List, Optional, Tuple

from ..executor import NamedAfter
from ..in_task import InTask
from ..sendable import cloudpickle_dumps
from ..start_log import STARTS_KEPT, LoggedCall

__all__ = ["Batch", "Pace", "Unsendable", "light", "size_of", "unpacked", "work_of", "MAX_BATCH", "MAX_TASKS_OUT"]

#: The most tasks in one batch.
MAX_BATCH = 64

#: The most batched tasks in loky calls at once. A worker can run every one of them
#: while its results wait (loky's result thread busy, say), and after a crash the start
#: log must still say which of them it had started: it keeps each worker's last
#: ``STARTS_KEPT`` starts, half of them for these, the rest for lone tasks.
MAX_TASKS_OUT = STARTS_KEPT // 2

#: About the longest a batch should take: a task in a batch is reported when its whole
#: batch ends, and a batch holds a worker for that long.
BATCH_SECONDS = 0.005

#: Tasks whose arguments look larger than this, or whose function's results are, go
#: alone: a batch of them would be one large message to or from one worker.
LIGHT_BYTES = 64 * 1024


def _size(value: Any, depth: int) -> int:
    """A cheap guess at ``value``'s pickled size: strings and buffers count their length,
    arrays their bytes, a small container what it holds (one level down), a larger one
    64 bytes an item, anything else 256 bytes."""
    kind = type(value)
    if kind is int or kind is float or kind is bool or value is None:
        return 32
    if kind is str or kind is bytes or kind is bytearray:
        return len(value)
    nbytes = getattr(value, "nbytes", None)  # numpy arrays, memoryviews
    if type(nbytes) is int:
        return nbytes
    if kind is list or kind is tuple or kind is set or kind is dict:
        items = value.values() if kind is dict else value
        if depth and len(value) <= 16:
            return 64 + sum(_size(item, depth - 1) for item in items)
        return 64 * len(value)
    if hasattr(kind, "__len__"):  # a map's chunk, a DataFrame...
        try:
            return 64 * len(value)
        except Exception:  # a length that cannot be had: take it as large
            return LIGHT_BYTES + 1
    return 256


def light(args: Tuple[Any, ...], kwargs: Any) -> bool:
    """Whether a task's arguments look small enough to share a loky call with others
    (a few type checks per argument)."""
    size = 0
    for value in (*args, *kwargs.values()) if kwargs else args:
        size += _size(value, 1)
    return size <= LIGHT_BYTES


def work_of(fn: Any) -> Any:
    """What says which work a task does, to key its :class:`Pace`: its code, not the
    callable itself, which may be made anew for each task (a ``partial``, a lambda, a
    bound method) and may hold the task's data, which a pace must not keep alive."""
    if type(fn) is InTask:
        fn = fn.fn
    if type(fn) is NamedAfter:  # a map's chunk: its own pace, not that of one item
        return (fn.helper, work_of(fn.fn))
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, types.MethodType):
        fn = fn.__func__
    code = getattr(fn, "__code__", None)
    if code is not None:
        return code
    if isinstance(fn, type):
        return fn
    try:
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
        owner = getattr(fn, "__self__", None)
        if owner is not None and not isinstance(owner, types.ModuleType):
            return (type(owner), name)  # a bound builtin method, such as a list's append
        return (type(fn), getattr(fn, "__module__", None), name)  # a builtin, a callable object
    except Exception:  # an object whose attributes cannot be read
        return type(fn)


class Pace:
    """How long the tasks of one function of one executor take, and how large their
    results are, which sizes their batches.

    It follows a slower task (or a larger result) at once and a quicker one slowly: a
    batch sized for quick tasks but filled with slow ones holds a worker for long while
    others idle, which costs far more than a batch too small. Unmeasured, tasks go
    alone.
    """

    __slots__ = ("seconds", "result_bytes")

    def __init__(self) -> None:
        self.seconds: Optional[float] = None
        self.result_bytes = 0

    def note(self, seconds: float, result_bytes: int) -> None:
        known = self.seconds
        self.seconds = seconds if known is None or seconds > known else 0.8 * known + 0.2 * seconds
        known_bytes = self.result_bytes
        self.result_bytes = result_bytes if result_bytes > known_bytes else (4 * known_bytes + result_bytes) // 5

    def batch_size(self, waiting: int, calls: int) -> int:
        """Tasks in the next batch, ``waiting`` being held and ``calls`` loky calls out
        at most: what fits in ``BATCH_SECONDS`` (and ``LIGHT_BYTES`` of results), and no
        more than a share of what waits, so that the last batches spread over the
        workers."""
        seconds = self.seconds
        if seconds is None:
            return 1
        by_time = MAX_BATCH if seconds <= 0 else int(BATCH_SECONDS / seconds)
        by_size = MAX_BATCH if self.result_bytes <= 0 else LIGHT_BYTES // self.result_bytes
        return max(1, min(MAX_BATCH, by_time, by_size, -(-waiting // calls)))


class Unsendable:
    """Stands for a task's outcome that could not be pickled in the worker."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return Unsendable, (self.text,)


def _as_it_is(data: Any) -> Any:
    return data


class _Buffer:
    """A buffer pickled out of band (a numpy array's data), as loky sends it on: as it
    is where loky's pickler speaks pickle protocol 5 (its default, cloudpickle), and as
    a copy where it does not (``LOKY_PICKLER=pickle`` on Python before 3.14)."""

    __slots__ = ("buffer",)

    def __init__(self, buffer: pickle.PickleBuffer) -> None:
        self.buffer = buffer

    def __reduce_ex__(self, protocol: Any) -> Tuple[Any, Tuple[Any, ...]]:
        if isinstance(protocol, int) and protocol >= 5:
            return _as_it_is, (self.buffer,)
        view = self.buffer.raw()
        return (bytes if view.readonly else bytearray), (view.tobytes(),)


#: One task's outcome as it travels: whether it succeeded, its pickle, and the buffers
#: pickled out of band.
Packed = Tuple[bool, bytes, List[Any]]


def _packed(ok: bool, value: Any) -> Packed:
    """One outcome, pickled on its own (with cloudpickle where pickle cannot: a class
    defined in the app's ``__main__``, say). Large buffers stay out of the pickle, so
    they cost no more copies than a result loky pickles itself."""
    buffers: List[Any] = []
    try:
        data = pickle.dumps(value, 5, buffer_callback=buffers.append)
    except Exception:
        buffers = []
        try:
            data = cloudpickle_dumps(value, buffers.append)
        except Exception as exc:
            return False, pickle.dumps(Unsendable(f"{type(exc).__name__}: {exc}"), 5), []
    return ok, data, [_Buffer(buffer) for buffer in buffers] if buffers else buffers


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


def size_of(packed: Packed) -> int:
    """The bytes an outcome took to travel."""
    _, payload, buffers = packed
    return len(payload) + sum(memoryview(buffer).nbytes for buffer in buffers)


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
