"""What surrounds each task in its worker: a cap on BLAS/OpenMP threads, and its logs.

The executor sends every task out as an :class:`InTask`, which, in the worker process,

- limits the thread pools of the native libraries loaded there (OpenBLAS, MKL, OpenMP:
  whatever threadpoolctl finds) to ``threads``, so that tasks running side by side do
  not each start a thread per core of the machine;
- captures what the task logs with ``logging`` at ``log_level`` or above, from the
  task's own thread, and sends the records back with the task's result (or attached to
  its exception). The executor hands them to the loggers of the same names in the
  submitting process (:func:`replay`), so they reach its handlers: a Hydra job's log
  file, the user's ``basicConfig`` console.

Both cost little per task: the limit is set again only when the worker has loaded new
modules since the last time (a library is loaded by an import), and a task that logs
nothing returns its value bare. Records arrive when the task ends, not while it runs.

Nothing here imports an engine; threadpoolctl is imported in the worker, when a limit is
first set.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from .sendable import sendable_exception

__all__ = ["InTask", "WithLogs", "replay", "logs_of", "limit_threads", "thread_environment", "THREAD_VARIABLES"]

#: The environment variables that size the thread pools of native libraries when they
#: load. threadpoolctl caps the libraries already loaded; these cover the ones a task
#: loads later, in the worker processes the backend starts.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

#: The attribute of a task's exception that carries the records it logged.
_LOGS_ATTRIBUTE = "_parallel_hydra_logs"


class InTask:
    """``fn(*args, **kwargs)`` run with the executor's thread cap and log capture.

    ``threads`` is the cap (``None``: leave the libraries alone); ``log_level`` is the
    lowest level captured (``None``: capture nothing). ``origin_pid`` is the process
    that submitted the task: a task that runs there (Dask with ``processes: false``)
    already logs to its handlers, so nothing is captured.
    """

    __slots__ = ("fn", "threads", "log_level", "origin_pid")

    def __init__(self, fn: Callable[..., Any], threads: Optional[int], log_level: Optional[int], origin_pid: int) -> None:
        self.fn = fn
        self.threads = threads
        self.log_level = log_level
        self.origin_pid = origin_pid

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return InTask, (self.fn, self.threads, self.log_level, self.origin_pid)

    def __repr__(self) -> str:
        return f"InTask({getattr(self.fn, '__qualname__', self.fn)!r}, threads={self.threads}, log_level={self.log_level})"

    @property
    def __name__(self) -> str:  # type: ignore[override]
        """The wrapped function's name: engines name tasks after it (Dask's keys)."""
        return str(getattr(self.fn, "__name__", "task"))

    @property
    def key(self) -> Tuple[Any, ...]:
        """What makes two of these run the same way: an engine may cache by it."""
        return (self.fn, self.threads, self.log_level, self.origin_pid)

    def as_function(self) -> Callable[..., Any]:
        """This call as a plain function named after ``fn``, for engines that accept
        only functions (Ray's ``ray.remote``)."""
        in_task = self

        def run(*args: Any, **kwargs: Any) -> Any:
            return in_task(*args, **kwargs)

        run.__name__ = getattr(self.fn, "__name__", "task")
        named = getattr(self.fn, "__wrapped__", self.fn)  # (a map's chunk: its function)
        run.__qualname__ = getattr(named, "__qualname__", run.__name__)
        run.__module__ = getattr(named, "__module__", None) or __name__
        return run

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        if self.threads is not None:
            limit_threads(self.threads)
        here = os.getpid() == self.origin_pid  # (nothing travels: no capture, no check)
        if self.log_level is None or here:
            try:
                return self.fn(*args, **kwargs)
            except Exception as exc:
                error = exc if here else sendable_exception(exc)
                if error is exc:
                    raise
                trace = exc.__traceback__
            # A stand-in is raised out here, so that it has no __context__: some engines
            # pickle an exception's context too (Dask, through tblib).
            raise error.with_traceback(trace)
        capture = _capture or _the_capture()
        outer = capture.start(self.log_level)
        try:
            value = self.fn(*args, **kwargs)
        except BaseException as exc:
            records = capture.stop(outer)
            # An exception that would not survive the trip back goes as a stand-in.
            error = sendable_exception(exc) if isinstance(exc, Exception) else exc
            if records:
                try:
                    setattr(error, _LOGS_ATTRIBUTE, records)
                except Exception:  # an exception that refuses attributes: its logs are lost
                    pass
            if error is exc:
                raise
            trace = exc.__traceback__
        else:
            records = capture.stop(outer)
            return WithLogs(value, records) if records else value
        raise error.with_traceback(trace)


class WithLogs:
    """A task's result with the records it logged; unwrapped by the executor."""

    __slots__ = ("value", "records")

    def __init__(self, value: Any, records: List[logging.LogRecord]) -> None:
        self.value = value
        self.records = records

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return WithLogs, (self.value, self.records)


def logs_of(ok: bool, value: Any) -> Tuple[Any, List[logging.LogRecord]]:
    """A task's outcome without its records, and the records (``[]`` if none)."""
    if ok:
        if type(value) is WithLogs:
            return value.value, value.records
        return value, []
    records = getattr(value, _LOGS_ATTRIBUTE, None)
    if records is None:
        return value, []
    try:
        delattr(value, _LOGS_ATTRIBUTE)
    except Exception:
        pass
    return value, records


def replay(records: List[logging.LogRecord]) -> None:
    """Hand records logged in a worker to the loggers of the same names here.

    Each logger's level (and those of its parents) decides as if the record had been
    logged here, then the handlers up its hierarchy get it.
    """
    for record in records:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


# -- in the worker ----------------------------------------------------------------------

# The cap last set in this process, and how many modules were loaded then.
_limited: Optional[Tuple[int, int]] = None
_limit_lock = threading.Lock()


def limit_threads(threads: int) -> None:
    """Cap the thread pools of the native libraries loaded in this process at ``threads``.

    The cap never exceeds this machine's CPUs (a larger one would add threads). It is
    set again only when the cap changes or modules were loaded since, so a task pays
    for threadpoolctl's scan of the loaded libraries once per worker, not every time.
    """
    global _limited
    threads = max(1, min(threads, _machine_cpus()))
    key = (threads, len(sys.modules))
    if _limited == key:
        return
    with _limit_lock:
        if _limited == key:
            return
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)  # stays in force: not used as a context manager
        _limited = (threads, len(sys.modules))


def thread_environment(threads: int) -> Dict[str, str]:
    """The variables of :data:`THREAD_VARIABLES` set to ``threads`` for new worker
    processes, except those the user set in this process's environment."""
    return {name: str(threads) for name in THREAD_VARIABLES if name not in os.environ}


@functools.lru_cache(maxsize=None)
def _machine_cpus() -> int:
    """This process's CPUs, counted once (a system call that every task would repeat)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


class _Capture(logging.Handler):
    """Keeps, for each thread running a task, the records it logs at the task's level.

    One per worker process, on the root logger while any task of the process runs. Being
    a handler there also keeps Python's last-resort handler from printing the same
    records on the worker's stderr. Made once: a handler per task would cost more than
    a trivial task (a lock, and a place in logging's list of handlers).
    """

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self._tasks = threading.local()
        self._users = 0
        self._users_lock = threading.Lock()
        self._root_saved: Optional[int] = None

    def emit(self, record: logging.LogRecord) -> None:
        records = getattr(self._tasks, "records", None)
        if records is not None and record.levelno >= self._tasks.level:
            try:
                records.append(_portable(record))
            except Exception:  # a bad format string, say: reported as logging does, the task goes on
                self.handleError(record)

    def start(self, level: int) -> Tuple[Optional[List[logging.LogRecord]], int]:
        """Capture what this thread logs at ``level`` or above, until :meth:`stop`; the
        capture of an enclosing task of this thread, which ``stop`` puts back."""
        outer = (getattr(self._tasks, "records", None), getattr(self._tasks, "level", level))
        self._tasks.records, self._tasks.level = [], level
        root = logging.getLogger()
        with self._users_lock:
            self._users += 1
            if self._users == 1:
                root.addHandler(self)
            if root.level > level:  # (NOTSET, 0, on the root lets everything through already)
                if self._root_saved is None:
                    self._root_saved = root.level
                root.setLevel(level)
        return outer

    def stop(self, outer: Tuple[Optional[List[logging.LogRecord]], int]) -> List[logging.LogRecord]:
        """What this thread logged since :meth:`start`."""
        records = self._tasks.records
        self._tasks.records, self._tasks.level = outer
        with self._users_lock:
            self._users -= 1
            if self._users == 0:
                logging.getLogger().removeHandler(self)
                if self._root_saved is not None:
                    logging.getLogger().setLevel(self._root_saved)
                    self._root_saved = None
        return records


_capture: Optional[_Capture] = None
_capture_lock = threading.Lock()


def _the_capture() -> _Capture:
    global _capture
    if _capture is None:
        with _capture_lock:
            if _capture is None:
                _capture = _Capture()
    return _capture


#: The attributes every LogRecord has; others come from a call's ``extra``.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _portable(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of ``record`` that pickles: its message rendered, its traceback as text,
    and any ``extra`` value that does not pickle as its ``repr``."""
    copy = logging.makeLogRecord(record.__dict__)
    copy.msg = record.getMessage()
    copy.args = None
    if record.exc_info:
        if not copy.exc_text:
            copy.exc_text = logging.Formatter().formatException(record.exc_info)
        copy.exc_info = None
    for name in copy.__dict__.keys() - _RECORD_FIELDS:
        value = copy.__dict__[name]
        try:
            pickle.dumps(value)
        except Exception:
            copy.__dict__[name] = repr(value)
    return copy
