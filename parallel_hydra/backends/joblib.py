"""The joblib backend: loky worker processes on this machine, the local default.

The backend keeps one loky process pool, sized to its CPUs, that all its executors
share: a new executor finds the workers started and warm (their imports done), as
loky's reusable executor does for ``joblib.Parallel``. An executor whose
``max_workers`` is at least the pool's size is bounded by the pool, and hands it every
task at once under any policy, as a user of loky's executor does. An executor with fewer
``max_workers`` is bounded by its own count of tasks in flight. Workers outlive
executors, not the backend: its ``shutdown`` stops them.

What an executor hands over all at once does not all go to loky at once: loky would
move up to ``2 * size + 1`` calls to its workers ahead of the running ones, where
nothing can take them back. The pool keeps ``2 * size`` such loky calls out, so that
no more than ``size`` wait at the workers (what the ``PENDING`` policy lets finish), and
holds the rest, where ``future.cancel()`` and ``PENDING`` take them back, until calls
come back. Then it sends them; quick ones in batches, several tasks of one function to
one loky call, sized by the time the function's tasks take (about 5 ms a batch: tasks
slower than that, or with large arguments, go alone). One loky call costs the
submitting process more than a trivial task takes, which is why ``joblib.Parallel``
batches too (see :mod:`.loky_batch`). Each task of a batch still notes its own start,
and its outcome travels pickled on its own.

A loky pool is all or nothing: one dead worker fails every unfinished task of the pool,
and loky kills the pool's other workers with the tasks they run. The backend keeps the
damage to what had started (see :class:`_LokyPool`): each task notes its start in the
backend's start log, so after a crash the task that ran in the dead process fails with
``WorkerCrashedError``, the tasks the other workers had started fail with
``NeighborCrashedError`` (never run twice), and the tasks no worker had started, of any
executor, run again on a new pool. Stopping running tasks (``RUNNING``) kills the workers
that run them, the same way; only then, or after a crash, is a new pool started.

The object store keeps objects in this process. A handle is a settled or running
``concurrent.futures.Future`` under the hood; as an argument to ``submit`` it is replaced
by its value when the task can start (not when it is submitted), which is what Ray and
Dask do with theirs.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections import deque
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures import wait as futures_wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait as mp_wait
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Set, Tuple

from joblib._parallel_backends import LokyBackend
from joblib.externals.loky.backend.utils import kill_process_tree
from joblib.externals.loky.process_executor import ProcessPoolExecutor

from ..backend import BaseParallelBackend, SizedJoblibBackend, available_cpus
from ..config import JoblibConfig, ParallelConfig
from ..errors import NeighborCrashedError, WorkerCrashedError, describe_exit
from ..executor import DoneCallback, TaskRunner, _register_exit_hook
from ..in_task import thread_environment
from ..start_log import LoggedCall, StartLog
from ..sendable import cloudpickle_dumps, unpicklable_part
from .loky_batch import MAX_TASKS_OUT, Batch, Pace, light, size_of, unpacked, work_of

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


def _has_handles(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
    """Whether any of a task's arguments is a handle (checked per task: no allocation)."""
    for value in args:
        if type(value) is LocalHandle:
            return True
    if kwargs:
        for value in kwargs.values():
            if type(value) is LocalHandle:
                return True
    return False


def _resolve(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """Replace handles among a task's arguments by their (ready) values."""
    if not _has_handles(args, kwargs):
        return args, kwargs
    args = tuple(a.for_task() if isinstance(a, LocalHandle) else a for a in args)
    if kwargs:
        kwargs = {k: v.for_task() if isinstance(v, LocalHandle) else v for k, v in kwargs.items()}
    return args, kwargs


def _unready_handles(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[LocalHandle]:
    """The handles among a task's arguments whose values are still being computed."""
    return [a for a in (*args, *kwargs.values()) if isinstance(a, LocalHandle) and not a.done()]


def _when_ready(handles: List[LocalHandle], then: Callable[[], None]) -> None:
    """Call ``then()`` once every handle in ``handles`` is settled (from any thread)."""
    remaining = [len(handles)]
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            then()

    for handle in handles:
        handle._future.add_done_callback(one_done)


def _failed_handle(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[BaseException]:
    """The exception of the first handle argument whose wrapped call failed, if any."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, LocalHandle) and value._future.exception() is not None:
            return value._future.exception()
    return None


def _copy_outcome(target: Future, source: Future) -> None:
    error = source.exception()
    if error is None:
        target.set_result(source.result())
    else:
        target.set_exception(error)


def _translated(error: BaseException, call: LoggedCall) -> BaseException:
    """loky's error for a task as every engine reports it: a result that loky could not
    pickle back (loky says so only in the remote traceback) becomes ``PicklingError``,
    and so does a task loky could not pickle to send, naming what could not be pickled.
    (In a :class:`Batch`, the worker reports a result that cannot travel itself.)"""
    if isinstance(error, pickle.PicklingError) and "Could not pickle the task" in str(error):
        named = unpicklable_part(call.fn, call.args, call.kwargs, error, cloudpickle_dumps, "a loky worker")
        if named is not None:
            return named
    remote = str(error.__cause__ or "")
    if "_sendback_result" in remote and not isinstance(error, pickle.PicklingError):
        name = getattr(call.fn, "__name__", "")
        translated = pickle.PicklingError(f"the result of task {name} could not be pickled: {type(error).__name__}: {error}")
        translated.__cause__ = error
        return translated
    return error


class _ThisProcess:
    """This process, as ``kill_process_tree`` takes one."""

    pid = property(lambda self: os.getpid())

    def join(self) -> None:  # (never reached: the kill ends this process first)
        pass


def _task_name(fn: Any) -> str:
    """A task's name for a message: never an error of its own (a ``repr`` may raise)."""
    name = getattr(fn, "__name__", None)
    if isinstance(name, str):
        return name
    try:
        return repr(fn)
    except Exception:
        return type(fn).__name__


def _end_with_parent(parent: int) -> None:
    """In each loky worker, at its start: end the worker, and whatever its task started,
    once the process that started the pool is gone.

    loky's workers outlive an app ended by a signal it does not handle (``SIGTERM``,
    ``SIGKILL``): they wait for work until their idle timeout, and a running task runs
    to its end. A thread that looks at the worker's parent once a second ends them
    within a second instead. (``PR_SET_PDEATHSIG`` would be quicker, but it fires when
    the *thread* that started the worker ends, and loky starts workers from whichever
    thread submits.)
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        kill_process_tree(_ThisProcess())

    threading.Thread(target=watch, name="parallel_hydra-parent-watch", daemon=True).start()


def _ended(process: Any) -> bool:
    """Whether a worker process has ended. (Its ``exitcode`` may still say ``None`` for
    a moment when loky's own thread is reaping it.)"""
    try:
        return process.exitcode is not None or bool(mp_wait([process.sentinel], timeout=0))
    except ValueError:  # closed: loky joined it
        return True


def _new_loky_pool(size: int, idle_timeout: float, env: Optional[Dict[str, str]] = None) -> ProcessPoolExecutor:
    """A loky pool whose workers end with this process (see :func:`_end_with_parent`)."""
    return ProcessPoolExecutor(
        size, timeout=idle_timeout, env=env, initializer=_end_with_parent, initargs=(os.getpid(),)
    )


#: Whether the executors' exit hook was registered again after loky's own.
_exit_hook_after_loky = False


def _after_loky_started() -> None:
    """After a task went to loky: loky's exit hook exists now (its first pool started),
    and ours must run before it, or executors' queued tasks could not reach loky at exit."""
    global _exit_hook_after_loky
    if not _exit_hook_after_loky:
        _exit_hook_after_loky = True
        _register_exit_hook(again=True)


#: Times a task is run again because other tasks' crashes took its pool down.
_MAX_RERUNS = 3


class _LokyTask:
    """The token of one task: what to run, and where it is now."""

    __slots__ = ("call", "on_done", "future", "pool", "withdrawn", "stopped", "reruns", "pace", "held", "batch", "counted")

    def __init__(self, call: LoggedCall, on_done: DoneCallback, pace: Optional[Pace] = None) -> None:
        self.call = call
        self.on_done = on_done
        self.future: Optional[Future] = None  # loky's, once the task is submitted to a pool
        self.pool: Optional[ProcessPoolExecutor] = None
        self.withdrawn = False
        self.stopped = False
        self.reruns = 0
        self.pace = pace  # its function's, if it may be batched
        self.held = False  # in the pool's own queue, in no loky call yet
        self.batch: Optional[List["_LokyTask"]] = None  # the tasks of its loky call (itself, if alone)
        self.counted = False  # its loky call counts among the held tasks' calls out


class _LokyPool:
    """The backend's loky pool of ``size`` processes, shared by its executors.

    A loky pool is all or nothing: when one worker dies, loky fails every unfinished
    task of the pool, kills the other workers and the pool is gone for good. This class
    keeps that to the tasks that had started: the one running in the dead process (the
    start log says which) fails with :class:`WorkerCrashedError`; those the killed
    workers had started fail with :class:`NeighborCrashedError`, since running them again
    could repeat their effects (so do the tasks that had finished in a batch with one of
    those: their results die with the batch); the pool's tasks no worker had started, of
    every executor, go to a new pool as if nothing happened. Stopping tasks (the
    ``RUNNING`` policy) uses the same path: their workers are killed, and the stopped
    tasks that turn out not to have started are given back to their executor. A new
    pool is started on the next task after that, never before.

    Held tasks that may be batched reach loky as :class:`~.loky_batch.Batch` calls, of
    one task or several, which send each outcome back pickled on its own: a result that
    cannot be unpickled here fails its own task, where loky alone would break the pool
    over it. Other tasks go as plain calls, which cost a lone task about 10% less.
    """

    def __init__(self, size: int, idle_timeout: float, start_log: StartLog, env: Dict[str, str]) -> None:
        self.size = size
        # Set in the workers before they import anything: the backend's default thread
        # cap. Each task's own executor sets its cap again with threadpoolctl (InTask).
        self._env = env
        self._idle_timeout = idle_timeout
        self._log = start_log
        # Guards the pool, the live tasks and the tokens' state.
        self._lock = threading.Lock()
        self._pool: Optional[ProcessPoolExecutor] = None
        self._live: Dict[int, _LokyTask] = {}  # submitted to a pool, not yet reported
        self._broken_pools: "weakref.WeakSet[ProcessPoolExecutor]" = weakref.WeakSet()
        self._recovered: "weakref.WeakSet[ProcessPoolExecutor]" = weakref.WeakSet()  # (see _call_back)
        self._killed: Set[int] = set()  # worker PIDs stop() killed, not yet seen dead
        # The tasks of executors that hand over everything at once wait here while
        # `_depth` of their loky calls are out, and leave as calls come back (quick ones
        # in batches): so at most `size` calls wait at the workers ahead of the running
        # ones, as many as the PENDING policy lets wait there, and the rest can be taken
        # back. Only their calls count: an executor that hands over a few at a time (a
        # smaller one) sends its tasks straight to loky, and must not hold these back.
        self._depth = 2 * size
        self._calls_out = 0
        self._tasks_out = 0  # the tasks in those calls, at most MAX_TASKS_OUT
        self._held: Deque[_LokyTask] = deque()  # (withdrawn or stopped ones are skipped)
        self._closed = False
        # loky's thread never waits for _lock (see _call_back): the two counts have a
        # lock of their own, never held while calling loky, and what loky's thread
        # would send, a thread of the pool's own sends (_sender, started on first use).
        self._counts = threading.Lock()
        self._send_wanted = threading.Event()
        self._sender: Optional[threading.Thread] = None

    def start(
        self,
        fn: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        on_done: DoneCallback,
        pace: Optional[Pace],
        hold: bool,
    ) -> Any:
        """Run a task. ``hold``: its executor hands over every task at once, so the task
        waits here for one of the ``_depth`` calls (and can be taken back meanwhile);
        ``pace``: its function's, if it may share a loky call with others."""
        task = _LokyTask(self._log.call(fn, args, kwargs), on_done, pace)
        if not _has_handles(args, kwargs):
            if hold:
                self._hold(task)
            else:
                self._submit(task, resolved=True)
            return task
        task.pace = None  # (a handle's value is not known here: it goes alone, whatever its size)
        waiting = _unready_handles(args, kwargs)
        if waiting:  # a handle argument is resolved when the task can start, not before
            _when_ready(waiting, lambda: self._submit_when_ready(task, hold))
        elif hold:
            task.call.args, task.call.kwargs = _resolve(args, kwargs)
            self._hold(task)
        else:
            self._submit(task)
        return task

    def _hold(self, task: _LokyTask, on_callback: bool = False) -> None:
        """Queue a task (its handle arguments resolved) for a call of the held tasks';
        send what fits now, from this thread or (``on_callback``: maybe loky's) the
        pool's sender."""
        with self._lock:
            if task.withdrawn or task.stopped:
                return
            closed = self._closed
            if not closed:
                task.held = True
                self._held.append(task)
                if self._calls_out >= self._depth:
                    return
        if closed:  # (its handles resolved after the backend shut down)
            self._fail_shut_down([task])
        elif on_callback:
            self._wake_sender()
        else:
            self._send_held()

    def _submit_when_ready(self, task: _LokyTask, hold: bool) -> None:
        call = task.call
        failed = _failed_handle(call.args, call.kwargs)
        with self._lock:
            if task.withdrawn or task.stopped:
                return
        if failed is not None:
            task.on_done(False, failed)
            return
        try:
            if hold:
                call.args, call.kwargs = _resolve(call.args, call.kwargs)
                self._hold(task, on_callback=True)
            else:
                self._submit(task)
        except Exception as exc:  # no pool could be had: the task fails, nothing waits
            task.on_done(False, exc)

    def _submit(self, task: _LokyTask, resolved: bool = False) -> None:
        """Send one task to loky at once, as a plain call of its own, not counted among
        held tasks' calls: a task of an executor that hands over only a few at a time,
        or such a task run again after a crash."""
        call = task.call
        if not resolved:
            call.args, call.kwargs = _resolve(call.args, call.kwargs)
        with self._lock:
            if task.withdrawn or task.stopped:
                return
            # Submitted under the lock, so that stop() and a crash see the future; live
            # only once loky took it (a task that failed here must not be found live
            # and run by _recover).
            batch = [task]
            pool, future = self._to_loky(call)
            task.pool, task.future, task.batch, task.counted = pool, future, batch, False
            self._live[call.number] = task
        _after_loky_started()
        future.add_done_callback(functools.partial(self._reported, batch, pool, 0, False))

    def _to_loky(self, call: Callable[[], Any]) -> Tuple[ProcessPoolExecutor, Future]:
        """Submit ``call`` to the current pool, started if there is none. Lock held.

        loky refuses a call for a pool it found broken before _pool_broke heard of it:
        the call never left, so a new pool takes it.
        """
        if self._closed:
            raise RuntimeError("the joblib backend is shut down")
        pool = self._pool
        if pool is None:
            pool = self._pool = _new_loky_pool(self.size, self._idle_timeout, self._env)
        try:
            return pool, pool.submit(call)
        except BrokenProcessPool:
            pool = self._pool = _new_loky_pool(self.size, self._idle_timeout, self._env)
            return pool, pool.submit(call)

    def _send_held(self) -> None:
        """Send held tasks while fewer than ``_depth`` of their loky calls are out.

        A batch takes the tasks at the head of the queue that share a function, as many
        as its :class:`Pace` allows (one, until the pace is measured). A task that may
        not be batched goes as a plain call (a :class:`Batch` of one would cost a lone
        task about 10% more).
        """
        while True:
            with self._lock:
                held = self._held
                while held and not held[0].held:  # withdrawn or stopped meanwhile
                    held.popleft()
                with self._counts:
                    room = MAX_TASKS_OUT - self._tasks_out
                    full = self._calls_out >= self._depth
                if not held or full or room <= 0:
                    return
                pace = held[0].pace
                size = min(room, pace.batch_size(len(held), self._depth) if pace is not None else 1)
                batch: List[_LokyTask] = []
                while held and len(batch) < size and (held[0].pace is pace or not held[0].held):
                    task = held.popleft()
                    if task.held:
                        task.held = False
                        batch.append(task)
                failed: Optional[Exception] = None
                packed = pace is not None
                try:
                    pool, future = self._to_loky(Batch([t.call for t in batch]) if packed else batch[0].call)
                except Exception as exc:  # no pool could be had: these tasks fail, nothing waits
                    failed = exc
                else:
                    with self._counts:
                        self._calls_out += 1
                        self._tasks_out += len(batch)
                    for task in batch:
                        task.pool, task.future, task.batch, task.counted = pool, future, batch, True
                        self._live[task.call.number] = task
            if failed is not None:
                for task in batch:
                    self._settle(task, False, failed)
                continue
            _after_loky_started()
            future.add_done_callback(functools.partial(self._reported, batch, pool, len(batch), packed))

    def _call_back(self, tasks: int, broken: Optional[ProcessPoolExecutor] = None) -> None:
        """On loky's thread: one of the held tasks' loky calls came back, with ``tasks``
        tasks; what waits is sent, by the pool's sender thread.

        Not from here: a thread that submits holds ``_lock`` while loky writes to a
        pipe that only loky's thread empties, so waiting for that lock here, or
        submitting from here, can hang both once the pipe is full. Nothing is sent
        where the call's pool ``broken`` is still being recovered: loky kills a broken
        pool's workers only once its callbacks return, and a new pool would delay that;
        the recovery sends what waits when it is done.
        """
        with self._counts:
            self._calls_out -= 1
            self._tasks_out -= tasks
        if self._held and (broken is None or broken in self._recovered):
            self._wake_sender()

    def _wake_sender(self) -> None:
        """Have the pool's sender thread send what is held (started on first use)."""
        if self._sender is None:
            with self._counts:
                if self._sender is None and not self._closed:
                    self._sender = threading.Thread(target=self._send_loop, name="parallel_hydra-loky-send", daemon=True)
                    self._sender.start()
        self._send_wanted.set()

    def _send_loop(self) -> None:
        while True:
            self._send_wanted.wait()
            self._send_wanted.clear()
            if self._closed:
                return
            try:
                self._send_held()
            except Exception:  # pragma: no cover - _send_held fails its tasks itself
                logger.exception("sending held tasks to loky failed")

    def _reported(self, batch: List[_LokyTask], pool: ProcessPoolExecutor, counted: int, packed: bool, future: Future) -> None:
        """loky's report on one call: each task's own outcome; a broken pool is handled
        once for all its tasks.

        ``counted``: the tasks of the call if it counts among the held tasks' calls out,
        else 0 (bound here, not read from the tasks, which a recovery may have sent
        again meanwhile). ``packed``: the call was a :class:`Batch`, not a plain one.
        """
        try:
            error = future.exception(0)
        except CancelledError:
            return  # a lone task taken back: withdraw() counted its call back in
        try:
            self._report(batch, pool, future, error, packed)
        finally:
            if counted:
                self._call_back(counted, pool if isinstance(error, BrokenProcessPool) else None)

    def _report(self, batch: List[_LokyTask], pool: ProcessPoolExecutor, future: Future, error: Optional[BaseException], packed: bool) -> None:
        if isinstance(error, BrokenProcessPool):
            self._pool_broke(pool, error)
            return
        # Stale: a report from a pool a task has left (it was run again elsewhere).
        # No lock: the thread that submits holds it while loky writes to a pipe, and
        # waiting for it here would stall loky's thread, which feeds the workers. The
        # pop is atomic: against stop(), withdraw() and a crash (which take the task
        # out of _live under the lock), exactly one side gets each task.
        mine = [
            (i, task) for i, task in enumerate(batch)
            if task.future is future and not task.stopped and task.call is not None
            and self._live.pop(task.call.number, None) is not None
        ]
        if error is None and not packed:
            for _, task in mine:  # a plain call's result, which loky unpickled
                self._settle(task, True, future.result())
            return
        if error is None:
            outcomes, longest = future.result()
            pace = batch[0].pace
            if pace is not None:
                pace.note(longest, max(map(size_of, outcomes)))
            for i, task in mine:
                self._settle(task, *unpacked(getattr(task.call.fn, "__name__", ""), outcomes[i]))
            return
        unsent = isinstance(error, pickle.PicklingError) and "Could not pickle the task" in str(error)
        if unsent and len(batch) > 1:
            # Nothing of the batch left this process: each task goes again alone, so
            # that only the one that does not pickle fails, first of what is held.
            self._hold_again([task for _, task in mine])
            return
        for _, task in mine:
            try:
                failure = _translated(error, task.call)
            except Exception as exc:  # the future must settle whatever happens here
                logger.debug("could not make loky's error clearer: %r", exc)
                failure = error
            self._settle(task, False, failure)

    def _settle(self, task: _LokyTask, ok: bool, value: Any) -> None:
        """Report one task's end; one task's trouble here must not strand its batch-mates."""
        on_done = task.on_done
        # Let go of the callable, its arguments and the result once they are reported.
        task.call = task.future = task.on_done = task.batch = None  # type: ignore[assignment]
        try:
            on_done(ok, value)
        except Exception:  # pragma: no cover - the executor's callback does not raise
            logger.exception("reporting a task's end failed")

    def _pool_broke(self, pool: Optional[ProcessPoolExecutor], error: BaseException) -> None:
        """A worker of some pool died: blame the task it ran, run the others again.

        Called from loky's own thread while it fails the pool's futures, before it
        kills the pool's other workers: the processes dead at this moment are the ones
        that died on their own (or that ``stop`` killed).
        """
        with self._lock:
            if pool is None or pool in self._broken_pools:
                return
            self._broken_pools.add(pool)
            if self._pool is pool:
                self._pool = None
            # Claimed by the pop, as _report claims what it reports: another thread
            # (another pool's, loky's feeder, one that saw a future already done) may
            # report some of these meanwhile, and exactly one side gets each task.
            affected = [
                t for number, t in list(self._live.items()) if t.pool is pool and self._live.pop(number, None) is t
            ]
        processes = dict(getattr(pool, "_processes", {}) or {})
        dead = {pid: p.exitcode for pid, p in processes.items() if p.exitcode is not None}
        blamed: Dict[int, Tuple[int, Optional[int]]] = {}  # task number -> (pid, exit code)
        with self._lock:
            # A worker stop() killed may have moved on to another task: not that one's fault.
            killed, self._killed = self._killed & set(dead), self._killed - set(dead)
        for pid, exitcode in dead.items():
            if pid in killed:
                continue
            for number in self._log.started_by(pid):
                blamed[number] = (pid, exitcode)
        if not dead:  # loky broke without a death (a payload that failed to unpickle)
            for pid in processes:
                for number in self._log.started_by(pid):
                    blamed[number] = (pid, None)
        if killed and len(killed) == len(dead):
            why = "workers were killed to stop cancelled tasks"
        else:
            why = "; ".join(
                f"worker pid {pid} died ({describe_exit(code)})" for pid, code in dead.items() if pid not in killed
            ) or f"the pool broke ({error})"
        threading.Thread(
            target=self._recover,
            args=(pool, affected, blamed, list(processes.values()), why, error),
            name="parallel_hydra-loky-recover",
            daemon=True,
        ).start()

    def _recover(
        self,
        pool: ProcessPoolExecutor,
        affected: List[_LokyTask],
        blamed: Dict[int, Tuple[int, Optional[int]]],
        processes: List[Any],
        why: str,
        error: BaseException,
    ) -> None:
        """Fail the tasks that had started in the broken pool, run the others again.

        Waits until loky has killed all the pool's workers first: until then, a healthy
        worker may still start a task from loky's queue, and such a task must not run
        a second time.
        """
        alive = [p for p in processes if p.exitcode is None]
        if alive:
            mp_wait([p.sentinel for p in alive], timeout=10)
            stuck = [p for p in alive if p.exitcode is None]
            for process in stuck:  # loky's kill failed: ours, or a started task could run twice
                try:
                    os.kill(process.pid, signal.SIGKILL)
                except OSError:
                    pass
            if stuck:
                mp_wait([p.sentinel for p in stuck], timeout=30)
        try:
            started = set().union(*(self._log.recently_started_by(p.pid) for p in processes)) if processes else set()
            rerun: List[_LokyTask] = []
            for task in affected:
                try:
                    self._recover_one(task, blamed, started, why, error, rerun)
                except Exception as exc:  # pragma: no cover - one task's trouble must not strand the others
                    logger.exception("recovering a task from a broken pool failed")
                    if task.call is not None and not task.stopped and not task.withdrawn:
                        self._settle(task, False, exc)
            self._hold_again(rerun)
        finally:
            with self._lock:
                self._recovered.add(pool)
            self._send_held()  # (not sent while loky was failing the broken pool)

    def _recover_one(
        self,
        task: _LokyTask,
        blamed: Dict[int, Tuple[int, Optional[int]]],
        started: Set[int],
        why: str,
        error: BaseException,
        rerun: List[_LokyTask],
    ) -> None:
        """Fail one task of a broken pool if it had started, or run it again (a held
        one: added to ``rerun``, to be held again)."""
        if task.stopped or task.withdrawn or task.held or task.call is None:  # (None: reported meanwhile)
            return
        number = task.call.number
        name = _task_name(task.call.fn)
        crash: Optional[WorkerCrashedError] = None
        if number in blamed:
            pid, exitcode = blamed[number]
            crash = WorkerCrashedError(f"the worker process (pid {pid}) running task {name} died ({describe_exit(exitcode)})")
        elif number in started:
            crash = NeighborCrashedError(
                f"task {name} had started in the worker pool when {why}; loky then stops all the pool's "
                f"workers, so it was stopped (or its result lost) and is not run again: it may have had effects"
            )
        elif task.reruns >= _MAX_RERUNS:
            crash = WorkerCrashedError(f"task {name} was in a worker pool that broke {task.reruns + 1} times: {error}")
        if crash is not None:
            crash.__cause__ = error
            self._settle(task, False, crash)
            return
        task.reruns += 1
        if task.counted:  # from the held tasks: again first of them, within their calls
            rerun.append(task)
            return
        try:
            self._submit(task)
        except Exception as exc:  # pragma: no cover - no new pool could be started
            self._settle(task, False, exc)

    def _hold_again(self, tasks: List[_LokyTask]) -> None:
        """Put tasks that left the held queue back at its head, in order, each to go
        alone (a plain call): a batch that did not pickle, reruns after a crash. The
        caller sends them (``_send_held``), or a report of a call does."""
        closed: List[_LokyTask] = []
        with self._lock:
            for task in reversed(tasks):
                if task.withdrawn or task.stopped or task.call is None:
                    continue
                if self._closed:
                    closed.append(task)
                    continue
                task.pace, task.held, task.counted = None, True, False
                task.pool = task.future = task.batch = None
                self._held.appendleft(task)
        self._fail_shut_down(closed)

    def _fail_shut_down(self, tasks: List[_LokyTask]) -> None:
        """Fail tasks that can no longer start: the backend was shut down."""
        for task in tasks:
            self._settle(task, False, RuntimeError("the joblib backend was shut down before the task could start"))

    def withdraw(self, tokens: List[Any]) -> List[bool]:
        # loky's cancel() says True again for a future cancelled before; the lock makes
        # sure only one caller takes a task back. A task that left in a batch is not
        # taken back: batches leave only as their calls come back, so loky hands them
        # to its workers at once.
        taken = []
        freed = 0
        with self._lock:
            for task in tokens:
                ok = False
                if task is not None and task.call is not None and not task.withdrawn and not task.stopped:
                    if task.held:  # still here (the queue skips it from now on)
                        task.held = False
                        ok = True
                    elif task.future is None:  # still waiting for its handle arguments
                        ok = True
                    elif len(task.batch or ()) == 1 and not task.future.cancelled() and task.future.cancel():
                        ok = True
                        self._live.pop(task.call.number, None)
                        freed += task.counted
                    task.withdrawn = ok
                taken.append(ok)
            with self._counts:
                self._calls_out -= freed
                self._tasks_out -= freed  # (a lone task each)
        if freed:
            self._wake_sender()  # (the caller may be a done-callback on loky's thread)
        return taken

    def stop(self, tokens: List[Any]) -> List[Any]:
        # loky cannot interrupt one task, but its workers can be killed. Kill the ones
        # running these tasks (all of a pool's, where one of them has not started yet);
        # the pool breaks, and _pool_broke runs its unstarted tasks again on a new pool.
        # Where every worker of a pool was killed, the start log then says for sure
        # which of these tasks never started (held here, waiting in loky's queue or
        # in a batch behind a stopped task): those are given back, to run again.
        victims: List[Any] = []
        spared: List[_LokyTask] = []
        emptied: List[Tuple[ProcessPoolExecutor, List[Any], List[_LokyTask]]] = []
        with self._lock:
            numbers = set()
            pools = set()
            for task in tokens:
                task.stopped = True
                if task.held:  # it never left this process
                    task.held = False
                    spared.append(task)
                elif task.call is not None and self._live.pop(task.call.number, None) is not None:
                    numbers.add(task.call.number)
                    pools.add(task.pool)
            for pool in pools:
                if self._pool is pool:
                    self._pool = None
                processes = list((getattr(pool, "_processes", {}) or {}).items())
                running = {pid: p for pid, p in processes if self._log.started_by(pid) & numbers}
                found = set().union(*(self._log.started_by(pid) for pid in running)) & numbers if running else set()
                pool_tasks = [t for t in tokens if t.pool is pool and t.call is not None and t.call.number in numbers]
                if {t.call.number for t in pool_tasks} <= found:
                    victims.extend(running.values())
                else:
                    victims.extend(p for _, p in processes)
                    emptied.append((pool, [p for _, p in processes], pool_tasks))
        with self._lock:
            self._killed.update(p.pid for p in victims)
        for process in victims:
            try:
                kill_process_tree(process)  # the worker and anything the task started
            except ProcessLookupError:
                pass
        if victims:  # the work has ended when stop() returns
            mp_wait([p.sentinel for p in victims], timeout=10)
        for pool, processes, pool_tasks in emptied:
            # (A worker loky started after the snapshot could have started one: then
            # none is given back.)
            processes = list({id(p): p for p in [*processes, *(getattr(pool, "_processes", {}) or {}).values()]}.values())
            if not all(_ended(p) for p in processes):
                continue
            started = set().union(*(self._log.recently_started_by(p.pid) for p in processes)) if processes else set()
            spared.extend(t for t in pool_tasks if t.call.number not in started)
        return spared

    def shutdown(self) -> None:
        """Stop the workers; called by the backend once its executors are shut down."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._closed = True
            held = [task for task in self._held if task.held]
            self._held.clear()
            for task in held:
                task.held = False
        with self._counts:
            sender, self._sender = self._sender, None
        self._send_wanted.set()  # (it sees _closed and ends)
        self._fail_shut_down(held)  # (none where every executor was shut down first)
        if pool is not None:
            pool.shutdown(wait=True)
        if sender is not None and sender is not threading.current_thread():
            sender.join(10)


class _SizedLokyBackend(SizedJoblibBackend, LokyBackend):
    """joblib's own loky backend, with ``n_jobs`` counted by our backend (``joblib_context``)."""


class _LokyRunner(TaskRunner):
    """One executor's side of the backend's shared :class:`_LokyPool`.

    An executor of the pool's size (or larger) hands it every task at once, under any
    policy: the pool keeps its own queue (``keeps_own_queue``). It holds the tasks and
    keeps ``2 * size`` loky calls out for them, each of one task or a batch of quick
    ones, so that at most ``size`` calls wait at the workers ahead of the running ones.
    What it holds, and a call still in loky's queue, it gives back (``withdraw``):
    ``PENDING`` cancels exactly that. A smaller executor is bounded by its own count of
    tasks in flight, and sends each task to loky alone and at once.

    The tasks of an executor that hands over everything at once may be batched, where
    their arguments are small: the runner keeps a :class:`Pace` per function for them.
    """

    def __init__(self, pool: _LokyPool) -> None:
        self._pool = pool
        self._holds = False
        self._paces: Dict[Any, Pace] = {}  # by the work a task does (work_of)

    def expect_in_flight(self, limit: float) -> None:
        self._holds = math.isinf(limit)

    def enforces_bound(self, max_workers: int) -> bool:
        return self._pool.size <= max_workers

    def keeps_own_queue(self, max_workers: int) -> bool:
        return self._pool.size <= max_workers

    def can_withdraw(self, max_workers: int) -> bool:
        return True

    def start(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Mapping[str, Any], on_done: DoneCallback) -> Any:
        pace = None
        if self._holds and light(args, kwargs):
            work = work_of(fn)
            pace = self._paces.get(work)
            if pace is None:
                pace = self._paces[work] = Pace()
        return self._pool.start(fn, args, kwargs, on_done, pace, self._holds)

    def withdraw(self, tokens: List[Any]) -> List[bool]:
        return self._pool.withdraw(tokens)

    def stop(self, tokens: List[Any]) -> List[Any]:
        return self._pool.stop(tokens)

    def close(self) -> None:
        self._paces.clear()


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
        self._start_log = StartLog()
        self._wrap_pool: Optional[ProcessPoolExecutor] = None
        self._task_pool: Optional[_LokyPool] = None
        self._share_dir: Optional[str] = None
        self._shm_dir: Optional[str] = None

    def _stop(self) -> None:
        with self._pool_lock:
            pool, self._wrap_pool = self._wrap_pool, None
            task_pool, self._task_pool = self._task_pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if task_pool is not None:
            task_pool.shutdown()
        self._start_log.close()
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
        with self._pool_lock:
            if self._task_pool is None:
                # Sized for the largest executor this backend makes; the environment's
                # thread cap is that of an executor of that size, the narrowest one.
                slots = self.effective_n_jobs(-1)
                env = thread_environment(self.threads_per_task(slots, slots))
                self._task_pool = _LokyPool(slots, self.config.idle_worker_timeout, self._start_log, env)
            return _LokyRunner(self._task_pool)

    def _joblib_backend(self) -> Any:
        # joblib.Parallel runs on joblib's one reusable loky pool of this process (shared
        # with joblib calls outside the block, and resized to each call's n_jobs); its
        # idle workers leave after joblib's own timeout (300 s), or at exit.
        return _SizedLokyBackend(sized_by=self)

    # -- object store -------------------------------------------------------------

    def put(self, obj: Any) -> LocalHandle:
        """Keep ``obj`` here; a numpy array of 1 MiB or more is also written to a file
        (in ``/dev/shm`` where it has room), which tasks map read-only instead of copying.
        The file is a snapshot taken now, and is removed once nothing refers to it."""
        self._check_open()
        return LocalHandle.of(obj, self._share_by_file(obj))

    def get(self, handles: Any, *, timeout: Optional[float] = None) -> Any:
        end = None if timeout is None else time.monotonic() + timeout

        many = isinstance(handles, (list, tuple))
        items = list(handles) if many else [handles]
        self._require_handles("gets", items)
        values = []
        for handle in items:
            try:
                values.append(handle.value(None if end is None else max(0.0, end - time.monotonic())))
            except FuturesTimeoutError:
                if handle.done():  # the wrapped call's own TimeoutError
                    raise
                waiting = sum(not h.done() for h in items)
                raise TimeoutError(f"{waiting} joblib result(s) not ready within {timeout} s") from None
        return values if many else values[0]

    def _start_wrapped(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Dict[str, Any]) -> LocalHandle:
        outcome: Future = Future()

        def submit() -> None:
            failed = _failed_handle(args, kwargs)
            if failed is not None:
                outcome.set_exception(failed)
                return
            try:
                future = self._wrapping_pool().submit(LoggedCall("", 0, fn, *_resolve(args, kwargs)))
            except Exception as exc:
                outcome.set_exception(exc)
                return
            future.add_done_callback(functools.partial(_copy_outcome, outcome))

        waiting = _unready_handles(args, kwargs)
        if waiting:  # as on Ray and Dask, a call on a pending handle returns at once
            _when_ready(waiting, submit)
        else:
            submit()
        return LocalHandle(outcome)

    def _wrapping_pool(self) -> ProcessPoolExecutor:
        """The pool behind ``wrap``: made on first use, and again after it broke."""
        with self._pool_lock:
            pool = self._wrap_pool
            if pool is None or getattr(getattr(pool, "_flags", None), "broken", None):
                pool = self._wrap_pool = _new_loky_pool(self.effective_n_jobs(-1), self.config.idle_worker_timeout)
            return pool

    def _is_handle(self, obj: Any) -> bool:
        return isinstance(obj, LocalHandle)

    def _wait(self, handles: List[Any], num_returns: int, timeout: Optional[float]) -> Tuple[List[Any], List[Any]]:
        end = None if timeout is None else time.monotonic() + timeout
        while sum(h.done() for h in handles) < num_returns:
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            futures_wait([h._future for h in handles if not h.done()], timeout=remaining, return_when=FIRST_COMPLETED)
        return [h for h in handles if h.done()], [h for h in handles if not h.done()]
