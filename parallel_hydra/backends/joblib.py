"""The joblib backend: loky worker processes on this machine, the local default.

Each executor gets a loky process pool of exactly ``max_workers`` processes, so loky
itself enforces the concurrency bound. loky queues submitted work itself and gives its
workers at most ``max_workers`` tasks ahead of the running ones (we size its call queue), so the shared executor hands it everything at
once and, under the ``PENDING`` policy, cancels in loky's queue what no worker has yet.
Stopping running tasks kills that pool's workers (loky's ``kill_workers``) and the next
task gets a fresh pool. The pool is shut down with the executor: no worker outlives it.

The object store keeps objects in this process. A handle is a settled or running
``concurrent.futures.Future`` under the hood; as an argument to ``submit`` it is replaced
by its value before the task is pickled, which is what Ray and Dask do with theirs.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
import weakref
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from joblib.externals.loky.backend.utils import kill_process_tree
from joblib.externals.loky.process_executor import ProcessPoolExecutor

from ..backend import BaseParallelBackend, available_cpus
from ..config import JoblibConfig, ParallelConfig
from ..executor import DoneCallback, TaskRunner

__all__ = ["JoblibParallelBackend", "LocalHandle"]

logger = logging.getLogger(__name__)


#: numpy arrays at least this large are shared with workers through a file, not pickled.
SHARE_BY_FILE_BYTES = 1 << 20


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class _FileBackedArray:
    """Pickles as "open this file read-only", so a worker maps a large array instead of
    receiving a copy of it through a pipe (what ``joblib.Parallel`` does with its
    memmapping, and close to Ray's zero-copy reads: tasks get a read-only array)."""

    __slots__ = ("path", "__weakref__")

    def __init__(self, path: str) -> None:
        self.path = path
        # The file goes when no handle or queued task here refers to it any more.
        weakref.finalize(self, _remove_quietly, path)

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        import numpy

        return numpy.load, (self.path, "r")


class LocalHandle:
    """A handle of the joblib backend's in-process object store."""

    __slots__ = ("_future", "_shared")

    def __init__(self, future: Future, shared: Optional[_FileBackedArray] = None) -> None:
        self._future = future
        self._shared = shared

    @classmethod
    def of(cls, obj: Any, shared: Optional[_FileBackedArray] = None) -> "LocalHandle":
        future: Future = Future()
        future.set_result(obj)
        return cls(future, shared)

    def done(self) -> bool:
        """Whether the value is ready."""
        return self._future.done()

    def value(self, timeout: Optional[float] = None) -> Any:
        """The object, waiting for it if a wrapped call is still computing it."""
        return self._future.result(timeout)

    def for_task(self) -> Any:
        """What a task gets: the object, or a file-backed stand-in for a large array."""
        return self._shared if self._shared is not None else self.value()

    def __repr__(self) -> str:
        return f"LocalHandle({'ready' if self.done() else 'pending'})"


def _resolve(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """Replace handles among a task's arguments by their values."""
    if LocalHandle in map(type, args):
        args = tuple(a.for_task() if isinstance(a, LocalHandle) else a for a in args)
    if kwargs and LocalHandle in map(type, kwargs.values()):
        kwargs = {k: v.for_task() if isinstance(v, LocalHandle) else v for k, v in kwargs.items()}
    return args, kwargs


def _relay(on_done: DoneCallback) -> Callable[[Future], None]:
    def relay(future: Future) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            on_done(True, future.result())
        else:
            on_done(False, exc)

    return relay


class _BoundedLokyPool(ProcessPoolExecutor):
    """A loky pool whose workers are handed at most ``max_workers`` tasks ahead.

    loky's call queue (tasks handed to workers but not started) holds
    ``2 * max_workers + 1`` by default. Those can no longer be cancelled, and our
    contract lets at most ``max_workers`` tasks wait ahead of the running ones.
    """

    def _setup_queues(self, job_reducers: Any, result_reducers: Any, queue_size: Optional[int] = None) -> None:
        super()._setup_queues(job_reducers, result_reducers, queue_size=self._max_workers)


class _LokyRunner(TaskRunner):
    """Runs one executor's tasks on a private loky pool of ``max_workers`` processes."""

    def __init__(self, max_workers: int, idle_timeout: float) -> None:
        self._max_workers = max_workers
        self._idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._pool: Optional[ProcessPoolExecutor] = None

    def _current_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = _BoundedLokyPool(self._max_workers, timeout=self._idle_timeout)
            return self._pool

    def enforces_bound(self, max_workers: int) -> bool:
        return True  # the pool has exactly max_workers processes

    def keeps_own_queue(self, max_workers: int) -> bool:
        # loky keeps submitted work in its own queue and moves at most max_workers
        # items ahead of its running workers; the rest can still be cancelled.
        return True

    def withdraw(self, tokens: List[Any]) -> List[bool]:
        # loky's cancel() says True again for a future cancelled before; the lock and the
        # cancelled() check make sure only one caller takes a task back.
        with self._lock:
            return [token is not None and not token.cancelled() and token.cancel() for token in tokens]

    def prepare(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        return _resolve(args, kwargs)

    def start(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Mapping[str, Any], on_done: DoneCallback) -> Any:
        future = self._current_pool().submit(fn, *args, **kwargs)
        future.add_done_callback(_relay(on_done))
        return future

    def stop(self, tokens: List[Any]) -> None:
        # loky cannot interrupt one task, but its workers can be killed: the pool goes,
        # and the next start() builds a new one. We kill the processes ourselves and let
        # loky notice its broken pool, the path its own crash handling takes; loky's
        # shutdown(kill_workers=True) raced with its queue-feeding thread here.
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            for process in list(getattr(pool, "_processes", {}).values()):
                kill_process_tree(process)  # the worker and anything the task started
            pool.shutdown(wait=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


class JoblibParallelBackend(BaseParallelBackend, name="joblib"):
    """Runs tasks in loky worker processes on this machine; nothing to set up.

    Examples
    --------
    >>> with JoblibParallelBackend(n_cpus=2) as backend:
    ...     handle = backend.put([1, 2, 3])
    ...     backend.get(backend.wrap(sum)(handle))
    6
    """

    config_class = JoblibConfig
    config: JoblibConfig

    def _start(self) -> None:
        self._pool_lock = threading.Lock()
        self._wrap_pool: Optional[ProcessPoolExecutor] = None
        self._share_dir: Optional[str] = None
        self._shm_dir: Optional[str] = None

    def _stop(self) -> None:
        with self._pool_lock:
            pool, self._wrap_pool = self._wrap_pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for folder in (self._share_dir, self._shm_dir):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        self._share_dir = self._shm_dir = None

    def _share_by_file(self, obj: Any) -> Optional[_FileBackedArray]:
        """Write a large numpy array to a file tasks can map; None for anything else."""
        numpy = sys.modules.get("numpy")
        if numpy is None or type(obj) is not numpy.ndarray or obj.dtype.hasobject or obj.nbytes < SHARE_BY_FILE_BYTES:
            return None
        with self._pool_lock:
            if self._share_dir is None:
                self._share_dir = tempfile.mkdtemp(prefix="parallel_hydra_")
            folder = self._share_dir
            shm = "/dev/shm"
            if os.path.isdir(shm) and shutil.disk_usage(shm).free > 2 * obj.nbytes:
                # Memory-backed where there is room (containers often have a small one).
                if self._shm_dir is None:
                    self._shm_dir = tempfile.mkdtemp(prefix="parallel_hydra_", dir=shm)
                folder = self._shm_dir
        path = os.path.join(folder, f"{uuid.uuid4().hex}.npy")
        numpy.save(path, obj)
        return _FileBackedArray(path)

    @classmethod
    def _count_slots_unstarted(cls, config: ParallelConfig) -> Optional[int]:
        return available_cpus()

    def _count_slots(self) -> int:
        return available_cpus()

    def _task_runner(self, max_workers: int) -> TaskRunner:
        return _LokyRunner(max_workers, self.config.idle_worker_timeout)

    # -- object store -------------------------------------------------------------

    def put(self, obj: Any) -> LocalHandle:
        """Keep ``obj`` here; a numpy array of 1 MiB or more is also written to a file
        (in ``/dev/shm`` where it has room), which tasks map read-only instead of copying.
        The file is a snapshot taken now, and is removed once nothing refers to it."""
        self._check_open()
        return LocalHandle.of(obj, self._share_by_file(obj))

    def get(self, handles: Any, *, timeout: Optional[float] = None) -> Any:
        end = None if timeout is None else time.monotonic() + timeout

        def one(handle: Any) -> Any:
            if not isinstance(handle, LocalHandle):
                raise TypeError(f"get takes handles from put or wrap; got {type(handle).__name__}")
            return handle.value(None if end is None else max(0.0, end - time.monotonic()))

        if isinstance(handles, (list, tuple)):
            return [one(h) for h in handles]
        return one(handles)

    def _start_wrapped(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Dict[str, Any]) -> LocalHandle:
        args, kwargs = _resolve(args, kwargs)
        with self._pool_lock:
            if self._wrap_pool is None:
                n = self.effective_n_jobs(-1)
                self._wrap_pool = ProcessPoolExecutor(n, timeout=self.config.idle_worker_timeout)
            pool = self._wrap_pool
        return LocalHandle(pool.submit(fn, *args, **kwargs))

    def wait(self, handles: Sequence[Any], *, num_returns: int = 1, timeout: Optional[float] = None) -> Tuple[List[Any], List[Any]]:
        handles = list(handles)
        self._check_num_returns(handles, num_returns)
        end = None if timeout is None else time.monotonic() + timeout
        while sum(h.done() for h in handles) < num_returns:
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            pending = [h._future for h in handles if not h.done()]
            futures_wait(pending, timeout=remaining, return_when=FIRST_COMPLETED)
        done = [h for h in handles if h.done()]
        return done, [h for h in handles if not h.done()]
