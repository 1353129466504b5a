"""The Dask backend: a ``LocalCluster`` it starts, or a Dask scheduler it connects to.

Without ``address`` the backend starts a ``distributed.LocalCluster`` on 127.0.0.1
(worker processes by default, so CPU-bound Python scales) and a ``Client`` on it, and
closes both at shutdown. With ``address`` it only connects a ``Client``; shutdown closes
that client and leaves the scheduler and its workers running.

Every task is submitted with ``pure=False``: Dask's own ``Client.get_executor()``
submits with ``pure=True``, under which ten calls of ``random.random`` share one key and
return one value. Each task's outcome is awaited on the client's event loop and reported
from one dispatch thread of the backend; nothing polls.

``distributed`` is imported when this module is, and this module only when the Dask
backend is first used.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from ..backend import BaseParallelBackend, available_cpus
from ..config import DaskConfig, DaskTaskOptions, ParallelConfig
from ..errors import EngineLostError, WorkerCrashedError
from ..executor import DoneCallback, TaskRunner
from ..start_log import LoggedCall, StartLog
from .network import split_host_port, wait_for_listener

__all__ = ["DaskParallelBackend"]

logger = logging.getLogger(__name__)

#: Keys that ``executor.with_options``, ``wrap`` and ``config.task`` accept.
_OPTION_KEYS = ("resources", "retries", "priority")
#: Keyword arguments that ``Client.submit`` keeps for itself; a task's own keyword
#: arguments of these names are routed around it (see :func:`_apply`).
_SUBMIT_KEYWORDS = frozenset(
    {"func", "key", "workers", "resources", "retries", "priority", "fifo_timeout", "allow_other_workers", "actor", "actors", "pure"}
)
#: Seconds ``stop`` waits for the nannies to bring killed workers back.
_RESTART_TIMEOUT = 60.0
#: Seconds a cancel waits for the scheduler to hear of a task just submitted.
_ARRIVAL_TIMEOUT = 10.0


def _import_engine() -> Any:
    """Import ``distributed``, or explain how to install it."""
    try:
        import distributed
    except ImportError as exc:  # pragma: no cover - the test environment has Dask
        raise ImportError(
            "the dask backend needs dask.distributed, which is not installed; "
            "install it with: pip install 'parallel-hydra[dask]'"
        ) from exc
    return distributed


distributed = _import_engine()
from distributed import LocalCluster as _LocalCluster  # noqa: E402
from distributed import Nanny as _Nanny  # noqa: E402
from distributed.deploy.cluster import Cluster as _Cluster  # noqa: E402


class _OwnedLocalCluster(_LocalCluster):
    """A ``LocalCluster`` that keeps its nannies when their workers die.

    A ``SpecCluster`` checks each worker that left the scheduler again 15 s later
    (``distributed.deploy.lost-worker-timeout``) and closes its nanny for good if no
    worker of that name is registered at that instant. Our nannies restart dead workers
    at once, but the ``RUNNING`` policy kills workers on purpose: when a later kill had
    the worker down at the moment of that check, the cluster dropped it and stayed a
    worker short (seen here: every worker gone after a run of kills). The nanny is the
    one that restarts workers here, so the check is skipped.
    """

    def _update_worker_status(self, op: str, msg: Any) -> None:
        if op == "remove":
            _Cluster._update_worker_status(self, op, msg)
        else:
            super()._update_worker_status(op, msg)


#: How worker processes of the clusters this process started ended: pid -> exit code
#: (negative: killed by that signal). Kept small: read (and dropped) after a crash.
_worker_exits: Dict[int, int] = {}
_WORKER_EXITS_KEPT = 256


class _RecordingNanny(_Nanny):
    """A nanny that notes how its worker process ended (``_worker_exits``), so that a
    task whose worker died can be told why (an exit code, a signal)."""

    _recorded_pid: Optional[int] = None

    async def instantiate(self) -> Any:
        status = await super().instantiate()
        process = getattr(self, "process", None)
        self._recorded_pid = getattr(process, "pid", None)
        return status

    def _on_worker_exit_sync(self, exitcode: int) -> None:
        if self._recorded_pid is not None:
            if len(_worker_exits) >= _WORKER_EXITS_KEPT:
                _worker_exits.pop(next(iter(_worker_exits)))
            _worker_exits[self._recorded_pid] = exitcode
        super()._on_worker_exit_sync(exitcode)


def _how_it_died(pid: Optional[int]) -> str:
    """How worker process ``pid`` ended, as far as its nanny told us (waits a moment)."""
    if pid is None:
        return "it died"
    end = time.monotonic() + 2.0
    while pid not in _worker_exits and time.monotonic() < end:
        time.sleep(0.01)
    exitcode = _worker_exits.get(pid)
    if exitcode is None:
        return "it died"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


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


def _run_logged(folder: str, number: int, fn: Callable[..., Any], args: List[Any], kwargs: Dict[str, Any]) -> Any:
    """On a worker of a cluster this backend started: run one task of an executor.

    The task's start is recorded in the backend's start log (``folder``), so that if its
    process dies the backend knows which task it was running. Its arguments travel as
    plain arguments of this function, so Dask still replaces the futures among them,
    and any keyword name reaches ``fn``. The result is pickled here, while the task still
    counts as running: a result that cannot be pickled becomes that task's failure, and
    one whose pickling kills the worker is a crash of this task. Dask would otherwise
    pickle it only when the result is fetched, and compute it again after every such
    crash, without end.
    """
    from distributed.protocol import pickle as dask_pickle

    result = LoggedCall(folder, number, fn, tuple(args), kwargs)()
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


def _unpicklable_argument(fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], error: BaseException) -> Optional[pickle.PicklingError]:
    """The ``PicklingError`` that says which part of a task could not be pickled, or
    None if each part pickles on its own (``error`` was something else)."""
    from distributed.protocol import pickle as dask_pickle

    parts: List[Tuple[str, Any]] = [("the function", fn)]
    parts += [(f"positional argument {i}", value) for i, value in enumerate(args)]
    parts += [(f"keyword argument {name!r}", value) for name, value in kwargs.items()]
    for what, value in parts:
        try:
            dask_pickle.dumps(value)
        except Exception as exc:
            failure = pickle.PicklingError(
                f"{what} of task {_name_of(fn)} (a {type(value).__name__}) could not be pickled "
                f"to be sent to a Dask worker: {type(exc).__name__}: {exc}"
            )
            failure.__cause__ = error
            return failure
    return None


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


def _local_layout(config: DaskConfig) -> Tuple[int, int]:
    """``(n_workers, threads_per_worker)`` of the local cluster ``config`` describes.

    ``n_cpus`` is the total of worker threads. With neither ``n_workers`` nor
    ``threads_per_worker`` set, there is one single-threaded worker process per CPU (the
    layout under which CPU-bound Python scales). Contradictory fields raise ``ValueError``.
    """
    n_workers, threads, n_cpus = config.n_workers, config.threads_per_worker, config.n_cpus
    total = n_cpus if n_cpus is not None else available_cpus()
    if n_workers is None and threads is None:
        return total, 1
    if n_workers is not None and threads is not None:
        if n_cpus is not None and n_workers * threads != n_cpus:
            raise ValueError(
                f"parallel config: n_workers ({n_workers}) * threads_per_worker ({threads}) must equal "
                f"n_cpus ({n_cpus}); set only two of n_cpus, n_workers, threads_per_worker"
            )
        return n_workers, threads
    if n_workers is not None:
        if n_cpus is not None and n_cpus % n_workers:
            raise ValueError(
                f"parallel config: n_cpus ({n_cpus}) must be a multiple of n_workers ({n_workers}) "
                f"so that every worker gets the same threads_per_worker; or set threads_per_worker"
            )
        return n_workers, max(1, total // n_workers)
    assert threads is not None
    if n_cpus is not None and n_cpus % threads:
        raise ValueError(
            f"parallel config: n_cpus ({n_cpus}) must be a multiple of threads_per_worker ({threads}); "
            f"or set n_workers"
        )
    return max(1, total // threads), threads


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
    try:
        outcome: Tuple[bool, Any] = (True, await client.gather(future, asynchronous=True))
    except BaseException as exc:  # the task's exception, a cancellation, a lost worker
        outcome = (False, exc)
    del future
    try:
        dispatch.submit(report, key, *outcome)
    except RuntimeError:  # the backend is shutting down: report from here instead
        threading.Thread(target=report, args=(key, *outcome), daemon=True).start()


#: Scheduler task states of a task that no worker has been given yet.
_UNSTARTED_STATES = frozenset({"released", "waiting", "queued", "no-worker"})


def _cancel_on_scheduler(dask_scheduler: Any, keys: List[Any], client_id: str, only_unstarted: bool) -> Dict[str, Any]:
    """On the scheduler: cancel ``keys`` (or those no worker has yet); say what it did.

    Returns ``{"cancelled": keys cancelled, "workers": {address: pid}, "unknown": keys}``:
    the workers that held a cancelled task, and the keys the scheduler has not heard of.
    Run through ``Client.run_on_scheduler``, this is done when the call returns, unlike
    ``Client.cancel``, whose message may still be on its way when we kill a worker: the
    scheduler would then run the task again elsewhere.
    Checking and cancelling in one step also means no task moves to a worker in
    between, and the workers named are the ones that hold the tasks at that moment.
    """
    cancelled: List[Any] = []
    unknown: List[Any] = []
    workers: Dict[str, Any] = {}
    for key in keys:
        task = dask_scheduler.tasks.get(key)
        if task is None:
            unknown.append(key)
            continue
        if only_unstarted and task.state not in _UNSTARTED_STATES:
            continue
        cancelled.append(key)
        if task.processing_on is not None:
            workers[task.processing_on.address] = task.processing_on.pid
    if cancelled:
        dask_scheduler.stimulus_cancel(
            cancelled, client=client_id, force=False, reason="withdrawn by parallel_hydra", msg="not started"
        )
    return {"cancelled": cancelled, "workers": workers, "unknown": unknown}


#: Worker states of a worker that has joined: ``running``, or ``paused`` by memory
#: pressure (it takes tasks again when memory frees). Not ``init`` (registered, not yet
#: taking tasks) nor any ``closing`` state.
_JOINED_STATES = frozenset({"running", "paused"})


def _joined_worker_pids(dask_scheduler: Any) -> Dict[str, Any]:
    """On the scheduler: address -> PID of each worker that has joined."""
    return {address: ws.pid for address, ws in dask_scheduler.workers.items() if ws.status.name in _JOINED_STATES}


#: Times a task is submitted again because a worker it was given (but had not started
#: on) died, or was killed to stop other tasks.
_MAX_RESUBMITS = 3


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
    ``allowed-failures`` retries, see ``_start_local``); the task that was running in
    the dead process fails with :class:`WorkerCrashedError`, the others it held (given
    to it but not started), and the tasks of a worker killed to stop other tasks, are
    submitted again. On a cluster reached by ``address`` Dask's own
    ``distributed.scheduler.allowed-failures`` applies, and its ``KilledWorker`` becomes
    a ``WorkerCrashedError``.
    """

    def __init__(self, backend: "DaskParallelBackend") -> None:
        self._backend = backend
        self._client = backend.client
        self._log: Optional[StartLog] = backend._start_log
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
            else:
                future = _submit(client, task.fn, task.args, task.kwargs, task.options)
        except Exception as exc:
            if not self._backend._engine_alive():
                raise self._backend._engine_lost(exc) from exc
            failure = _unpicklable_argument(task.fn, task.args, task.kwargs, exc)
            if failure is not None:
                raise failure from exc
            raise
        with self._lock:
            task.future, task.key = future, future.key
        client.loop.add_callback(_watch, client, future, lambda key, ok, value: self._reported(task, key, ok, value), self._backend._dispatch)

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
        on_done = task.on_done
        task.release()
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
        killed_on_purpose = pid is not None and pid in self._backend._killed_pids
        started_there = pid is not None and task.number in self._log.started_by(pid)
        if (killed_on_purpose or not started_there) and task.resubmits < _MAX_RESUBMITS:
            task.resubmits += 1
            logger.debug("Dask: task %s was on worker %s (pid %s), which died; submitting it again", name, address, pid)
            try:
                if not task.stopped and not task.withdrawn:
                    self._submit(task)
                return None
            except Exception as exc:
                return exc
        if started_there:
            message = f"the Dask worker process (pid {pid}, {address}) running task {name} died ({_how_it_died(pid)})"
        else:
            message = f"task {name} was on Dask workers that died {task.resubmits + 1} times; last {address} (pid {pid})"
        crash = WorkerCrashedError(message)
        crash.__cause__ = error
        return crash

    def withdraw(self, tokens: List[Any]) -> List[bool]:
        with self._lock:
            asked = [t for t in tokens if t is not None and t.future is not None and not t.withdrawn and not t.stopped]
            # Marked before asking: the cancellation may reach the client before the answer.
            for t in asked:
                t.withdrawn = True
            futures = [t.future for t in asked]
        if not futures:
            return [False] * len(tokens)
        try:  # one scheduler call for the whole batch
            taken = set(self._backend._cancel_when_known(futures, only_unstarted=True)["cancelled"])
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
        self._backend._stop_futures(futures)


class DaskParallelBackend(BaseParallelBackend, name="dask"):
    """Runs tasks on Dask: a ``LocalCluster`` it starts, or a scheduler at ``address``.

    Without ``address``, a ``LocalCluster`` is started on 127.0.0.1 with ``n_workers``
    worker processes of ``threads_per_worker`` threads (by default one single-threaded
    process per CPU of ``n_cpus``), and closed at :meth:`shutdown`. With ``address``
    (``tcp://HOST:PORT``), the backend only connects a client; :meth:`shutdown` closes
    the client and leaves the scheduler and its workers running.

    Stopping running tasks (the ``RUNNING`` cancellation policy): Dask cannot interrupt
    a task running in a worker thread (dask/distributed#4694), so

    * on a cluster this backend started with worker processes (no ``address``,
      ``processes: true``, the default), the tasks' futures are cancelled and then the
      worker processes running them are killed; their nannies start fresh workers at
      once, and the backend waits (up to a minute) for them before going on. Other
      tasks that were running on a killed worker are re-run by Dask elsewhere; data held
      only by that worker (objects from :meth:`put`, finished results) is lost.
    * on a cluster reached by ``address``, or with ``processes: false``, the backend must
      not (or cannot) kill workers: it cancels the futures, so Dask forgets the tasks and
      never re-runs them, but a task already running goes on in its worker thread until
      it returns, and its result is discarded. The executor reports these futures as
      cancelled all the same. A warning says so once per backend.

    Failures:

    * a task that takes its worker process down (``os._exit``, a signal, a segfault, a
      ``sys.exit`` in the task, or a result whose pickling kills the worker) fails with
      :class:`~parallel_hydra.errors.WorkerCrashedError`, whose message names the task
      and how the process died. On a cluster this backend started, that happens at
      once (the cluster runs with ``distributed.scheduler.allowed-failures`` at 0: Dask
      would otherwise run the task on up to 3 more workers, whatever ``task.retries``
      says); the other tasks the dead worker held are submitted again. On a cluster
      reached by ``address``, Dask's own ``allowed-failures`` of that scheduler applies
      first, and its ``KilledWorker`` becomes the ``WorkerCrashedError``.
    * an argument or a result that cannot be pickled fails its task with
      ``pickle.PicklingError``, naming the task and what could not be pickled.
    * when the scheduler dies or the connection to it is lost, every unfinished task
      fails at once with :class:`~parallel_hydra.errors.EngineLostError`, naming the
      scheduler's address, and so do later submits, ``executor()`` and
      ``effective_n_jobs``; :meth:`shutdown` then only waits a moment for the client.

    Examples
    --------
    >>> with DaskParallelBackend(n_cpus=1) as backend:  # doctest: +SKIP
    ...     backend.get(backend.wrap(sum)(backend.put([1, 2, 3])))
    6
    """

    config_class = DaskConfig
    config: DaskConfig

    # -- lifecycle ----------------------------------------------------------------

    def _start(self) -> None:
        self.cluster: Optional[Any] = None
        self.client: Any = None
        self._warned_no_kill = False
        # One thread reports every completion to the executors (see _watch).
        self._dispatch = ThreadPoolExecutor(1, thread_name_prefix="parallel_hydra-dask")
        self._stop_lock = threading.Lock()
        self._layout: Optional[Tuple[int, int]] = None
        self._dropped: Set[Any] = set()
        # Which task each worker process started last: only for worker processes we start.
        self._start_log: Optional[StartLog] = None
        # Worker processes that stop() killed on purpose: their tasks are submitted again.
        self._killed_pids: Set[int] = set()
        self._address = self.config.address or "a local cluster"
        # The engine's loggers follow logging_level, whatever the app's root logger says
        # (Hydra apps log INFO by default).
        logging.getLogger("distributed").setLevel(self.config.logging_level)
        if self.config.address is None:
            self._start_local()
        else:
            self._connect(self.config.address)

    def _start_local(self) -> None:
        config = self.config
        n_workers, threads = self._layout = _local_layout(config)
        kwargs: Dict[str, Any] = dict(
            n_workers=n_workers,
            threads_per_worker=threads,
            processes=config.processes,
            protocol="tcp://",  # also with processes=False, whose default (inproc) takes no host
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address="127.0.0.1:0" if config.dashboard else None,
            memory_limit=config.memory_limit,
            silence_logs=config.logging_level,
        )
        if not config.dashboard:
            # The scheduler serves HTTP (health, metrics) even without a dashboard, by
            # default on port 8787: take a free port instead, so clusters do not clash.
            kwargs["scheduler_kwargs"] = {"dashboard_address": "127.0.0.1:0"}
        if config.local_directory is not None:
            kwargs["local_directory"] = config.local_directory
        logger.info("starting Dask: distributed.LocalCluster(%s)", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
        if config.processes:
            kwargs["worker_class"] = _RecordingNanny
        import dask

        # The scheduler (in this process) reads this when it is made. A task whose worker
        # dies then fails at once, where Dask would try it on 3 more workers (killing
        # each if it is the culprit); the runner blames only the task that was running
        # there and submits the others again (see _DaskRunner).
        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            cluster = _OwnedLocalCluster(**kwargs)
        try:
            self.client = distributed.Client(cluster, timeout=config.connect_timeout)
        except BaseException:
            cluster.close()
            raise
        self.cluster = cluster
        self._address = self.client.scheduler.address
        if config.processes:
            self._start_log = StartLog()

    def _connect(self, address: str) -> None:
        config = self.config
        ignored = [
            name
            for name, default in (("n_workers", None), ("threads_per_worker", None), ("local_directory", None), ("dashboard", False))
            if getattr(config, name) != default
        ]
        if ignored:
            logger.warning("Dask address %s given: local-cluster settings %s are ignored", address, ", ".join(ignored))
        host, port = split_host_port(address, "tcp://HOST:PORT (or HOST:PORT)")
        wait_for_listener(
            host, port, time.monotonic() + config.connect_timeout, f"the Dask scheduler at {address}",
            "Check that a scheduler runs there (dask scheduler --host HOST --port PORT), "
            "or set address to null for a local cluster.",
        )
        logger.info("connecting to the Dask scheduler at %s (timeout %s s)", address, config.connect_timeout)
        try:
            self.client = distributed.Client(address, timeout=config.connect_timeout)
        except (OSError, TimeoutError, distributed.TimeoutError) as exc:
            raise ConnectionError(
                f"could not connect to the Dask scheduler at {address} within {config.connect_timeout} s "
                f"(connect_timeout): {type(exc).__name__}: {exc}. Check that a scheduler runs there "
                f"(dask scheduler --host HOST --port PORT), or set address to null for a local cluster"
            ) from None

    def _stop(self) -> None:
        client, cluster = self.client, self.cluster
        try:
            if client is not None:
                # A client whose scheduler is gone would wait for it the whole timeout.
                timeout = max(10.0, self.config.wait_timeout) if self._engine_alive() else 2.0
                try:
                    client.close(timeout=timeout)
                except Exception as exc:
                    if self._engine_alive():
                        raise
                    logger.debug("Dask: closing the client of a lost scheduler: %r", exc)
        finally:
            try:
                if cluster is not None:
                    cluster.close(timeout=30)
            finally:
                self._dispatch.shutdown(wait=False)
                if self._start_log is not None:
                    self._start_log.close()

    def _engine_alive(self) -> bool:
        """Whether the client is connected to its scheduler."""
        client = self.client
        return client is not None and client.status == "running"

    def _engine_lost(self, error: Optional[BaseException] = None) -> EngineLostError:
        """The error of every task once the scheduler is gone (``error``: Dask's)."""
        status = getattr(self.client, "status", None)
        lost = EngineLostError(
            f"lost the Dask scheduler at {self._address} (client {status}); "
            f"its unfinished tasks are gone. Start a new backend once a scheduler runs there again"
        )
        lost.__cause__ = error
        return lost

    def _check_engine(self) -> None:
        """Raise ``EngineLostError`` naming the address if the scheduler is gone."""
        if not self._engine_alive():
            raise self._engine_lost()

    @property
    def owns_cluster(self) -> bool:
        """Whether this backend started its cluster (and will close it at shutdown)."""
        return self.cluster is not None

    # -- CPU counts ---------------------------------------------------------------

    @classmethod
    def _count_slots_unstarted(cls, config: ParallelConfig) -> Optional[int]:
        if config.address is not None:
            return None
        assert isinstance(config, DaskConfig)
        n_workers, threads = _local_layout(config)
        return n_workers * threads

    def _thread_total(self) -> int:
        return int(sum(self.client.nthreads().values()))

    def _count_slots(self) -> int:
        self._check_engine()
        self._await_whole_cluster()
        total = self._thread_total()
        if total == 0:
            self._wait_for_workers(1, self.config.connect_timeout)
            total = self._thread_total()
        if total < 1:
            raise RuntimeError(f"the Dask cluster at {self.client.scheduler.address} has no worker threads")
        return total

    def _await_whole_cluster(self) -> None:
        """On a cluster we started, wait (boundedly) until all its workers are connected.

        Workers are missing for a moment after a ``RUNNING`` kill. Tasks handed to Dask
        then would all queue on the workers present, behind one another, while the
        restarted workers got later tasks.
        """
        if self._layout is not None and len(self._joined_workers()) < self._layout[0]:
            self._wait_for_workers(self._layout[0], _RESTART_TIMEOUT)

    def _joined_workers(self) -> Dict[str, Any]:
        """Address -> PID of each worker that has joined (see ``_JOINED_STATES``).

        A worker registers first and says it is running a moment later; in between, it
        is listed (``Client.nthreads``) but gets no tasks, and tasks handed over then
        pile up on the others.
        """
        if self.owns_cluster:  # our scheduler can run our code; another may lack this package
            return dict(self.client.run_on_scheduler(_joined_worker_pids))
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        return {address: None for address, info in workers.items() if info.get("status", "running") in _JOINED_STATES}

    def _wait_for_workers(self, n: int, timeout: float, replacing: Optional[Mapping[str, Any]] = None) -> None:
        """Wait, boundedly, until ``n`` workers have joined, none of them in ``replacing``.

        ``replacing`` maps the address of each worker just killed to its PID, and is
        checked by PID too: a new worker may get the port of the one it replaces. Our
        own loop, which also restarts workers the cluster dropped (see
        ``_restore_dropped_workers``); ``Client.wait_for_workers`` does neither.
        """
        replacing = replacing or {}
        end = time.monotonic() + timeout
        while True:
            closing = self._closing_workers()
            if closing:
                # Ctrl-C reached the worker processes too (a terminal signals the whole
                # process group), or the cluster is being closed: nobody brings these back.
                logger.info("Dask: worker(s) %s of the local cluster are closing; not waiting for workers", ", ".join(closing))
                return
            joined = self._joined_workers()
            if len(joined) >= n and all(joined.get(address) != pid for address, pid in replacing.items()):
                return
            self._restore_dropped_workers()
            if time.monotonic() > end:
                break
            time.sleep(min(0.05, self.config.wait_timeout))
        logger.warning(
            "Dask: fewer than %d worker(s) joined within %s s (killed: %s; joined: %s)",
            n,
            timeout,
            ", ".join(f"{address} pid {pid}" for address, pid in replacing.items()) or "none",
            ", ".join(f"{address} pid {pid}" for address, pid in joined.items()) or "none",
        )

    # -- executors ----------------------------------------------------------------

    def _task_runner(self, max_workers: int) -> TaskRunner:
        # executor() has just counted slots, which waited for the whole cluster.
        return _DaskRunner(self)

    def _stop_futures(self, futures: List[Any]) -> None:
        """Cancel ``futures`` and, where this backend may, kill the workers running them."""
        if not futures:
            return
        can_kill = self.owns_cluster and self.config.processes
        if not can_kill:
            if not self._warned_no_kill:
                self._warned_no_kill = True
                why = "a cluster this backend did not start" if not self.owns_cluster else "workers that are threads (processes: false)"
                logger.warning(
                    "Dask cannot interrupt running tasks, and on %s the backend does not kill workers: "
                    "the tasks are cancelled, but those already running go on until they return "
                    "(their results are discarded)",
                    why,
                )
            self.client.cancel(futures, force=True)
            return
        with self._stop_lock:
            # Cancel first, and wait until the scheduler has: it then forgets the tasks, and
            # will not run them again elsewhere when their workers die.
            done = self._cancel_when_known(futures, only_unstarted=False)
            self.client.cancel(futures, force=True)
            # Noted before the kill: the tasks the scheduler fails with KilledWorker
            # because of it are submitted again (see _DaskRunner._worker_died).
            self._killed_pids.update(pid for pid in done["workers"].values() if pid)
            killed = {addr: pid for addr, pid in sorted(done["workers"].items()) if self._kill_worker(addr, pid)}
            if killed:
                logger.info("Dask: killed worker(s) %s to stop %d task(s)", ", ".join(killed), len(done["cancelled"]))
                assert self._layout is not None
                self._wait_for_workers(self._layout[0], _RESTART_TIMEOUT, replacing=killed)

    def _cancel_when_known(self, futures: List[Any], only_unstarted: bool) -> Dict[str, Any]:
        """Cancel ``futures`` on the scheduler (see :func:`_cancel_on_scheduler`).

        A task submitted a moment ago may not have reached the scheduler yet: the submit
        travels on the client's batched stream, this call on another connection. The
        scheduler would then cancel nothing, and run the task when it arrives; so keys
        it does not know are asked about again (boundedly) while their futures are still
        pending. A future that is done or cancelled meanwhile (a concurrent withdraw, a
        failed submit) is not waited for.
        """
        result: Dict[str, Any] = {"cancelled": [], "workers": {}}
        by_key = {f.key: f for f in futures}
        asking = [key for key, f in by_key.items() if not f.done()]
        end = time.monotonic() + _ARRIVAL_TIMEOUT
        pause = 0.002
        while asking:
            done = self.client.run_on_scheduler(
                _cancel_on_scheduler, keys=asking, client_id=self.client.id, only_unstarted=only_unstarted
            )
            result["cancelled"].extend(done["cancelled"])
            result["workers"].update(done["workers"])
            asking = [key for key in done["unknown"] if not by_key[key].done()]
            if asking and time.monotonic() > end:
                logger.warning("Dask: the scheduler never heard of %d submitted task(s); not cancelled there", len(asking))
                break
            if asking:
                time.sleep(pause)
                pause = min(0.05, pause * 2)
        return result

    def _kill_worker(self, address: str, pid: Optional[int]) -> bool:
        """Kill the worker process ``pid``, if it is one that this process started."""
        import psutil  # a dependency of distributed

        if not pid or pid == os.getpid():
            return False
        try:
            ours = {p.pid for p in psutil.Process().children(recursive=True)}
        except psutil.Error:  # pragma: no cover
            ours = set()
        if pid not in ours:
            logger.warning("Dask: worker %s (pid %s) is not a process of this backend; not killing it", address, pid)
            return False
        try:
            process = psutil.Process(pid)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, psutil.NoSuchProcess):
            return False
        # Wait until it is dead, without reaping it: the nanny's own watcher must see its
        # exit code (``Process.wait`` would reap our child and leave the nanny guessing).
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.005)
        else:  # pragma: no cover
            logger.warning("Dask: worker %s (pid %s) did not exit after SIGKILL", address, pid)
        return True

    def _closing_workers(self) -> List[str]:
        """The names of the workers (nannies) of our cluster that are closing for good."""
        cluster = self.cluster
        if cluster is None:
            return []
        if cluster.status.name not in ("created", "running"):
            return [str(name) for name in cluster.workers] or ["all"]
        closing = []
        for name, worker in list(cluster.workers.items()):
            status = getattr(getattr(worker, "status", None), "name", "running")
            if status in ("closing", "closing_gracefully", "closed", "failed"):
                closing.append(str(name))
        return closing

    def _restore_dropped_workers(self) -> None:
        """Start again any worker whose nanny the cluster closed (a safety net).

        ``_OwnedLocalCluster`` keeps the cluster from dropping nannies; should a Dask
        release drop one anyway, scaling the cluster to its own size starts it again.
        """
        cluster = self.cluster
        if cluster is None or cluster.status.name not in ("created", "running"):
            return
        dropped = set(cluster.worker_spec) - set(cluster.workers)
        if not dropped:
            self._dropped = set()
            return
        if dropped != self._dropped:
            logger.warning("Dask: restarting worker(s) %s, which the cluster dropped", ", ".join(sorted(map(str, dropped))))
        self._dropped = dropped
        try:
            cluster.scale(len(cluster.worker_spec))
        except Exception as exc:  # the bounded waits report a short cluster anyway
            logger.warning("Dask: could not restart dropped worker(s): %s", exc)

    # -- object store -------------------------------------------------------------

    def put(self, obj: Any) -> Any:
        """Scatter ``obj`` to a worker; return its Dask ``Future``.

        ``hash=False``: each call stores a new object (as ``ray.put`` does) without
        hashing its content, which is slow for large data and would make two equal
        objects share one key.
        """
        self._check_open()
        return self.client.scatter([obj], hash=False)[0]

    def _check_handles(self, handles: Sequence[Any]) -> None:
        for handle in handles:
            if not isinstance(handle, distributed.Future):
                raise TypeError(f"the dask backend takes Dask futures from put or wrap; got {type(handle).__name__}")

    def get(self, handles: Any, *, timeout: Optional[float] = None) -> Any:
        """The value of a handle, or the values of a list of handles.

        A failed task raises its own exception; ``TimeoutError`` if the values are not
        ready within ``timeout`` seconds.
        """
        self._check_open()
        many = isinstance(handles, (list, tuple))
        items = list(handles) if many else [handles]
        self._check_handles(items)
        if timeout is not None:
            done, _ = self._wait(items, len(items), timeout)
            if len(done) < len(items):
                raise TimeoutError(f"{len(items) - len(done)} Dask result(s) not ready within {timeout} s")
        values = self.client.gather(items)
        return values if many else values[0]

    def _check_task_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        return _merge_options(self.config.task, options)

    def _start_wrapped(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Dict[str, Any]) -> Any:
        """Submit ``fn(*args)`` with ``pure=False``; the handle is its Future."""
        return _submit(self.client, fn, args, kwargs, options)

    def _is_handle(self, obj: Any) -> bool:
        return isinstance(obj, distributed.Future)

    @staticmethod
    def _wait(handles: List[Any], num_returns: int, timeout: Optional[float]) -> Tuple[List[Any], List[Any]]:
        """Block (on Dask done-callbacks, not polling) until ``num_returns`` are done."""
        pending = [h for h in handles if not h.done()]
        if len(handles) - len(pending) < num_returns:
            condition = threading.Condition()

            def notify(_future: Any) -> None:
                with condition:
                    condition.notify_all()

            for handle in pending:
                handle.add_done_callback(notify)
            end = None if timeout is None else time.monotonic() + timeout
            with condition:
                while sum(h.done() for h in handles) < num_returns:
                    remaining = None if end is None else end - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    # Checked under the lock, so no wake-up is lost; the cap only bounds each wait.
                    condition.wait(0.5 if remaining is None else min(remaining, 0.5))
        done = [h for h in handles if h.done()]
        return done, [h for h in handles if not h.done()]
