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

An engine that keeps a queue of its own and gives its workers only a few tasks (loky)
is handed every task at once instead, with no limit; the ``PENDING`` policy then takes
back from its queue what no worker has been given (``TaskRunner.withdraw``).

A task in flight counts as running: its future says ``running()``, and the ``PENDING``
policy lets it finish (unless the engine can take it back unstarted). ``RUNNING`` asks
the engine to stop every task in flight and reports those futures as cancelled.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Executor, Future, InvalidStateError
from concurrent.futures import TimeoutError as FuturesTimeoutError
from concurrent.futures._base import CANCELLED_AND_NOTIFIED, FINISHED
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Mapping, Optional, Set, Tuple

from .policy import CancellationPolicy, PolicyLike, as_policy

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
    def stop(self, tokens: List[Any]) -> None:
        """Really stop the tasks behind ``tokens``, which the engine was handed.

        Marking them is not enough: the work must end (kill the worker, interrupt the
        task). The executor has already forgotten these tasks, so ``on_done`` calls
        that still arrive for them are ignored. Later ``start`` calls must still work.
        """

    def close(self) -> None:
        """Release what this runner holds. Called once, when no task is left."""

    def enforces_bound(self, max_workers: int) -> bool:
        """Whether the engine itself never runs more than ``max_workers`` of our tasks.

        If it does, the executor may hand it ``max_workers`` tasks ahead.
        """
        return False

    def keeps_own_queue(self, max_workers: int) -> bool:
        """Whether the engine queues tasks itself and gives its workers only a few.

        Such an engine (loky: a call queue of ``max_workers`` ahead of its workers) may be
        handed every task at once, which spares a round trip per task, as long as it can
        take back the ones no worker has yet: see :meth:`withdraw`.
        """
        return False

    def withdraw(self, tokens: List[Any]) -> List[bool]:
        """Take back tasks that no worker has been given; say which ones were.

        A withdrawn task never runs and its ``on_done`` is never called. Only used when
        :meth:`keeps_own_queue` is true.
        """
        return [False] * len(tokens)

    def prepare(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        """Adjust a task's arguments at ``submit`` time, in the caller's thread."""
        return args, kwargs

    def check_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        """Validate per-call options given to ``with_options``; return them cleaned."""
        if options:
            raise ValueError(f"this backend takes no per-task options; got {sorted(options)}")
        return {}


class TaskFuture(Future):
    """A ``Future`` that the executor can report as cancelled while it is running.

    ``concurrent.futures`` only lets a future be cancelled before it runs. Under the
    ``RUNNING`` policy, a task's work is really stopped, and its future must then say so.
    And a task handed to an engine that keeps its own queue says ``running()`` while it
    may still wait there: ``cancel()`` then asks the engine to take it back.
    """

    _withdraw: Optional[Callable[[], bool]] = None

    def cancel(self) -> bool:
        if super().cancel():
            return True
        withdraw = self._withdraw
        return withdraw is not None and not self.done() and withdraw() and self._cancel_running()

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
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.options = options
        self.token: Any = None
        self.generation = 0
        self.stop_pending = False


def _run_chunk(fn: Callable[..., Any], chunk: List[Tuple[Any, ...]]) -> List[Outcome]:
    """Run ``fn`` over a chunk of argument tuples, stopping at the first exception."""
    outcomes: List[Outcome] = []
    for args in chunk:
        try:
            outcomes.append((True, fn(*args)))
        except Exception as exc:  # reported at its own item by map()
            outcomes.append((False, exc))
            break
    return outcomes


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
    """

    def __init__(
        self,
        runner: TaskRunner,
        max_workers: int,
        cancel_futures: PolicyLike = CancellationPolicy.PENDING,
        wait_timeout: float = 1.0,
    ) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be an integer >= 1; got {max_workers!r}")
        self._runner = runner
        self._max_workers = max_workers
        self._policy = as_policy(cancel_futures)
        self._wait_timeout = wait_timeout
        if runner.keeps_own_queue(max_workers):
            self._limit: float = math.inf
        else:
            self._limit = max_workers * (2 if runner.enforces_bound(max_workers) else 1)
        # One lock guards the queue, the in-flight set and the shutdown flags. It is
        # never held while calling into the engine or completing a future.
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queue: Deque[_Task] = deque()
        self._in_flight: Set[_Task] = set()
        self._shutting_down = False
        self._closed = False

    @property
    def max_workers(self) -> int:
        """The most tasks that run at once."""
        return self._max_workers

    @property
    def cancel_futures(self) -> CancellationPolicy:
        """The policy applied on shutdown when none is given."""
        return self._policy

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

    def _submit(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Mapping[str, Any]) -> Future:
        if not callable(fn):
            raise TypeError(f"submit needs a callable; got {fn!r}")
        if self._shutting_down:  # checked again under the lock; this spares prepare()
            raise RuntimeError("cannot submit after shutdown")
        args, kwargs = self._runner.prepare(args, kwargs)
        task = _Task(fn, args, kwargs, options)
        with self._lock:
            if self._shutting_down:
                raise RuntimeError("cannot submit after shutdown")
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
    ) -> Iterator[Any]:
        """Like the built-in ``map``, run in parallel; results come back in order.

        ``chunksize`` items go to a worker as one task, which makes tiny functions
        cheap. ``None`` (the default) cuts the items into about four chunks per worker;
        ``1`` makes one task per item. The first exception is raised at its item, and
        ``TimeoutError`` if results are not all in ``timeout`` seconds after the call.
        """
        if chunksize is not None and (isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be an integer >= 1 or None; got {chunksize!r}")
        end = None if timeout is None else time.monotonic() + timeout
        items = list(zip(*iterables))
        if chunksize is None:
            chunksize = max(1, math.ceil(len(items) / (4 * self._max_workers)))
        if chunksize == 1:
            futures = [self.submit(fn, *args) for args in items]
            return self._results(futures, end, chunked=False)
        chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        futures = [self.submit(_run_chunk, fn, chunk) for chunk in chunks]
        return self._results(futures, end, chunked=True)

    @staticmethod
    def _results(futures: List[Future], end: Optional[float], chunked: bool) -> Iterator[Any]:
        # A generator of its own, so that map() submits everything before it returns.
        try:
            futures.reverse()
            while futures:
                remaining = None if end is None else max(0.0, end - time.monotonic())
                try:
                    value = futures[-1].result(remaining)
                except FuturesTimeoutError:
                    raise FuturesTimeoutError("map results not ready within the timeout") from None
                futures.pop()
                if not chunked:
                    yield value
                    continue
                for ok, item in value:
                    if not ok:
                        raise item
                    yield item
        finally:
            for future in futures:
                future.cancel()

    # -- the engine side ----------------------------------------------------------

    def _take_ready(self) -> List[_Task]:
        """Move tasks from the queue to in flight while the limit allows. Lock held."""
        ready: List[_Task] = []
        while self._queue and len(self._in_flight) < self._limit:
            task = self._queue.popleft()
            if task.future.set_running_or_notify_cancel():
                self._in_flight.add(task)
                ready.append(task)
                if self._limit == math.inf:
                    task.future._withdraw = functools.partial(self._withdraw_task, task)
        return ready

    def _hand_over(self, tasks: List[_Task]) -> None:
        work = deque(tasks)
        while work:
            task = work.popleft()
            task.generation += 1
            generation = task.generation
            try:
                token = self._runner.start(
                    task.fn, task.args, task.kwargs, task.options, functools.partial(self._finish, task, generation)
                )
            except Exception as exc:  # the engine refused the task: report it there
                work.extend(self._settle(task, generation, False, exc))  # a loop, not recursion
                continue
            with self._lock:
                task.token = token
                stop_now, task.stop_pending = task.stop_pending, False
            if stop_now:
                self._runner.stop([token])

    def _finish(self, task: _Task, generation: int, ok: bool, value: Any) -> None:
        """The engine's completion callback for one hand-over of one task."""
        ready = self._settle(task, generation, ok, value)
        if ready:
            self._hand_over(ready)

    def _settle(self, task: _Task, generation: int, ok: bool, value: Any) -> List[_Task]:
        """Complete a task's future; return the tasks its freed slot lets go."""
        with self._lock:
            if task not in self._in_flight or generation != task.generation:
                return []  # stopped, taken back, or an earlier hand-over: settled elsewhere
            self._in_flight.discard(task)
            ready = self._take_ready() if self._queue else []
            done = not self._queue and not self._in_flight
            if done:
                self._idle.notify_all()
        task.args = task.kwargs = None  # type: ignore[assignment]  # free memory early
        try:
            if ok:
                task.future.set_result(value)
            else:
                task.future.set_exception(value)
        except InvalidStateError:  # cancelled by its owner meanwhile; nothing to report
            pass
        if done and self._deferred_close:
            self._close_if_finished()
        return ready

    _deferred_close = False

    # -- shutting down ------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: Optional[PolicyLike] = None) -> None:
        """Stop accepting tasks, apply a cancellation policy, and release the engine.

        Parameters
        ----------
        wait
            Block until every task that was not cancelled has ended and the engine's
            resources are released.
        cancel_futures
            A :class:`CancellationPolicy` (or its name, or a bool as in
            ``concurrent.futures``: ``True`` is ``PENDING``). ``None`` applies the
            executor's own policy.
        """
        policy = self._policy if cancel_futures is None else as_policy(cancel_futures)
        dropped: List[_Task] = []
        with self._lock:
            self._shutting_down = True
            if CancellationPolicy.PENDING in policy:
                dropped = list(self._queue)
                self._queue.clear()
        for task in dropped:
            task.future.cancel()
        if CancellationPolicy.RUNNING in policy:  # also takes back what waits in the engine
            self._stop_in_flight(keep_pending=CancellationPolicy.PENDING not in policy)
        elif CancellationPolicy.PENDING in policy and self._limit == math.inf:
            self._withdraw_queued_in_engine()
        if wait:
            with self._lock:
                while self._queue or self._in_flight:
                    self._idle.wait(self._wait_timeout)
                close_now = not self._closed
                self._closed = True
            if close_now:
                self._runner.close()
            return
        with self._lock:
            self._deferred_close = True
        self._close_if_finished()

    def _withdraw_task(self, task: _Task) -> bool:
        """Take one task back from the engine's queue (a user's ``future.cancel()``)."""
        with self._lock:
            if task not in self._in_flight:
                return False
        if not self._runner.withdraw([task.token])[0]:
            return False
        with self._lock:
            self._in_flight.discard(task)
            if not self._queue and not self._in_flight:
                self._idle.notify_all()
        self._close_if_finished()
        return True

    def _close_if_finished(self) -> None:
        """After ``shutdown(wait=False)``: release the engine once no task is left."""
        with self._lock:
            close_now = self._deferred_close and not self._closed and not self._queue and not self._in_flight
            if close_now:
                self._closed = True
        if close_now:
            # Not in this thread: it may be the engine's callback thread, which close() joins.
            threading.Thread(target=self._runner.close, name="parallel_hydra-close", daemon=True).start()

    def _take_back_from_engine(self) -> List[_Task]:
        """Withdraw from the engine's own queue the tasks no worker has been given."""
        with self._lock:
            candidates = list(self._in_flight)
        taken_back = self._runner.withdraw([task.token for task in candidates])
        withdrawn = []
        with self._lock:
            for task, ok in zip(candidates, taken_back):
                if ok and task in self._in_flight:
                    self._in_flight.discard(task)
                    withdrawn.append(task)
            if not self._queue and not self._in_flight:
                self._idle.notify_all()
        return withdrawn

    def _withdraw_queued_in_engine(self) -> None:
        for task in self._take_back_from_engine():
            task.future._cancel_running()
        self._close_if_finished()

    def _stop_in_flight(self, keep_pending: bool) -> None:
        # Tasks still waiting in the engine's own queue are pending, not running: take
        # them back first, and (unless pending tasks are cancelled too) hand them over
        # again once the running ones are stopped.
        spared = self._take_back_from_engine() if self._limit == math.inf else []
        if not keep_pending:
            for task in spared:
                task.future._cancel_running()
            spared = []
        with self._lock:
            victims = list(self._in_flight)
            self._in_flight.clear()
            for task in victims:
                # A task whose start() has not returned yet is stopped when it does.
                task.stop_pending = task.token is None
        tokens = [task.token for task in victims if task.token is not None]
        if tokens:
            logger.debug("stopping %d running task(s)", len(tokens))
            try:
                self._runner.stop(tokens)
            except Exception:  # the futures below are cancelled all the same: no caller waits forever
                logger.exception("the engine failed to stop %d running task(s); they may run on", len(tokens))
        for task in victims:
            task.future._cancel_running()
        with self._lock:
            spared = [task for task in spared if not task.future.done()]  # not cancelled meanwhile
            self._in_flight.update(spared)  # their futures already say running
            ready = spared + self._take_ready()
            if not self._queue and not self._in_flight:
                self._idle.notify_all()
        self._hand_over(ready)


class _OptionsView:
    """``executor.with_options(...)``: the same executor, with per-task options."""

    def __init__(self, executor: ParallelExecutor, options: Mapping[str, Any]):
        self._executor = executor
        self._options = options

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Schedule ``fn(*args, **kwargs)`` with this view's options."""
        return self._executor._submit(fn, args, kwargs, self._options)
