"""The workers of the backend's cluster: waiting for them, and stopping the tasks they run.

How Dask stops a running task, in this backend: Dask itself cannot interrupt a task
running in a worker thread (dask/distributed#4694). So :meth:`Workers.stop_tasks`
cancels the tasks' futures, and :meth:`OwnedWorkers.stop_tasks`, on a cluster of worker
processes that the backend started, first cancels them on the scheduler (which then
forgets them, and will not run them again elsewhere), then kills the worker processes
running them (:func:`_kill_worker`), and waits until the nannies have brought fresh
workers back (:meth:`Workers.wait_for`). On a cluster reached by ``address``, or of
worker threads, nothing is killed: the running tasks go on until they return.

The backend holds one of these objects for its cluster: a :class:`Workers` for a
cluster it connected to, an :class:`OwnedWorkers` for one it started. The executor's
runner uses them to stop and to withdraw tasks, and the backend to wait for a whole
cluster before it counts worker threads.

A cluster the backend starts is a :class:`_OwnedLocalCluster` whose workers are run by
:class:`_RecordingNanny` nannies (:func:`start_local_cluster`): the cluster keeps its
nannies when workers die, and each nanny notes how its worker process ended, which the
runner reads (:func:`_how_it_died`) to say why a task's worker died. Its workers are
:class:`_ParentWorker` workers, which may start processes of their own.

The functions run on the scheduler (:func:`_cancel_on_scheduler`,
:func:`_joined_worker_pids`) are pickled by reference, so they stay module-level
functions of this module; only a cluster this backend started is sure to be able to
import them.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Set

from distributed import LocalCluster as _LocalCluster
from distributed import Nanny as _Nanny
from distributed import Worker as _Worker
from distributed.deploy.cluster import Cluster as _Cluster

from ...errors import describe_exit

# The package's logger: records keep the name ``parallel_hydra.backends.dask``.
logger = logging.getLogger(__package__)

#: Seconds ``stop`` waits for the nannies to bring killed workers back.
_RESTART_TIMEOUT = 60.0
#: Seconds a cancel waits for the scheduler to hear of a task just submitted.
_ARRIVAL_TIMEOUT = 10.0


# -- the cluster this backend starts ------------------------------------------------


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


class _ParentWorker(_Worker):
    """A worker whose process may start processes of its own.

    Tasks use joblib, scikit-learn's ``n_jobs``, or a backend of their own, all of which
    start processes. A nanny starts its worker as a daemonic process, and a daemonic
    process may not have children ("daemonic processes are not allowed to have
    children"; joblib falls back to one job and warns). Dask reads
    ``distributed.worker.daemon`` each time a nanny (re)starts its worker, from the
    process-wide config: setting it around the cluster's start would miss the workers a
    nanny restarts after a crash or a ``RUNNING`` kill, and setting it for good would
    change every cluster of the process. So the worker clears the flag of its own
    process instead. Nothing else changes: its nanny still ends it with the cluster, and
    it still exits when the process that started the cluster dies (Dask's worker
    process watches a pipe from its parent).

    A process that the tasks left running would hold up the worker's exit, though:
    multiprocessing joins a process's non-daemonic children before it ends, and
    joblib's reusable loky pool, for one, stays idle for 5 minutes; the nanny then kills
    the worker after 4 s and the pool lives on, orphaned. So the worker ends such
    children itself as it exits (:func:`_end_children`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # In the worker process, which was not started by itself: the flag can be set.
        process = multiprocessing.current_process()
        if process.daemon:
            process.daemon = False
            # Run by multiprocessing as the process ends, before it joins the children.
            multiprocessing.util.Finalize(None, _end_children, exitpriority=100)
        super().__init__(*args, **kwargs)


def _end_children(grace: float = 5.0) -> None:
    """End this process's non-daemonic children (SIGTERM, then SIGKILL after ``grace``)."""
    children = [child for child in multiprocessing.active_children() if not child.daemon]
    for child in children:
        child.terminate()
    end = time.monotonic() + grace
    for child in children:
        child.join(max(0.0, end - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join(1.0)


class _RecordingNanny(_Nanny):
    """A nanny that notes how its worker process ended (``_worker_exits``), so that a
    task whose worker died can be told why (an exit code, a signal), and whose worker
    may start processes (:class:`_ParentWorker`)."""

    _recorded_pid: Optional[int] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("worker_class", _ParentWorker)
        super().__init__(*args, **kwargs)

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
    return describe_exit(_worker_exits.get(pid))


def _spawnable_start_method() -> None:
    """Make this process's default start method one a spawned child can set again.

    A spawned child (Dask starts its nannies so) sets the parent's default start method
    before it runs. In a loky worker (a task of the joblib backend that starts a Dask
    cluster of its own) that default is loky's, which a fresh child does not know: the
    nanny failed to start with "cannot find context for 'loky'". Such a process gets
    ``spawn`` instead; loky's own pools name their context and do not read the default.
    """
    import multiprocessing

    if multiprocessing.get_start_method(allow_none=True) not in (None, "fork", "spawn", "forkserver"):
        multiprocessing.set_start_method("spawn", force=True)


def start_local_cluster(kwargs: Dict[str, Any], processes: bool) -> _OwnedLocalCluster:
    """Start the ``LocalCluster`` that ``kwargs`` describe, as this backend runs one.

    Worker processes get :class:`_RecordingNanny` nannies (``kwargs`` is completed in
    place), and the scheduler fails at once the tasks of a worker that dies.
    """
    if processes:
        kwargs["worker_class"] = _RecordingNanny
        _spawnable_start_method()
    import dask

    # The scheduler (in this process) reads this when it is made. A task whose worker
    # dies then fails at once, where Dask would try it on 3 more workers (killing
    # each if it is the culprit); the runner blames only the task that was running
    # there and submits the others again (see _DaskRunner).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        return _OwnedLocalCluster(**kwargs)


# -- run on the scheduler ----------------------------------------------------------

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


# -- the backend's view of its workers ----------------------------------------------


class Workers:
    """The workers of a cluster that the backend reached by ``address``.

    The backend may wait for them, and cancel tasks, but it does not kill them: a
    running task goes on in its worker thread until it returns. :class:`OwnedWorkers`
    is the same for a cluster the backend started, which it may also kill workers of.
    """

    #: Why :meth:`stop_tasks` does not kill workers here (the once-per-backend warning says).
    _cannot_kill_because = "a cluster this backend did not start"

    def __init__(self, client: Any, wait_timeout: float) -> None:
        self._client = client
        self._pause = min(0.05, wait_timeout)
        self._warned_no_kill = False

    # -- who has joined -----------------------------------------------------------

    def joined(self) -> Dict[str, Any]:
        """Address -> PID of each worker that has joined (see ``_JOINED_STATES``).

        A worker registers first and says it is running a moment later; in between, it
        is listed (``Client.nthreads``) but gets no tasks, and tasks handed over then
        pile up on the others. A scheduler we did not start may lack this package, so
        it is asked through ``scheduler_info``, which has no PIDs.
        """
        workers = self._client.scheduler_info(n_workers=-1)["workers"]
        return {address: None for address, info in workers.items() if info.get("status", "running") in _JOINED_STATES}

    def closing(self) -> List[str]:
        """The names of the workers that are closing for good: none we could know of."""
        return []

    def restore_dropped(self) -> None:
        """Start again workers the cluster dropped: not ours to start here."""

    def await_whole(self) -> None:
        """Wait until the whole cluster has joined: a cluster we did not start has no
        fixed size to wait for."""

    def wait_for(self, n: int, timeout: float, replacing: Optional[Mapping[str, Any]] = None) -> None:
        """Wait, boundedly, until ``n`` workers have joined, none of them in ``replacing``.

        ``replacing`` maps the address of each worker just killed to its PID, and is
        checked by PID too: a new worker may get the port of the one it replaces. Our
        own loop, which also restarts workers the cluster dropped (see
        :meth:`restore_dropped`); ``Client.wait_for_workers`` does neither.
        """
        replacing = replacing or {}
        end = time.monotonic() + timeout
        while True:
            closing = self.closing()
            if closing:
                # Ctrl-C reached the worker processes too (a terminal signals the whole
                # process group), or the cluster is being closed: nobody brings these back.
                logger.info("Dask: worker(s) %s of the local cluster are closing; not waiting for workers", ", ".join(closing))
                return
            joined = self.joined()
            if len(joined) >= n and all(joined.get(address) != pid for address, pid in replacing.items()):
                return
            self.restore_dropped()
            if time.monotonic() > end:
                break
            time.sleep(self._pause)
        logger.warning(
            "Dask: fewer than %d worker(s) joined within %s s (killed: %s; joined: %s)",
            n,
            timeout,
            ", ".join(f"{address} pid {pid}" for address, pid in replacing.items()) or "none",
            ", ".join(f"{address} pid {pid}" for address, pid in joined.items()) or "none",
        )

    # -- stopping and taking back tasks -------------------------------------------

    def stop_tasks(self, futures: List[Any]) -> None:
        """Cancel ``futures``; those already running go on (see :meth:`_cancel_only`)."""
        if not futures:
            return
        self._cancel_only(futures)

    def _cancel_only(self, futures: List[Any]) -> None:
        """Cancel ``futures``, so that Dask forgets them, and say once that the running
        ones go on until they return (their results are discarded)."""
        if not self._warned_no_kill:
            self._warned_no_kill = True
            logger.warning(
                "Dask cannot interrupt running tasks, and on %s the backend does not kill workers: "
                "the tasks are cancelled, but those already running go on until they return "
                "(their results are discarded)",
                self._cannot_kill_because,
            )
        self._client.cancel(futures, force=True)

    def killed_on_purpose(self, pid: Optional[int]) -> bool:
        """Whether :meth:`stop_tasks` killed worker process ``pid``: never, here."""
        return False

    def withdraw(self, futures: List[Any]) -> List[Any]:
        """Cancel those of ``futures`` that no worker has been given yet; their keys.

        One scheduler call for the whole batch. This runs our code on the scheduler, so
        only the runner of a cluster this backend started, or of one whose scheduler
        imports parallel_hydra, uses it (see ``_DaskRunner.can_withdraw``).
        """
        return list(self._cancel_when_known(futures, only_unstarted=True)["cancelled"])

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
            done = self._client.run_on_scheduler(
                _cancel_on_scheduler, keys=asking, client_id=self._client.id, only_unstarted=only_unstarted
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


class OwnedWorkers(Workers):
    """The workers of the ``LocalCluster`` this backend started (``n_workers`` of them).

    Its scheduler runs in this process and can run our code, so it is asked directly
    which workers have joined. With worker processes (``processes``), stopping a task
    kills the process running it, and the cluster is kept whole: the backend waits for
    the nannies to restart killed workers, and starts again any nanny the cluster
    dropped. With worker threads, tasks are only cancelled, as on any cluster.
    """

    def __init__(self, cluster: Any, client: Any, n_workers: int, processes: bool, wait_timeout: float) -> None:
        super().__init__(client, wait_timeout)
        self._cluster = cluster
        self._n_workers = n_workers
        self._processes = processes
        if not processes:
            self._cannot_kill_because = "workers that are threads (processes: false)"
        self._stop_lock = threading.Lock()
        self._dropped: Set[Any] = set()
        # Worker processes that stop() killed on purpose: their tasks are submitted again.
        self._killed_pids: Set[int] = set()

    # -- who has joined -----------------------------------------------------------

    def joined(self) -> Dict[str, Any]:
        """Address -> PID of each worker that has joined (see ``_JOINED_STATES``),
        asked of our scheduler, which can run our code."""
        return dict(self._client.run_on_scheduler(_joined_worker_pids))

    def closing(self) -> List[str]:
        """The names of the workers (nannies) of our cluster that are closing for good."""
        cluster = self._cluster
        if cluster.status.name not in ("created", "running"):
            return [str(name) for name in cluster.workers] or ["all"]
        closing = []
        for name, worker in list(cluster.workers.items()):
            status = getattr(getattr(worker, "status", None), "name", "running")
            if status in ("closing", "closing_gracefully", "closed", "failed"):
                closing.append(str(name))
        return closing

    def restore_dropped(self) -> None:
        """Start again any worker whose nanny the cluster closed (a safety net).

        ``_OwnedLocalCluster`` keeps the cluster from dropping nannies; should a Dask
        release drop one anyway, scaling the cluster to its own size starts it again.
        """
        cluster = self._cluster
        if cluster.status.name not in ("created", "running"):
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

    def await_whole(self) -> None:
        """Wait (boundedly) until all the workers of our cluster are connected.

        Workers are missing for a moment after a ``RUNNING`` kill. Tasks handed to Dask
        then would all queue on the workers present, behind one another, while the
        restarted workers got later tasks.
        """
        if len(self.joined()) < self._n_workers:
            self.wait_for(self._n_workers, _RESTART_TIMEOUT)

    # -- stopping tasks -----------------------------------------------------------

    def stop_tasks(self, futures: List[Any]) -> None:
        """Cancel ``futures`` and, with worker processes, kill the workers running them."""
        if not futures:
            return
        if not self._processes:
            self._cancel_only(futures)
            return
        with self._stop_lock:
            # Cancel first, and wait until the scheduler has: it then forgets the tasks, and
            # will not run them again elsewhere when their workers die.
            done = self._cancel_when_known(futures, only_unstarted=False)
            self._client.cancel(futures, force=True)
            # Noted before the kill: the tasks the scheduler fails with KilledWorker
            # because of it are submitted again (see _DaskRunner._worker_died).
            self._killed_pids.update(pid for pid in done["workers"].values() if pid)
            killed = {addr: pid for addr, pid in sorted(done["workers"].items()) if _kill_worker(addr, pid)}
            if killed:
                logger.info("Dask: killed worker(s) %s to stop %d task(s)", ", ".join(killed), len(done["cancelled"]))
                self.wait_for(self._n_workers, _RESTART_TIMEOUT, replacing=killed)

    def killed_on_purpose(self, pid: Optional[int]) -> bool:
        """Whether :meth:`stop_tasks` killed worker process ``pid``."""
        return pid is not None and pid in self._killed_pids


def close_local_cluster(cluster: Any, timeout: float) -> None:
    """Close a cluster this backend started; if Dask cannot within ``timeout``, end its
    worker processes ourselves, so that none outlives the backend.

    Seen with distributed 2025.3: a nanny restarting a worker that the ``RUNNING`` policy
    had just killed kept ``LocalCluster.close`` waiting until it timed out.
    """
    workers = [getattr(nanny, "_recorded_pid", None) for nanny in list(getattr(cluster, "workers", {}).values())]
    try:
        cluster.close(timeout=timeout)
    except Exception as exc:
        left = [pid for pid in workers if pid]
        logger.warning("Dask: the local cluster did not close within %s s (%r); killing its worker processes %s",
                       timeout, exc, left)
        for pid in left:
            _kill_worker(f"pid {pid}", pid, quiet=True)


def _kill_worker(address: str, pid: Optional[int], quiet: bool = False) -> bool:
    """Kill the worker process ``pid``, if it is one that this process started, and the
    processes its tasks started (loky's, a nested cluster's: see :class:`_ParentWorker`),
    which would otherwise run on, orphaned, until their own work ends."""
    import psutil  # a dependency of distributed

    if not pid or pid == os.getpid():
        return False
    try:
        ours = {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:  # pragma: no cover
        ours = set()
    if pid not in ours:
        if not quiet:
            logger.warning("Dask: worker %s (pid %s) is not a process of this backend; not killing it", address, pid)
        return False
    try:
        process = psutil.Process(pid)
        descendants = process.children(recursive=True)
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False
    for child in descendants:  # psutil checks that each PID is still that process
        try:
            child.kill()
        except psutil.Error:
            pass
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
