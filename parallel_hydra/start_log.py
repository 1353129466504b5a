"""Which task each worker process started last, kept where it outlives the worker.

When a worker process dies, its engine knows that it died but not (loky) or not for
sure (Dask, which blames every task the worker held) which task killed it. Each task
the backends send to a process they started goes out wrapped in :class:`LoggedCall`,
which writes the task's number into a small file of its process before it runs: after
a crash, the file of the dead process names the task it was running. One ``pwrite`` on
a memory-backed file per task; the files go with the log's folder.

Only for worker processes on this machine (a loky pool, a Dask ``LocalCluster``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Dict, Optional, Set, Tuple

__all__ = ["StartLog", "LoggedCall"]

_WIDTH = 20  # digits of a task number in a record

# In a worker process: the open record file of each log folder, by (folder, thread).
_records: Dict[Tuple[str, int], int] = {}


def _record(folder: str, number: int) -> None:
    key = (folder, threading.get_ident())
    fd = _records.get(key)
    if fd is None:
        path = os.path.join(folder, f"{os.getpid()}.{key[1]}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        _records[key] = fd
    os.pwrite(fd, b"%*d" % (_WIDTH, number), 0)


class LoggedCall:
    """``fn(*args, **kwargs)``, recorded in ``folder`` as task ``number`` when it starts
    (not recorded where ``folder`` is empty).

    It carries its own arguments, so any keyword name (``fn``, ``self``...) reaches
    ``fn`` untouched by the engine's ``submit`` signature.
    """

    __slots__ = ("folder", "number", "fn", "args", "kwargs")

    def __init__(self, folder: str, number: int, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        self.folder = folder
        self.number = number
        self.fn = fn
        self.args = args
        self.kwargs = kwargs

    def __call__(self) -> Any:
        try:
            if self.folder:
                _record(self.folder, self.number)
        except OSError:  # the log is gone (its backend shut down): run all the same
            pass
        return self.fn(*self.args, **self.kwargs)

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return LoggedCall, (self.folder, self.number, self.fn, self.args, self.kwargs)


class StartLog:
    """A folder of records, one per worker thread: the number of the task it started last."""

    def __init__(self) -> None:
        shm = "/dev/shm"
        base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
        self.folder = tempfile.mkdtemp(prefix="parallel_hydra_starts_", dir=base)
        self._lock = threading.Lock()
        self._next = 0

    def call(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> LoggedCall:
        """A new numbered call of ``fn``; its number is ``call.number``."""
        with self._lock:
            self._next += 1
            number = self._next
        return LoggedCall(self.folder, number, fn, args, kwargs)

    def started_by(self, pid: int) -> Set[int]:
        """The numbers of the tasks that the threads of process ``pid`` started last."""
        numbers: Set[int] = set()
        prefix = f"{pid}."
        try:
            names = [name for name in os.listdir(self.folder) if name.startswith(prefix)]
        except OSError:
            return numbers
        for name in names:
            number = self._read(os.path.join(self.folder, name))
            if number is not None:
                numbers.add(number)
        return numbers

    @staticmethod
    def _read(path: str) -> Optional[int]:
        try:
            with open(path, "rb") as record:
                return int(record.read(_WIDTH))
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
