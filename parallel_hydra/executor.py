"""The one executor every backend shares.

``ParallelExecutor`` implements the ``concurrent.futures.Executor`` contract once:
ordering and time-outs of ``map``, the bound on concurrent tasks, the cancellation
policy applied at shutdown, and what a future reports. An engine plugs in through a
:class:`TaskRunner`, which only knows how to start one task, how to stop tasks that are
running, and how to release what it holds. No engine code lives in this module.

How work flows
--------------
``submit`` puts a task in the *queue*. Tasks leave the queue for the engine (become
*in flight*) while fewer than ``limit`` are in flight. When the engine enforces the
``max_workers`` bound itself (a loky pool of that size, a Ray or Dask cluster with no
more slots than that), ``limit`` is ``2 * max_workers``: the engine is handed up to
``max_workers`` tasks ahead, so its workers never wait on a round trip to us, as with
the process pool of ``concurrent.futures``. Otherwise ``limit`` is ``max_workers`` and
our count is the bound. Completions arrive by callback from the engine; each one hands
the next queued task over. Nothing polls.

The queue is kept here only so that ``PENDING`` can cancel exactly what no worker has.
Where there is nothing to keep it for, every task goes to the engine at once (no
limit), as users of the raw engines do:

- an engine that keeps a queue of its own and gives its workers only a few tasks
  (Dask's scheduler, the joblib backend's pool) can take back from it what no worker
  has been given (``TaskRunner.withdraw``), under any policy;
- an engine that bounds concurrency itself, under a policy with no ``PENDING`` part
  (``NONE``, ``RUNNING``): ``future.cancel()`` takes back what the engine still can,
  and so does ``shutdown(cancel_futures=PENDING)`` given later; a task the engine has
  given a worker, or cannot take back, runs to its end.

A task in flight counts as running: its future says ``running()``, and the ``PENDING``
policy lets it finish (unless the engine can take it back unstarted). ``RUNNING`` asks
the engine to stop every task in flight and reports those futures as cancelled.

When things go wrong
--------------------
- A runner reports a task's failure as that task's exception; a crashed worker is the
  runner's business (it blames the task that ran there and runs the others again), so
  the executor sees one failed task, never a broken pool.
- A runner that reports :class:`~parallel_hydra.errors.EngineLostError` (the cluster is
  gone) breaks the executor: every unfinished task fails with that error, new submits
  raise it, and shutdown has nothing left to wait for.
- Leaving a ``with`` block on ``KeyboardInterrupt`` applies ``ALL``, whatever the
  policy, and so does a Ctrl-C while ``shutdown`` waits; another exception applies the
  policy and logs what it waits for.
- An executor never shut down is shut down with its policy at interpreter exit.
- A task lets go of its callable, arguments and engine handle as soon as it is settled,
  and ``map`` holds no result it has handed out.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Executor, Future, InvalidStateError
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Mapping, Optional, Set, Tuple, Type

from .checks import require_integer
from .errors import EngineLostError
from .in_task import InTask, logs_of, replay
from .policy import CancellationPolicy, PolicyLike, as_policy
from .progress import ProgressBar

__all__ = ["ParallelExecutor", "TaskRunner", "TaskFuture", "Outcome"]

logger = logging.getLogger(__name__)

#: What a runner reports when a task ends: ``(True, result)`` or ``(False, exception)``.
Outcome = Tuple[bool, Any]
DoneCallback = Callable[[bool, Any], None]


class TaskRunner(ABC):
    """How one engine runs the tasks of one executor.

    A runner is made by its backend for each executor and used by nobody else. The
    executor calls ``start`` from whichever thread frees a slot (the caller's, or an
    engine callback thread), so ``start`` must be quick and must not block on tasks.
    """

    @abstractmethod
    def start(
        self,
        fn: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        options: Mapping[str, Any],
        on_done: DoneCallback,
    ) -> Any:
        """Hand one task to the engine and return a token that identifies it.

        ``on_done(ok, value)`` must be called exactly once when the task ends, from any
        thread, with the task's result or its exception (of the task's own type, not an
        engine wrapper). It may be called before ``start`` returns.
        """

    @abstractmethod
    def stop(self, tokens: List[Any]) -> Optional[List[Any]]:
        """Really stop the tasks behind ``tokens``, which the engine was handed.

        Marking them is not enough: the work must end (kill the worker, interrupt the
        task). The executor has already forgotten these tasks, so ``on_done`` calls
        that still arrive for them are ignored. Later ``start`` calls must still work.

        May return the tokens among them whose tasks turn out, once the work has
        ended, never to have started (an engine that sends tasks to a worker in
        batches cannot take back one that waits behind a running one): the executor
        treats those as pending, not running.
        """

    def close(self) -> None:
        """Release what this runner holds. Called once, when no task is left."""

    def enforces_bound(self, max_workers: int) -> bool:
        """Whether the engine itself never runs more than ``max_workers`` of our tasks.

        If it does, the executor may hand it ``max_workers`` tasks ahead.
        """
        return False

    def expect_in_flight(self, limit: float) -> None:
        """Told once, before the first task: how many of the executor's tasks the engine
        may hold at once (``math.inf``: each is handed over as it is submitted). An engine
        may choose by it how it hears of tasks' ends: one at a time where the executor
        waits for an end to hand over the next task, in batches where it does not."""

    def keeps_own_queue(self, max_workers: int) -> bool:
        """Whether the engine queues tasks itself and gives its workers only a few.

        Such an engine (loky: a call queue of ``max_workers`` ahead of its workers) may be
        handed every task at once, which spares a round trip per task, as long as it can
        take back the ones no worker has yet: see :meth:`withdraw`.
        """
        return False

    def can_withdraw(self, max_workers: int) -> bool:
        """Whether :meth:`withdraw` may give tasks back; by default, if the engine keeps
        its own queue."""
        return self.keeps_own_queue(max_workers)

    def withdraw(self, tokens: List[Any]) -> List[bool]:
        """Take back tasks that no worker has been given; say which ones were.

        A withdrawn task never runs and its ``on_done`` is never called. The executor
        asks on ``future.cancel()`` and when a policy cancels pending tasks, so an engine
        that keeps its own queue (:meth:`keeps_own_queue`), or that knows a task cannot
        have started (no node can run it), gives those tasks back. Only used when
        :meth:`can_withdraw` is true; must be cheap for tasks it cannot take back.
        """
        return [False] * len(tokens)

    def lends_while_waiting(self) -> bool:
        """Whether this process runs inside one of the engine's own tasks, where a wait
        made through the engine (:meth:`wait_any`) lends the task's resources to the
        tasks it waits for. A Ray task that waits for its own Ray tasks on a Python lock
        keeps its CPU, and with every CPU held by such tasks nothing else can start."""
        return False

    def wait_any(self, tokens: List[Any], timeout: float) -> List[Any]:
        """Wait in the engine until one of ``tokens``' tasks has ended, or ``timeout``
        seconds; return the tokens whose tasks have. Used only where
        :meth:`lends_while_waiting` is true."""
        raise NotImplementedError

    def prepare(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        """Adjust a task's arguments at ``submit`` time, in the caller's thread."""
        return args, kwargs

    def check_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        """Validate per-call options given to ``with_options``; return them cleaned."""
        if options:
            raise ValueError(f"this backend takes no per-task options; got {sorted(options)}")
        return {}


class _FutureCondition(threading.Condition):
    """The condition of one future: ``threading.Condition`` over a new ``RLock``, as
    ``Future`` makes it, without the five bound methods that ``Condition.__init__``
    copies onto every instance. A future per task makes those objects count: five of
    the thirty or so that a trivial task keeps alive while it runs, and each one brings
    Python's garbage collector closer to its next pass."""

    def __init__(self) -> None:  # what Condition.__init__ does, less the copies
        self._lock = threading.RLock()
        self._waiters: Deque[Any] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    # What Condition.wait needs of an RLock, which the base class would copy per instance.
    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]


#: Whether ``Future.__init__`` sets exactly the fields that ``TaskFuture.__init__`` sets,
#: and ``Condition.__init__`` those that ``_FutureCondition`` stands in for (Pythons 3.6 to
#: 3.13 do); if not, a TaskFuture is built the standard way.
_KNOWN_FUTURE_FIELDS = set(vars(Future())) == {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"} and set(
    vars(threading.Condition())
) == {"_lock", "acquire", "release", "_release_save", "_acquire_restore", "_is_owned", "_waiters"}


class TaskFuture(Future):
    """A ``Future`` that tells waiters of a cancellation at once, and that the executor
    can report as cancelled while it is running.

    ``concurrent.futures`` only lets a future be cancelled before it runs, and tells
    ``wait``/``as_completed`` of it only when an executor later takes it from its queue.
    Here a future cancelled in the queue counts as done for them at once. Under the
    ``RUNNING`` policy a task's work is really stopped, and its future must then say so.
    And a task handed to an engine that can still give it back (it waits in the engine's
    own queue, or no node can run it) says ``running()``: ``cancel()`` then asks the
    engine to take it back.
    """

    _executor: Optional["ParallelExecutor"] = None
    _task: Optional["_Task"] = None
    #: The executor to wait through, where waiting must go through the engine.
    _lender: Optional["ParallelExecutor"] = None

    def __init__(self) -> None:
        if not _KNOWN_FUTURE_FIELDS:  # a Python whose Future has fields not set here
            super().__init__()
            return
        # Future.__init__ (the same in every Python from 3.6 to 3.13), with the lean condition.
        self._condition = _FutureCondition()
        self._state = PENDING
        self._result = None
        self._exception = None
        self._waiters: List[Any] = []
        self._done_callbacks: List[Any] = []

    def cancel(self) -> bool:
        if super().cancel():
            self._notify_cancelled()
            return True
        executor, task = self._executor, self._task
        if executor is None or task is None or self.done():
            return False
        return bool(executor._withdraw_tasks([task]))

    def result(self, timeout: Optional[float] = None) -> Any:
        if self._lender is not None and self._state in (PENDING, RUNNING):
            timeout = self._lender._wait_for_future(self, timeout)
        return super().result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if self._lender is not None and self._state in (PENDING, RUNNING):
            timeout = self._lender._wait_for_future(self, timeout)
        return super().exception(timeout)

    def _notify_cancelled(self) -> None:
        with self._condition:
            if self._state != CANCELLED:
                return
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)

    def _start_running(self) -> bool:
        """PENDING to RUNNING, the one door between them; False if it was cancelled."""
        with self._condition:
            if self._state == PENDING:
                self._state = RUNNING
                return True
        self._notify_cancelled()
        return False

    def _cancel_running(self) -> bool:
        with self._condition:
            if self._state in (FINISHED, CANCELLED_AND_NOTIFIED):
                return False
            self._state = CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()  # type: ignore[attr-defined]
        return True


class _Task:
    # ``generation`` counts hand-overs: a report from an earlier one (a task taken back
    # and handed over again) is ignored. ``stop_pending`` marks a task the RUNNING policy
    # stopped while the engine had not yet said what its token is.
    __slots__ = ("future", "fn", "args", "kwargs", "options", "token", "generation", "stop_pending")

    def __init__(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Mapping[str, Any]):
        self.future: TaskFuture = TaskFuture()
        self.fn: Any = fn
        self.args: Any = args
        self.kwargs: Any = kwargs
        self.options = options
        self.token: Any = None
        self.generation = 0
        self.stop_pending = False

    def release(self) -> None:
        """Drop what the task holds once it is over: its callable, its arguments, and
        the engine's handle (a Dask future kept alive keeps its result on a worker, and
        Dask would compute it again if that worker died)."""
        self.fn = self.args = self.kwargs = self.token = None
        self.future._executor = self.future._task = None
        if self.future._lender is not None:  # (only in a Ray task: see _wait_in_engine)
            self.future._lender = None


class _Report:
    """The callback a runner calls when one hand-over of one task ends: one small
    object per task (a ``functools.partial`` of a bound method is three)."""

    __slots__ = ("executor", "task", "generation")

    def __init__(self, executor: "ParallelExecutor", task: _Task, generation: int) -> None:
        self.executor = executor
        self.task = task
        self.generation = generation

    def __call__(self, ok: bool, value: Any) -> None:
        self.executor._finish(self.task, self.generation, ok, value)


class _Chunk:
    """Items of one ``map`` task, sent as one opaque object.

    An engine that looks into a task's arguments for handles of its own (Dask walks
    every list and tuple) would otherwise walk each item of a large chunk. ``star``
    says whether each item is a tuple of arguments (``map`` over several iterables) or
    the one argument itself (one iterable: no tuple per item).
    """

    __slots__ = ("items", "star")

    def __init__(self, items: List[Any], star: bool) -> None:
        self.items = items
        self.star = star

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return _Chunk, (self.items, self.star)

    def __len__(self) -> int:
        return len(self.items)


class NamedAfter:
    """``helper(fn, *args, **kwargs)`` as a task named after ``fn``.

    Engines name a task after its callable: in their messages and ours ("the worker
    running task ... died"), in Dask's keys and in Ray's dashboard. The user knows
    ``fn``, not the helper of ours that runs it over a chunk of a ``map``.
    """

    __slots__ = ("helper", "fn")

    def __init__(self, helper: Callable[..., Any], fn: Callable[..., Any]) -> None:
        self.helper = helper
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.helper(self.fn, *args, **kwargs)

    @property
    def __name__(self) -> str:  # type: ignore[override]
        return str(getattr(self.fn, "__name__", "task"))

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self.fn


def _run_chunk(fn: Callable[..., Any], chunk: _Chunk) -> Tuple[List[Any], Optional[BaseException]]:
    """Run ``fn`` over a chunk, stopping at the first exception: the results before it,
    and the exception (``None`` if there was none), which ``map`` raises at its item."""
    results: List[Any] = []
    append = results.append
    try:
        if chunk.star:
            for args in chunk.items:
                append(fn(*args))
        else:
            for item in chunk.items:
                append(fn(item))
    except Exception as exc:  # reported at its own item by map()
        return results, exc
    return results, None


#: Executors not yet shut down. At interpreter exit each is shut down with its own
#: policy (``NONE`` waits for every task), as ``concurrent.futures`` does with its pools.
_open_executors: "weakref.WeakSet[ParallelExecutor]" = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def _shut_down_open_executors() -> None:
    for executor in list(_open_executors):
        try:
            executor.shutdown(wait=True)
        except Exception:  # pragma: no cover - one failing executor must not spare the others
            logger.exception("could not shut down an executor at exit")


def _register_exit_hook(again: bool = False) -> None:
    """Have open executors shut down at exit, before the engines stop.

    threading runs its exit hooks last registered, first run. An engine that registers
    its own hook after ours (loky does when its first pool starts) calls this with
    ``again=True`` once it has, so that ours runs first and tasks still queued here can
    still go to the engine; the second run of the hook finds nothing left to do.
    """
    global _exit_hook_registered
    with _exit_hook_lock:
        if _exit_hook_registered and not again:
            return
        _exit_hook_registered = True
    # threading's hooks run before atexit's, so before Ray and Dask stop their own
    # runtimes at exit: pending tasks can still run. concurrent.futures does the same.
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError
        register(_shut_down_open_executors)
    except RuntimeError:  # pragma: no cover - an interpreter already shutting down
        import atexit

        atexit.register(_shut_down_open_executors)


class ParallelExecutor(Executor):
    """A ``concurrent.futures.Executor`` over any engine; see the module docstring.

    Parameters
    ----------
    runner
        The engine's side of the work.
    max_workers
        At most this many tasks run at once.
    cancel_futures
        The policy that ``shutdown()`` (and leaving a ``with`` block) applies.
    wait_timeout
        Seconds between checks while ``shutdown`` waits, so that it stays interruptible.
    threads_per_task
        Cap on the BLAS/OpenMP threads of each task (``None``: no cap); see ``in_task``.
    log_level
        What tasks log at this level or above reaches this process's loggers
        (``None``: nothing is captured).
    progress
        Whether ``map`` shows a progress bar unless told otherwise.
    engine_sized
        ``max_workers`` only says how large the engine is now, not a bound of the
        caller's (no ``max_workers`` and no ``n_cpus`` were given): the engine's own
        size is the bound, also when it grows (a cluster joined by ``address`` that
        gains workers). Under a policy that never cancels pending tasks the executor
        then hands the engine every task at once, as the engine's own ``submit`` does,
        instead of waiting for one task to end before handing over the next, if the
        engine can take back what it has not started (:meth:`TaskRunner.can_withdraw`).
    """

    def __init__(
        self,
        runner: TaskRunner,
        max_workers: int,
        cancel_futures: PolicyLike = CancellationPolicy.PENDING,
        wait_timeout: float = 1.0,
        *,
        threads_per_task: Optional[int] = None,
        log_level: Optional[int] = None,
        progress: bool = False,
        engine_sized: bool = False,
    ) -> None:
        require_integer("max_workers", max_workers, minimum=1)
        require_integer("threads_per_task", threads_per_task, minimum=1, none="None")
        self._runner = runner
        self._threads_per_task = threads_per_task
        self._log_level = log_level
        self._wraps_tasks = threads_per_task is not None or log_level is not None
        self._origin_pid = os.getpid()
        self._progress = progress
        self._max_workers = max_workers
        self._policy = as_policy(cancel_futures)
        self._wait_timeout = wait_timeout
        if runner.keeps_own_queue(max_workers) or (
            (runner.enforces_bound(max_workers) or (engine_sized and runner.can_withdraw(max_workers)))
            and CancellationPolicy.PENDING not in self._policy
        ):
            # Nothing to hold back: the engine queues what it cannot run yet, and
            # either can take it back (its own queue) or the policy never cancels
            # pending tasks. shutdown(cancel_futures=PENDING) then cancels only what
            # the engine gives back; see _apply.
            self._limit: float = math.inf
        else:
            self._limit = max_workers * (2 if runner.enforces_bound(max_workers) else 1)
        runner.expect_in_flight(self._limit)
        self._prepares = type(runner).prepare is not TaskRunner.prepare  # (the base one does nothing)
        self._can_withdraw = runner.can_withdraw(max_workers)
        self._lends = runner.lends_while_waiting()
        # One lock guards the queue, the in-flight set and the shutdown flags. It is
        # never held while calling into the engine or completing a future.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: Deque[_Task] = deque()
        self._in_flight: Set[_Task] = set()
        self._shutting_down = False
        self._closed = False
        self._deferred_close = False
        self._broken: Optional[BaseException] = None
        self._settling = 0
        _register_exit_hook()
        _open_executors.add(self)

    @property
    def max_workers(self) -> int:
        """The most tasks that run at once."""
        return self._max_workers

    @property
    def cancel_futures(self) -> CancellationPolicy:
        """The policy applied on shutdown when none is given."""
        return self._policy

    @property
    def threads_per_task(self) -> Optional[int]:
        """The cap on each task's BLAS/OpenMP threads (``None``: none)."""
        return self._threads_per_task

    # -- submitting ---------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` and return its future."""
        return self._submit(fn, args, kwargs, {})

    def with_options(self, **options: Any) -> "_OptionsView":
        """Submit through this executor with per-task engine options.

        For example ``executor.with_options(num_gpus=1).submit(train, data)`` on Ray, or
        ``executor.with_options(resources={"GPU": 1})`` on Dask. The options override the
        backend's ``task`` config for these calls only.
        """
        return _OptionsView(self, self._runner.check_options(options))

    def _check_accepting(self) -> None:
        if self._broken is not None:
            raise type(self._broken)(*self._broken.args)
        if self._shutting_down:
            raise RuntimeError("cannot submit after shutdown")

    def _submit(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Mapping[str, Any]) -> Future:
        if not callable(fn):
            raise TypeError(f"submit needs a callable; got {fn!r}")
        self._check_accepting()  # checked again under the lock; this spares prepare()
        if self._prepares:
            args, kwargs = self._runner.prepare(args, kwargs)
        if self._wraps_tasks:
            fn = InTask(fn, self._threads_per_task, self._log_level, self._origin_pid)
        task = _Task(fn, args, kwargs, options)
        if self._lends:
            task.future._lender = self
        with self._lock:
            self._check_accepting()
            self._queue.append(task)
            ready = self._take_ready() if len(self._in_flight) < self._limit else None
        if ready:
            self._hand_over(ready)
        return task.future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: Optional[int] = None,
        progress: Optional[bool] = None,
    ) -> Iterator[Any]:
        """Like the built-in ``map``, run in parallel; results come back in order.

        ``chunksize`` items go to a worker as one task, which makes tiny functions
        cheap. ``None`` (the default) cuts the items into about four chunks per worker;
        ``1`` makes one task per item. The first exception is raised at its item, and
        ``TimeoutError`` if results are not all in ``timeout`` seconds after the call.
        Tasks whose results are not read (the iterator is closed or dropped early, or
        raised) are cancelled. ``progress`` shows a bar of the items done as their
        tasks finish (``None``: the backend's ``progress`` setting).
        """
        require_integer("chunksize", chunksize, minimum=1, none="None")
        end = None if timeout is None else time.monotonic() + timeout
        # One iterable (the usual case): the items themselves, not a 1-tuple each.
        star = len(iterables) != 1
        items: List[Any] = list(zip(*iterables)) if star else list(iterables[0])
        bar = ProgressBar(len(items), getattr(fn, "__name__", None)) if (
            self._progress if progress is None else progress
        ) else None
        if chunksize is None:
            chunksize = max(1, math.ceil(len(items) / (4 * self._max_workers)))
        try:
            if chunksize == 1:
                futures = [self.submit(fn, *args) for args in items] if star else [self.submit(fn, item) for item in items]
                sizes: Iterable[int] = [1] * len(futures)
            else:
                chunks = [_Chunk(items[i : i + chunksize], star) for i in range(0, len(items), chunksize)]
                sizes = [len(chunk.items) for chunk in chunks]
                del items
                run = NamedAfter(_run_chunk, fn)
                futures = [self.submit(run, chunk) for chunk in chunks]
                del chunks  # each chunk is let go with its task
        except BaseException:
            if bar is not None:
                bar.close()
            raise
        if bar is not None:
            for future, size in zip(futures, sizes):
                bar.follow(future, size)
        return self._results(futures, end, chunked=chunksize != 1, bar=bar)

    def _results(
        self, futures: List[Future], end: Optional[float], chunked: bool, bar: Optional[ProgressBar] = None
    ) -> Iterator[Any]:
        # A generator of its own, so that map() submits everything before it returns.
        # Nothing here holds a result after handing it out.
        try:
            futures.reverse()
            while futures:
                remaining = None if end is None else max(0.0, end - time.monotonic())
                try:
                    futures[-1].result(remaining)
                except BaseException as exc:
                    if futures[-1].done():
                        pass  # the task's own error (a TimeoutError too): raised below, at its item
                    elif isinstance(exc, FuturesTimeoutError):
                        raise FuturesTimeoutError("map results not ready within the timeout") from None
                    else:
                        raise  # interrupted while waiting (Ctrl-C)
                if not chunked:
                    yield futures.pop().result()
                    continue
                results, error = futures.pop().result()
                results.reverse()
                while results:
                    yield results.pop()
                if error is not None:
                    raise error
        finally:
            self._cancel_many(futures)
            if bar is not None:
                bar.close()

    def _cancel_many(self, futures: List[Future]) -> None:
        """Cancel many futures at once: one engine call for all that it must take back."""
        in_flight = []
        for future in futures:
            if Future.cancel(future):
                if isinstance(future, TaskFuture):
                    future._notify_cancelled()
            elif isinstance(future, TaskFuture) and future._task is not None:
                in_flight.append(future._task)
        if in_flight and self._can_withdraw:
            self._withdraw_tasks(in_flight)

    # -- the engine side ----------------------------------------------------------

    def _take_ready(self) -> List[_Task]:
        """Move tasks from the queue to in flight while the limit allows. Lock held."""
        ready: List[_Task] = []
        if self._broken is not None:
            return ready
        while self._queue and len(self._in_flight) < self._limit:
            task = self._queue.popleft()
            if task.future._start_running():
                self._in_flight.add(task)
                ready.append(task)
                if self._can_withdraw:
                    task.future._executor, task.future._task = self, task
            else:
                task.release()
        return ready

    def _hand_over(self, tasks: List[_Task]) -> None:
        i = 0
        while i < len(tasks):  # grows when a refused task frees a slot: a loop, not recursion
            task = tasks[i]
            i += 1
            task.generation += 1
            generation = task.generation
            try:
                token = self._runner.start(
                    task.fn, task.args, task.kwargs, task.options, _Report(self, task, generation)
                )
            except Exception as exc:  # the engine refused the task: report it there
                tasks.extend(self._settle(task, generation, False, exc))
                continue
            with self._lock:
                if task in self._in_flight and task.generation == generation:
                    task.token = token
                stop_now, task.stop_pending = task.stop_pending, False
            if stop_now:
                self._runner.stop([token])

    def _finish(self, task: _Task, generation: int, ok: bool, value: Any) -> None:
        """The engine's completion callback for one hand-over of one task."""
        if self._log_level is not None:
            value, records = logs_of(ok, value)
            if records:  # logged before the result is seen, as if the task had run here
                replay(records)
        ready = self._settle(task, generation, ok, value)
        if ready:
            self._hand_over(ready)

    def _settle(self, task: _Task, generation: int, ok: bool, value: Any) -> List[_Task]:
        """Complete a task's future; return the tasks its freed slot lets go."""
        lost = not ok and isinstance(value, EngineLostError)
        with self._lock:
            if task not in self._in_flight or generation != task.generation:
                return []  # stopped, taken back, or an earlier hand-over: settled elsewhere
            self._in_flight.discard(task)
            # Counted until its future is complete, so that shutdown returns only then.
            self._settling += 1
            if lost and self._broken is None:
                self._broken = value
            ready = self._take_ready() if self._queue else []
        future = task.future
        task.release()
        try:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        except InvalidStateError:  # cancelled by its owner meanwhile; nothing to report
            pass
        del value, future
        with self._lock:
            self._settling -= 1
            done = self._is_idle()
            if done:
                self._idle.notify_all()
        if lost:
            self._fail_all(self._broken)
        elif done and self._deferred_close:
            self._close_if_finished()
        return ready

    def _is_idle(self) -> bool:
        """No task queued, in flight, or being settled. Lock held."""
        return not self._queue and not self._in_flight and not self._settling

    def _idle_now(self) -> bool:
        with self._lock:
            return self._is_idle()

    def _wait_for_future(self, future: TaskFuture, timeout: Optional[float]) -> Optional[float]:
        """:meth:`_wait_in_engine` for one future (its own task, once handed over); the
        timeout left."""
        end = None if timeout is None else time.monotonic() + timeout
        self._wait_in_engine(future.done, end, future)
        return None if end is None else max(0.0, end - time.monotonic())

    def _wait_in_engine(self, finished: Callable[[], bool], end: Optional[float], future: Optional[TaskFuture] = None) -> None:
        """Wait until ``finished()`` (or ``end``, a ``time.monotonic()``) through the
        engine, where the runner lends this process's resources to the tasks it waits
        for there (:meth:`TaskRunner.lends_while_waiting`: a Ray task waiting for its
        own Ray tasks); elsewhere return at once, for the caller to wait as usual.

        The engine is asked about the tasks in flight (up to 64 at a time: any end
        will do), each only until it says that task ended: its future is settled a
        moment later, by the thread that hears of ends, and the caller's own wait takes
        only that moment.
        """
        if not self._lends:
            return
        ended: Set[Any] = set()
        while not finished():
            patience = 1.0 if end is None else min(1.0, end - time.monotonic())
            if patience <= 0:
                return
            with self._lock:
                task = None if future is None else future._task
                watched = [task] if task is not None and task in self._in_flight else list(self._in_flight)
                tokens = [t.token for t in watched if t.token is not None and t.token not in ended][:64]
            if not tokens:  # they ended and are being settled, or none was handed over yet
                time.sleep(0.002)
                continue
            try:
                ended.update(self._runner.wait_any(tokens, patience))
            except Exception as exc:  # the engine is going away: its ends are reported as ever
                logger.debug("waiting through the engine failed (%r); waiting here instead", exc)
                return

    def _fail_all(self, error: Optional[BaseException]) -> None:
        """The engine is gone: every task not yet settled fails with ``error``."""
        with self._lock:
            lost = list(self._queue) + list(self._in_flight)
            self._queue.clear()
            self._in_flight.clear()
            self._idle.notify_all()
        if lost:
            logger.error("%s; %d unfinished task(s) of the executor fail with it", error, len(lost))
        for task in lost:
            future = task.future
            task.release()
            try:
                future.set_exception(error)
            except InvalidStateError:
                pass
        self._close_if_finished()

    # -- shutting down ------------------------------------------------------------

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc_value: Any, traceback: Any) -> None:
        """Shut down with the executor's policy; on an exception, see the README's rule.

        ``KeyboardInterrupt`` (Ctrl-C) stops everything (``ALL``): nobody will read the
        results, and a user who pressed Ctrl-C wants the prompt back. Any other exception
        applies the executor's policy, and says what it waits for.
        """
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._shut_down(CancellationPolicy.ALL, True, leaving_on=exc_type.__name__)
            return
        if exc_type is None:
            self.shutdown(wait=True)
        else:
            self._shut_down(self._policy, True, leaving_on=exc_type.__name__)

    def shutdown(self, wait: bool = True, *, cancel_futures: Optional[PolicyLike] = None) -> None:
        """Stop accepting tasks, apply a cancellation policy, and release the engine.

        Parameters
        ----------
        wait
            Block until every task that was not cancelled has ended and the engine's
            resources are released. A ``KeyboardInterrupt`` while waiting stops every
            task (``ALL``) before it propagates.
        cancel_futures
            A :class:`CancellationPolicy` (or its name, or a bool as in
            ``concurrent.futures``: ``True`` is ``PENDING``). ``None`` applies the
            executor's own policy.
        """
        self._shut_down(self._policy if cancel_futures is None else as_policy(cancel_futures), wait)

    def _shut_down(self, policy: CancellationPolicy, wait: bool, leaving_on: Optional[str] = None) -> None:
        """:meth:`shutdown`; ``leaving_on``: the name of the exception that leaves a
        ``with`` block, for the warning that says what was stopped and cancelled (on
        Ctrl-C) or what the policy still waits for (once it has cancelled what it
        cancels: what the engine gave back is not waited for)."""
        _open_executors.discard(self)
        stopped, cancelled = self._apply(policy)
        if leaving_on == KeyboardInterrupt.__name__:
            if stopped or cancelled:
                logger.warning(
                    "interrupted: stopped %d running task(s) and cancelled %d that had not started (policy %s)",
                    stopped,
                    cancelled,
                    policy.name,
                )
        elif leaving_on is not None and wait:
            with self._lock:
                waits_for = len(self._in_flight) + len(self._queue)
            if waits_for:
                logger.warning(
                    "leaving the executor on %s: policy %s waits for %d task(s) to finish "
                    "(Ctrl-C stops them; cancel_futures=ALL would not wait)",
                    leaving_on,
                    policy.name,
                    waits_for,
                )
        if wait:
            try:
                self._wait_in_engine(self._idle_now, None)
                with self._lock:
                    while not self._is_idle():
                        self._idle.wait(self._wait_timeout)
            except KeyboardInterrupt:
                if policy != CancellationPolicy.ALL:
                    logger.warning("interrupted while waiting for tasks: stopping them (policy ALL)")
                    self._apply(CancellationPolicy.ALL)
                raise
            with self._lock:
                close_now = not self._closed
                self._closed = True
            if close_now:
                self._runner.close()
            return
        with self._lock:
            self._deferred_close = True
        self._close_if_finished()

    def _apply(self, policy: CancellationPolicy) -> Tuple[int, int]:
        """Stop accepting tasks and cancel what ``policy`` says; how many running tasks
        were stopped, and how many that had not started were cancelled."""
        dropped: List[_Task] = []
        with self._lock:
            self._shutting_down = True
            if CancellationPolicy.PENDING in policy:
                dropped = list(self._queue)
                self._queue.clear()
        for task in dropped:
            task.future.cancel()
            task.release()
        stopped, cancelled = 0, len(dropped)
        if CancellationPolicy.RUNNING in policy:  # also takes back what waits in the engine
            stopped, taken_back = self._stop_in_flight(keep_pending=CancellationPolicy.PENDING not in policy)
            cancelled += taken_back
        elif CancellationPolicy.PENDING in policy and self._can_withdraw:
            with self._lock:
                candidates = list(self._in_flight)
            cancelled += len(self._withdraw_tasks(candidates))
        self._close_if_finished()
        return stopped, cancelled

    def _close_if_finished(self) -> None:
        """After ``shutdown(wait=False)``: release the engine once no task is left."""
        with self._lock:
            close_now = self._deferred_close and not self._closed and self._is_idle()
            if close_now:
                self._closed = True
        if close_now:
            # Not in this thread: it may be the engine's callback thread, which close() joins.
            threading.Thread(target=self._runner.close, name="parallel_hydra-close", daemon=True).start()

    def _take_back(self, tasks: List[_Task]) -> List[_Task]:
        """Ask the engine to give back ``tasks`` (those no worker has); the ones it did.

        They leave the in-flight set; their futures are left as they are.
        """
        with self._lock:
            candidates = [task for task in tasks if task in self._in_flight and task.token is not None]
        if not candidates:
            return []
        taken_back = self._runner.withdraw([task.token for task in candidates])
        withdrawn = []
        with self._lock:
            for task, ok in zip(candidates, taken_back):
                if ok and task in self._in_flight:
                    self._in_flight.discard(task)
                    withdrawn.append(task)
            if self._is_idle():
                self._idle.notify_all()
        return withdrawn

    def _withdraw_tasks(self, tasks: List[_Task]) -> List[_Task]:
        """Cancel ``tasks`` where the engine gives them back; hand over what that frees."""
        withdrawn = self._take_back(tasks)
        for task in withdrawn:
            task.future._cancel_running()
            task.release()
        if withdrawn:
            with self._lock:
                ready = self._take_ready() if self._queue else []
            self._hand_over(ready)
            self._close_if_finished()
        return withdrawn

    def _stop_in_flight(self, keep_pending: bool) -> Tuple[int, int]:
        """Stop the tasks in flight; how many were running, and how many of those that
        had not started were cancelled (none where ``keep_pending``)."""
        # Tasks still waiting in the engine (its own queue, or no node can run them)
        # are pending, not running: take them back first, and (unless pending tasks are
        # cancelled too) hand them over again once the running ones are stopped.
        with self._lock:
            candidates = list(self._in_flight)
        spared = self._take_back(candidates) if self._can_withdraw else []
        cancelled = 0
        if not keep_pending:
            for task in spared:
                task.future._cancel_running()
                task.release()
            cancelled, spared = len(spared), []
        with self._lock:
            victims = list(self._in_flight)
            self._in_flight.clear()
            for task in victims:
                # A task whose start() has not returned yet is stopped when it does.
                task.stop_pending = task.token is None
        tokens = [task.token for task in victims if task.token is not None]
        unstarted: Set[int] = set()
        if tokens:
            logger.debug("stopping %d running task(s)", len(tokens))
            try:
                unstarted = {id(token) for token in self._runner.stop(tokens) or ()}
            except Exception:  # the futures below are cancelled all the same: no caller waits forever
                logger.exception("the engine failed to stop %d running task(s); they may run on", len(tokens))
        stopped = len(victims)
        if unstarted:  # pending after all: cancelled or kept as pending tasks are
            pending = [task for task in victims if id(task.token) in unstarted]
            victims = [task for task in victims if id(task.token) not in unstarted]
            stopped = len(victims)
            if keep_pending:
                spared.extend(pending)
            else:
                victims.extend(pending)
                cancelled += len(pending)
        for task in victims:
            task.future._cancel_running()
            if not task.stop_pending:
                task.release()
        with self._lock:
            spared = [task for task in spared if not task.future.done()]  # not cancelled meanwhile
            self._in_flight.update(spared)  # their futures already say running
            ready = spared + self._take_ready()
            if self._is_idle():
                self._idle.notify_all()
        self._hand_over(ready)
        return stopped, cancelled


class _OptionsView:
    """``executor.with_options(...)``: the same executor, with per-task options."""

    def __init__(self, executor: ParallelExecutor, options: Mapping[str, Any]):
        self._executor = executor
        self._options = options

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` with this view's options."""
        return self._executor._submit(fn, args, kwargs, self._options)
