"""Which tasks each worker process started, kept where it outlives the worker.

When a worker process dies, its engine knows that it died but not (loky) or not for
sure (Dask, which blames every task the worker held) which task killed it. Each task
the backends send to a process they started goes out wrapped in :class:`LoggedCall`,
which writes the task's number into a small file of its process before it runs: after
a crash, the file of the dead process names the task it was running. One ``pwrite`` on
a memory-backed file per task; the files go with the log's folder.

Each file is a ring of the last ``_SLOTS`` starts of its thread (16 KB), not only the last one:
a task whose result was lost with its process (it finished, and the process started
another before the result reached the caller) must count as started, or it would be
run a second time.

On Dask, where the scheduler may run a finished task a second time (see
:func:`claim_run`), a task also claims its number in the same folder before it runs.

Only for worker processes on this machine (a loky pool, a Dask ``LocalCluster``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Set, Tuple

from .in_task import InTask

__all__ = ["StartLog", "LoggedCall", "note_start", "claim_run", "release_run", "has_claim", "STARTS_KEPT"]

_SEQ_WIDTH = 12  # digits of a start's sequence number in its thread
_WIDTH = 20  # digits of a task number
_ENTRY = _SEQ_WIDTH + _WIDTH
# Starts kept per thread: more than a worker can start while its pool breaks (loky hands
# its workers at most 2 * size + 1 calls ahead, and the joblib backend keeps its batches
# within STARTS_KEPT // 2 tasks) or while its results wait to be fetched.
_SLOTS = 512
#: How many of its latest starts each worker thread's record keeps.
STARTS_KEPT = _SLOTS

# In a worker process: [open record file, starts so far] of each (log folder, thread).
_records: Dict[Tuple[str, int], List[int]] = {}


def _record(folder: str, number: int) -> None:
    key = (folder, threading.get_ident())
    record = _records.get(key)
    if record is None:
        path = os.path.join(folder, f"{os.getpid()}.{key[1]}")
        # Truncated: a process that reuses a dead one's PID must not inherit its starts.
        record = _records[key] = [os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 0]
    record[1] += 1
    seq = record[1]
    os.pwrite(record[0], b"%*d%*d" % (_SEQ_WIDTH, seq, _WIDTH, number), (seq % _SLOTS) * _ENTRY)


def note_start(folder: str, number: int) -> None:
    """In a worker: record in ``folder`` that this thread starts task ``number`` now."""
    try:
        _record(folder, number)
    except OSError:  # the log is gone (its backend shut down): run all the same
        pass


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
        if self.folder:
            note_start(self.folder, self.number)
        return self.fn(*self.args, **self.kwargs)

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        fn = self.fn
        if type(fn) is InTask:
            # One object on the wire for both wrappers: each class a task names costs
            # its pickling a module lookup (cloudpickle's), on the thread that feeds
            # the workers, for every task.
            return _logged_in_task, (self.folder, self.number, self.args, self.kwargs, *fn.__reduce__()[1])
        return LoggedCall, (self.folder, self.number, fn, self.args, self.kwargs)


def _logged_in_task(folder: str, number: int, args: Tuple[Any, ...], kwargs: Dict[str, Any], *in_task: Any) -> LoggedCall:
    """A :class:`LoggedCall` of an :class:`InTask`, as its ``__reduce__`` flattened it."""
    return LoggedCall(folder, number, InTask(*in_task), args, kwargs)


def _ran_path(folder: str, number: int) -> str:
    return os.path.join(folder, f"ran.{number}")


def claim_run(folder: str, number: int) -> bool:
    """In a worker, once task ``number``'s start is noted and before it runs: False if
    it has started before (and did not raise).

    Dask computes a finished task again when the only copy of its result was on a worker
    that died before the result was fetched (it keeps what a client wants by lineage).
    The claim is a file ``ran.<number>`` made only if it is not there: the second run
    finds it and does not run. A task that raises gives its claim back
    (:func:`release_run`), so that Dask's ``retries`` still run it again; the backend
    gives the others back once it is done with the task (:meth:`StartLog.give_back`).
    True where the file cannot be made at all (the log is gone, ``/dev/shm`` is full):
    the task then runs unguarded rather than not at all.
    """
    try:
        os.close(os.open(_ran_path(folder, number), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    except OSError:
        pass
    return True


def release_run(folder: str, number: int) -> None:
    """Give back the claim of task ``number`` (see :func:`claim_run`)."""
    try:
        os.remove(_ran_path(folder, number))
    except OSError:
        pass


def has_claim(folder: str, number: int) -> bool:
    """Whether task ``number`` has claimed its run (it started, and did not raise)."""
    return os.path.exists(_ran_path(folder, number))


#: Seconds a finished task's claim outlives its result here: until the scheduler has
#: heard that no client wants the task any more, a worker's death could still make Dask
#: compute it again.
CLAIM_GRACE = 10.0


class StartLog:
    """A folder of records, one per worker thread: the numbers of the tasks it started lately."""

    def __init__(self) -> None:
        shm = "/dev/shm"
        base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
        self.folder = tempfile.mkdtemp(prefix="parallel_hydra_starts_", dir=base)
        self._lock = threading.Lock()
        self._next = 0
        self._claims_due: Deque[Tuple[float, int]] = deque()  # (when, number) to give back

    def call(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> LoggedCall:
        """A new numbered call of ``fn``; its number is ``call.number``."""
        with self._lock:
            self._next += 1
            number = self._next
        return LoggedCall(self.folder, number, fn, args, kwargs)

    def give_back(self, number: int, later: bool = False) -> None:
        """Give back task ``number``'s claim (:func:`claim_run`): now, or ``CLAIM_GRACE``
        seconds from now (``later``). Claims that have come due go back on each call."""
        now = time.monotonic()
        due = []
        with self._lock:
            if later:
                self._claims_due.append((now + CLAIM_GRACE, number))
            else:
                due.append(number)
            while self._claims_due and self._claims_due[0][0] <= now:
                due.append(self._claims_due.popleft()[1])
        for n in due:
            release_run(self.folder, n)

    def started_by(self, pid: int) -> Set[int]:
        """The numbers of the tasks that the threads of process ``pid`` started last."""
        return {max(starts)[1] for starts in self._starts(pid) if starts}

    def recently_started_by(self, pid: int) -> Set[int]:
        """The numbers of the tasks that the threads of process ``pid`` started lately
        (the last ``_SLOTS`` of each thread), whether they finished or not."""
        return {number for starts in self._starts(pid) for _, number in starts}

    def _starts(self, pid: int) -> List[List[Tuple[int, int]]]:
        """For each thread of process ``pid``: its recorded ``(sequence, task number)`` pairs."""
        prefix = f"{pid}."
        try:
            names = [name for name in os.listdir(self.folder) if name.startswith(prefix)]
        except OSError:
            return []
        return [self._read(os.path.join(self.folder, name)) for name in names]

    @staticmethod
    def _read(path: str) -> List[Tuple[int, int]]:
        try:
            with open(path, "rb") as record:
                data = record.read(_SLOTS * _ENTRY)
        except OSError:
            return []
        starts = []
        for offset in range(0, len(data) - _ENTRY + 1, _ENTRY):
            entry = data[offset : offset + _ENTRY]
            try:
                starts.append((int(entry[:_SEQ_WIDTH]), int(entry[_SEQ_WIDTH:])))
            except ValueError:  # a slot not written yet (zero bytes), or being written
                continue
        return starts

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
