"""The engine side of a Dask executor: how tasks become Dask futures, and how their
outcomes come back.

:class:`_DaskRunner` submits each task of an executor with ``pure=False``
(:func:`_submit`; through :func:`_run_logged` on a cluster of worker processes that the
backend started), awaits its outcome on the client's event loop (:func:`_watch`), and
reports it from the backend's dispatch thread. On the way it turns Dask's failures
into this package's: a worker that died (``KilledWorker``) into
:class:`~parallel_hydra.errors.WorkerCrashedError`, or a new submission of a task that
had not started there; a lost scheduler into
:class:`~parallel_hydra.errors.EngineLostError`; an argument or a result that cannot
be pickled into a ``pickle.PicklingError`` naming it.

Stopping and withdrawing tasks is left to the backend's :class:`~.workers.Workers`.
The functions and classes that run on (or travel to) workers are pickled by reference,
so they stay module-level here.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

from ...config import DaskTaskOptions
from ...errors import NeighborCrashedError, WorkerCrashedError
from ...executor import DoneCallback, TaskRunner
from ...start_log import StartLog, claim_run, has_claim, note_start, release_run
from distributed.diagnostics.plugin import WorkerPlugin

from . import distributed
from ...sendable import unpicklable_part
from .claims import SchedulerClaims, run_claimed
from .workers import _how_it_died

if TYPE_CHECKING:
    from .backend import DaskParallelBackend

# The package's logger: records keep the name ``parallel_hydra.backends.dask``.
logger = logging.getLogger(__package__)

#: Keys that ``executor.with_options``, ``wrap`` and ``config.task`` accept.
_OPTION_KEYS = ("resources", "retries", "priority")
#: Keyword arguments that ``Client.submit`` keeps for itself; a task's own keyword
#: arguments of these names are routed around it (see :func:`_apply`).
_SUBMIT_KEYWORDS = frozenset(
    {"func", "key", "workers", "resources", "retries", "priority", "fifo_timeout", "allow_other_workers", "actor", "actors", "pure"}
)
#: Times a task is submitted again because a worker it was given (but had not started
#: on) died, or was killed to stop other tasks.
_MAX_RESUBMITS = 3


# -- options and submitting ---------------------------------------------------------


def _merge_options(base: DaskTaskOptions, overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate per-call options over the config's ``task`` options; return submit kwargs.

    Raises ``ValueError`` naming an unknown key and the allowed ones, or a bad value.
    """
    unknown = sorted(set(overrides) - set(_OPTION_KEYS))
    if unknown:
        raise ValueError(
            f"unknown Dask task option {unknown[0]!r}; allowed options: {', '.join(_OPTION_KEYS)}"
        )
    values = {key: getattr(base, key) for key in _OPTION_KEYS}
    values.update(overrides)
    checked = DaskTaskOptions(**values)  # validates, with messages naming the field
    return {key: getattr(checked, key) for key in _OPTION_KEYS}


def _apply(fn: Callable[..., Any], args: List[Any], kwargs: Dict[str, Any]) -> Any:
    """Call ``fn(*args, **kwargs)`` on a worker.

    Used only when a task's keyword arguments clash with ``Client.submit``'s own
    (``func``, ``key``, ``priority``...), which would otherwise be taken by Dask. Futures
    nested in ``args`` and ``kwargs`` are still replaced by their values by Dask.
    """
    return fn(*args, **kwargs)


def _submit(client: Any, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Mapping[str, Any]) -> Any:
    """``client.submit`` with ``pure=False``, safe for any keyword names of ``fn``."""
    if kwargs and not _SUBMIT_KEYWORDS.isdisjoint(kwargs):
        return client.submit(_apply, fn, list(args), dict(kwargs), pure=False, **options)
    return client.submit(fn, *args, pure=False, **options, **kwargs)


def _name_of(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))


# -- results and arguments that travel pickled ----------------------------------------


class _PickledResult:
    """A task's result, pickled by the task itself (see :func:`_run_logged`)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return _PickledResult, (self.data,)


class _UnpicklableResult:
    """What a task returns when its result cannot be pickled: the reason, and the
    pickling error itself when that one can travel."""

    __slots__ = ("message", "cause")

    def __init__(self, message: str, cause: Optional[BaseException]) -> None:
        self.message = message
        self.cause = cause

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return _UnpicklableResult, (self.message, self.cause)


class QuietTaskFailures(WorkerPlugin):  # type: ignore[misc]
    """A Dask worker plugin: no "Compute Failed" ERROR block for our tasks' exceptions.

    A Dask worker logs every task that raises, with its traceback, before the exception
    travels back. Our executor raises that exception to the caller, at its item, so the
    worker's block only repeats it (on the console of a local cluster). Records of tasks
    that did not go through parallel_hydra's task wrapper are left alone.
    """

    name = "parallel_hydra-quiet-task-failures"

    def setup(self, worker: Any) -> None:
        log = logging.getLogger("distributed.worker")
        if not any(isinstance(f, _OurComputeFailures) for f in log.filters):
            log.addFilter(_OurComputeFailures())



class _OurComputeFailures(logging.Filter):
    """Drops the worker's "Compute Failed" records of tasks run by ``InTask``."""

    _MARK = os.path.join("parallel_hydra", "in_task.py")

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith("Compute Failed")):
            return True
        return not any(isinstance(arg, str) and self._MARK in arg for arg in record.args or ())


def _run_logged(folder: str, number: int, fn: Callable[..., Any], args: List[Any], kwargs: Dict[str, Any]) -> Any:
    """On a worker of a cluster this backend started: run one task of an executor.

    The task's start is recorded in the backend's start log (``folder``), so that if its
    process dies the backend knows which task it was running. Its arguments travel as
    plain arguments of this function, so Dask still replaces the futures among them,
    and any keyword name reaches ``fn``. The result is pickled here, while the task still
    counts as running: a result that cannot be pickled becomes that task's failure, and
    one whose pickling kills the worker is a crash of this task. Dask would otherwise
    pickle it only when the result is fetched, and compute it again after every such
    crash, without end. A task that has started is not run again when Dask computes it
    a second time because the worker holding its result died before the result was
    fetched (:func:`~parallel_hydra.start_log.claim_run`): it fails with
    ``NeighborCrashedError`` instead.
    """
    from distributed.protocol import pickle as dask_pickle

    # The start is noted before the claim is made: a process that dies between the two
    # is seen to have started the task, which is then not submitted again (and so never
    # refused for a run that did not happen).
    note_start(folder, number)
    if not claim_run(folder, number):
        raise NeighborCrashedError(
            f"task {_name_of(fn)} had already started on a Dask worker whose process died (or left) before "
            f"the result was fetched; Dask ran it again, and it is not run a second time: it may have had effects"
        )
    try:
        result = fn(*args, **kwargs)
    except Exception:
        # It failed, and its worker lives on: Dask's own retries may run it again.
        # (SystemExit and the like end the worker: the claim stays.)
        release_run(folder, number)
        raise
    try:
        return _PickledResult(dask_pickle.dumps(result))
    except Exception as exc:
        message = (
            f"the result of task {_name_of(fn)} (a {type(result).__name__}) could not be pickled "
            f"to be sent back: {type(exc).__name__}: {exc}"
        )
        try:
            pickle.dumps(exc)
            cause: Optional[BaseException] = exc
        except Exception:
            cause = None
        return _UnpicklableResult(message, cause)


def _dask_dumps(value: Any) -> bytes:
    from distributed.protocol import pickle as dask_pickle

    return dask_pickle.dumps(value)  # type: ignore[no-any-return]


# -- awaiting outcomes ----------------------------------------------------------------


#: Times a finished task's result is fetched before its fetch error is its outcome.
_GATHER_TRIES = 3


async def _watch(client: Any, future: Any, report: Callable[[Any, bool, Any], None], dispatch: ThreadPoolExecutor) -> None:
    """On the client's event loop: wait for ``future``, fetch its outcome, report it.

    Fetching on the loop saves the thread round trip of ``Future.add_done_callback``
    followed by a blocking ``result()``. ``gather`` raises the task's own exception type
    (or ``CancelledError`` once the future is cancelled). ``report(key, ok, value)``
    runs on the backend's dispatch thread, never on the loop: it may submit the next
    task, and it completes a user-visible future whose callbacks may block. The future
    itself is not kept: once its outcome is in, nothing holds the task's result on a
    worker (where Dask would compute it again, were that worker lost).
    """
    key = future.key
    outcome: Tuple[bool, Any] = (False, None)
    for _ in range(_GATHER_TRIES):
        try:
            outcome = (True, await client.gather(future, asynchronous=True))
            break
        except BaseException as exc:  # the task's exception, a cancellation, a lost worker
            outcome = (False, exc)
            # The client joins gathers that overlap into one request, and a result that
            # cannot be sent (it does not pickle) fails every task of that request. A task
            # whose own future says finished did not fail: fetch its result again.
            if getattr(future, "status", None) != "finished":
                break
    del future
    try:
        dispatch.submit(report, key, *outcome)
    except RuntimeError:  # the backend is shutting down: report from here instead
        threading.Thread(target=report, args=(key, *outcome), daemon=True).start()


# -- the runner -------------------------------------------------------------------------


class _DaskTask:
    """The token of one task of an executor: what to run, and its current Dask future."""

    __slots__ = ("fn", "args", "kwargs", "options", "on_done", "number", "future", "key", "resubmits", "withdrawn", "stopped", "held")

    def __init__(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Dict[str, Any], on_done: DoneCallback) -> None:
        self.fn: Any = fn
        self.args: Any = args
        self.kwargs: Any = kwargs
        self.options = options
        self.on_done: Any = on_done
        self.number = 0  # in the start log; 0 where none is kept
        self.future: Any = None
        self.key: Any = None
        self.resubmits = 0
        self.withdrawn = False
        self.stopped = False
        self.held: Optional[Tuple[Any, bool, Any]] = None  # an outcome that came in while withdrawing

    def release(self) -> None:
        self.fn = self.args = self.kwargs = self.on_done = self.future = None


class _DaskRunner(TaskRunner):
    """Runs one executor's tasks as Dask futures of the backend's client.

    On a cluster of worker processes that the backend started, each task goes out
    through :func:`_run_logged`, which records its start in the backend's start log.
    The cluster's scheduler fails the tasks a dead worker held at once (no
    ``allowed-failures`` retries, see ``start_local_cluster``); the task that was running in
    the dead process fails with :class:`WorkerCrashedError`, the others it held (given
    to it but not started), and the tasks of a worker killed to stop other tasks, are
    submitted again. On a cluster reached by ``address`` Dask's own
    ``distributed.scheduler.allowed-failures`` applies, and its ``KilledWorker`` becomes
    a ``WorkerCrashedError``.
    """

    def __init__(self, backend: "DaskParallelBackend") -> None:
        self._backend = backend
        self._client = backend.client
        self._workers = backend._workers
        self._log: Optional[StartLog] = backend._start_log
        self._claims: Optional[SchedulerClaims] = backend._claims
        self._base: Dict[str, Any] = _merge_options(backend.config.task, {})
        self._lock = threading.Lock()

    def enforces_bound(self, max_workers: int) -> bool:
        # Only a cluster of fixed size that we started (an external cluster may grow),
        # judged by its full size: some of its workers may be restarting just now.
        layout = self._backend._layout
        return self._backend.owns_cluster and layout is not None and layout[0] * layout[1] <= max_workers

    def keeps_own_queue(self, max_workers: int) -> bool:
        # The scheduler queues tasks itself (worker-saturation) and gives each worker
        # about one task beyond its threads, so on a cluster that enforces the bound the
        # executor can hand it everything, and take back queued tasks (withdraw).
        import dask

        saturation = dask.config.get("distributed.scheduler.worker-saturation", 1.1)
        try:
            finite = float(saturation) < float("inf")
        except (TypeError, ValueError):
            finite = False
        return finite and self.enforces_bound(max_workers)

    def can_withdraw(self, max_workers: int) -> bool:
        # Taking tasks back runs our code on the scheduler (Workers.withdraw): on a
        # cluster the backend started, or on one whose scheduler took the run-claims
        # plugin, and so imports parallel_hydra.
        return self.keeps_own_queue(max_workers) or self._claims is not None

    def check_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        _merge_options(self._backend.config.task, options)
        return dict(options)

    def _options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        return _merge_options(self._backend.config.task, options) if options else self._base

    def start(
        self,
        fn: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        options: Mapping[str, Any],
        on_done: DoneCallback,
    ) -> Any:
        self._backend._check_engine()
        task = _DaskTask(fn, args, kwargs, self._options(options), on_done)
        if self._log is not None:
            task.number = self._log.call(fn, (), {}).number
        self._submit(task)
        return task

    def _submit(self, task: _DaskTask) -> None:
        """Submit ``task`` (again); raises what ``Client.submit`` raises, made clearer."""
        client = self._client
        try:
            if self._log is not None:
                future = client.submit(
                    _run_logged, self._log.folder, task.number, task.fn, list(task.args), dict(task.kwargs),
                    pure=False, **task.options,
                )
            elif self._claims is not None:
                future = client.submit(run_claimed, task.fn, list(task.args), dict(task.kwargs), pure=False, **task.options)
            else:
                future = _submit(client, task.fn, task.args, task.kwargs, task.options)
        except Exception as exc:
            if not self._backend._engine_alive():
                raise self._backend._engine_lost(exc) from exc
            failure = unpicklable_part(task.fn, task.args, task.kwargs, exc, _dask_dumps, "a Dask worker")
            if failure is not None:
                raise failure from exc
            raise
        with self._lock:
            task.future, task.key = future, future.key
        client.loop.add_callback(_watch, client, future, lambda key, ok, value: self._reported(task, key, ok, value), self._backend._dispatch)

    # -- outcomes -----------------------------------------------------------------

    def _reported(self, task: _DaskTask, key: Any, ok: bool, value: Any) -> None:
        """Dask's outcome of one submission of ``task``, on the dispatch thread."""
        with self._lock:
            if key != task.key or task.on_done is None or task.stopped:
                return  # an earlier submission, or a task already reported or stopped
            if task.withdrawn:
                # Being taken back: the scheduler's cancellation (ignored if it was) or an
                # outcome that withdraw() reports if the task could not be taken back.
                task.held = (key, ok, value)
                return
            task.future = None
        if ok:
            ok, value = self._unpack(task, value)
        else:
            value = self._translate(task, value)
            if value is None:  # submitted again
                return
        with self._lock:  # stop() may have let the task go meanwhile: its future is settled then
            on_done = task.on_done
            if on_done is None or task.stopped:
                return
            task.release()
        if self._log is not None:  # no claim left behind; a result's, once Dask has let the task go
            self._log.give_back(task.number, later=ok)
        on_done(ok, value)

    @staticmethod
    def _unpack(task: _DaskTask, value: Any) -> Tuple[bool, Any]:
        if isinstance(value, _PickledResult):
            try:
                return True, pickle.loads(value.data)
            except Exception as exc:
                return False, exc
        if isinstance(value, _UnpicklableResult):
            failure = pickle.PicklingError(value.message)
            failure.__cause__ = value.cause
            return False, failure
        return True, value

    def _translate(self, task: _DaskTask, error: BaseException) -> Optional[BaseException]:
        """The error the executor reports for a failed submission; None if it was
        submitted again instead."""
        backend = self._backend
        if isinstance(error, CancelledError) and (
            getattr(error, "reason", None) == "scheduler-connection-lost" or not backend._engine_alive()
        ):
            return backend._engine_lost(error)
        if isinstance(error, distributed.KilledWorker):
            return self._worker_died(task, error)
        if self._log is None and isinstance(error, TypeError) and str(error).startswith("Could not serialize object"):
            # Some Dask versions send a task's arguments after submit returned: the
            # error then arrives here, for an argument as for a result. Name which.
            fn, args, kwargs = task.fn, task.args, task.kwargs  # (None once stop() let go of them)
            if fn is not None and args is not None and kwargs is not None:
                named = unpicklable_part(fn, args, kwargs, error, _dask_dumps, "a Dask worker")
                if named is not None:
                    return named
            failure = pickle.PicklingError(
                f"the result of task {_name_of(task.fn)} could not be pickled to be sent back: {error}"
            )
            failure.__cause__ = error
            return failure
        return error

    def _worker_died(self, task: _DaskTask, error: BaseException) -> Optional[BaseException]:
        name = _name_of(task.fn)
        worker = getattr(error, "last_worker", None)
        address = getattr(worker, "address", "?")
        pid = getattr(worker, "pid", None)
        if self._log is None:
            crash = WorkerCrashedError(
                f"the Dask worker {address} running task {name} died (Dask's own retries, "
                f"distributed.scheduler.allowed-failures, did not help): {error}"
            )
            crash.__cause__ = error
            return crash
        killed_on_purpose = self._workers.killed_on_purpose(pid)
        # Lately, not only last: a task that finished there just before the process
        # died, its result not yet safe, ran once and must not run again.
        started_there = pid is not None and task.number in self._log.recently_started_by(pid)
        if not started_there and task.resubmits < _MAX_RESUBMITS:
            task.resubmits += 1
            logger.debug("Dask: task %s was on worker %s (pid %s), which died; submitting it again", name, address, pid)
            try:
                if not task.stopped and not task.withdrawn:
                    self._submit(task)
                return None
            except Exception as exc:
                return exc
        running_there = pid is not None and task.number in self._log.started_by(pid)
        if started_there and (killed_on_purpose or not running_there):
            if running_there:
                what = f"was running in the Dask worker process (pid {pid}, {address}) that was killed to stop cancelled tasks"
            else:
                what = (
                    f"had finished in the Dask worker process (pid {pid}, {address}), but its result was lost when "
                    f"that process died running another task ({_how_it_died(pid)})"
                )
            neighbor = NeighborCrashedError(f"task {name} {what}; it is not run again: it may have had effects")
            neighbor.__cause__ = error
            return neighbor
        if started_there:
            message = f"the Dask worker process (pid {pid}, {address}) running task {name} died ({_how_it_died(pid)})"
        else:
            message = f"task {name} was on Dask workers that died {task.resubmits + 1} times; last {address} (pid {pid})"
        crash = WorkerCrashedError(message)
        crash.__cause__ = error
        return crash

    # -- taking tasks back --------------------------------------------------------

    def withdraw(self, tokens: List[Any]) -> List[bool]:
        # A task that has claimed its run started (or finished, and Dask is computing it
        # again after its result was lost): not Dask's to give back as never started.
        log, claims = self._log, self._claims
        if log is not None:
            ran = {id(t) for t in tokens if t is not None and has_claim(log.folder, t.number)}
        elif claims is not None:
            held = claims.held(t.key for t in tokens if t is not None and t.future is not None)
            ran = {id(t) for t in tokens if t is not None and t.key in held}
        else:
            ran = set()
        with self._lock:
            asked = [
                t for t in tokens
                if t is not None and t.future is not None and not t.withdrawn and not t.stopped and id(t) not in ran
            ]
            # Marked before asking: the cancellation may reach the client before the answer.
            for t in asked:
                t.withdrawn = True
            futures = [t.future for t in asked]
        if not futures:
            return [False] * len(tokens)
        try:  # one scheduler call for the whole batch
            taken = set(self._workers.withdraw(futures))
        except Exception:
            taken = set()
        del futures
        late = []
        with self._lock:
            for t in asked:
                held, t.held = t.held, None
                if t.key in taken:
                    t.future = None
                    t.release()
                else:
                    t.withdrawn = False
                    if held is not None:
                        late.append((t, held))
        for t, held in late:  # its outcome came in while we asked: report it now
            self._reported(t, *held)
        chosen = set(map(id, asked))
        return [id(t) in chosen and t.withdrawn for t in tokens]

    def stop(self, tokens: List[Any]) -> None:
        with self._lock:
            futures = []
            for t in tokens:
                if t is None:
                    continue
                t.stopped = True
                if t.future is not None:
                    futures.append(t.future)
                t.release()
        self._workers.stop_tasks(futures)
        if self._log is not None:  # the tasks are over: their claims go too (the
            for t in tokens:  # scheduler's go when it forgets the tasks)
                if t is not None:
                    self._log.give_back(t.number)
