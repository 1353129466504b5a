"""The Dask backend object: its cluster, its counts, its object store, its executors.

:class:`DaskParallelBackend` starts a ``LocalCluster`` (:meth:`~DaskParallelBackend._start_local`)
or connects a client to a scheduler at ``address`` (:meth:`~DaskParallelBackend._connect`),
and closes what it started at shutdown. It counts the worker threads of its cluster,
stores objects on it (``put``/``get``/``wrap``/``wait``), and makes executors whose tasks
:mod:`.runner` submits. What is done to the cluster's workers (waiting for them, killing
those that run tasks to stop) is in :mod:`.workers`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ...backend import BaseParallelBackend, SizedJoblibBackend, available_cpus
from ...config import DaskConfig, ParallelConfig
from ...errors import EngineLostError
from ...executor import TaskRunner
from ...start_log import StartLog
from ..network import split_host_port, wait_for_listener
from joblib._dask import DaskDistributedBackend

from . import distributed
from .claims import SchedulerClaims
from .runner import QuietTaskFailures, _DaskRunner, _merge_options, _submit
from .workers import OwnedWorkers, Workers, close_local_cluster, start_local_cluster

# The package's logger: records keep the name ``parallel_hydra.backends.dask``.
logger = logging.getLogger(__package__)


class _SizedDaskBackend(SizedJoblibBackend, DaskDistributedBackend):
    """joblib's Dask backend on the backend's client, with ``n_jobs`` counted by the
    backend (joblib's own ignores ``n_jobs`` and counts every thread of the cluster)."""


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
        # The workers of the cluster: waited for, and killed to stop tasks (see workers.py).
        self._workers: Workers
        # One thread reports every completion to the executors (see _watch).
        self._dispatch = ThreadPoolExecutor(1, thread_name_prefix="parallel_hydra-dask")
        self._layout: Optional[Tuple[int, int]] = None
        # Which tasks each worker process started: only for worker processes we start.
        self._start_log: Optional[StartLog] = None
        # Where workers are not this machine's processes, the scheduler keeps the claims
        # that stop Dask from running a started task a second time (see claims.py).
        self._claims: Optional[SchedulerClaims] = None
        # The batch cluster (dask-jobqueue) this backend started, if any (see jobqueue.py).
        self._batch: Optional[Any] = None
        self._address = self.config.address or "a local cluster"
        # The engine's loggers follow logging_level, whatever the app's root logger says
        # (Hydra apps log INFO by default).
        logging.getLogger("distributed").setLevel(self.config.logging_level)
        if self.config.address is None and self.config.cluster is not None:
            self._start_batch()
        elif self.config.address is None:
            self._start_local()
        else:
            self._connect(self.config.address)
        self._quiet_task_failures()
        if self.config.address is not None or self._batch is not None:
            self._claims = SchedulerClaims.install(self.client, self._address)

    def _quiet_task_failures(self) -> None:
        """Workers, also those that join later, stop logging our tasks' exceptions."""
        try:
            self.client.register_plugin(QuietTaskFailures(), name=QuietTaskFailures.name)
        except Exception as exc:  # workers that cannot import parallel_hydra: only noisier logs
            logger.debug("could not quiet the workers' 'Compute Failed' logs: %s", exc)

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
        cluster = start_local_cluster(kwargs, config.processes)
        try:
            self.client = distributed.Client(cluster, timeout=config.connect_timeout)
        except BaseException:
            cluster.close()
            raise
        self.cluster = cluster
        self._workers = OwnedWorkers(cluster, self.client, n_workers, config.processes, config.wait_timeout)
        self._address = self.client.scheduler.address
        if config.processes:
            self._start_log = StartLog()

    def _start_batch(self) -> None:
        """Start the batch cluster of ``config.cluster`` (Dask workers in batch jobs)."""
        from .jobqueue import BatchWorkers, batch_layout, start_batch_cluster

        _, n_workers, threads = batch_layout(self.config)
        self._batch, self.client = start_batch_cluster(self.config)
        self.cluster = self._batch.cluster
        self._layout = (n_workers, threads)
        self._workers = BatchWorkers(self._batch, self.client, self.config.wait_timeout, self.config.connect_timeout)
        self._address = self.client.scheduler.address

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
        self._workers = Workers(self.client, config.wait_timeout)

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
                if self._batch is not None:
                    self._batch.close()
                elif cluster is not None:
                    close_local_cluster(cluster, timeout=15)
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
        if config.cluster is not None:
            from .jobqueue import batch_layout

            return batch_layout(config)[1] * batch_layout(config)[2]
        n_workers, threads = _local_layout(config)
        return n_workers * threads

    def _thread_total(self) -> int:
        return int(sum(self.client.nthreads().values()))

    def _count_slots(self) -> int:
        self._check_engine()
        if self._batch is not None and self._layout is not None:
            # The size asked for: batch jobs start when the queue lets them (only jobs
            # that replace cancelled ones are waited for, boundedly).
            self._workers.await_whole()
            return self._layout[0] * self._layout[1]
        self._workers.await_whole()
        total = self._thread_total()
        if total == 0:
            self._workers.wait_for(1, self.config.connect_timeout)
            total = self._thread_total()
        if total < 1:
            raise RuntimeError(f"the Dask cluster at {self.client.scheduler.address} has no worker threads")
        return total

    # -- executors ----------------------------------------------------------------

    def _task_runner(self, max_workers: int) -> TaskRunner:
        # executor() has just counted slots, which waited for the whole cluster.
        return _DaskRunner(self)

    def _joblib_backend(self) -> Any:
        # joblib's Dask backend submits each batch of a joblib.Parallel call through
        # this backend's client, with the config's task options.
        return _SizedDaskBackend(sized_by=self, client=self.client, **_merge_options(self.config.task, {}))

    # -- object store -------------------------------------------------------------

    def put(self, obj: Any) -> Any:
        """Scatter ``obj`` to a worker; return its Dask ``Future``.

        ``hash=False``: each call stores a new object (as ``ray.put`` does) without
        hashing its content, which is slow for large data and would make two equal
        objects share one key.
        """
        self._check_open()
        return self.client.scatter([obj], hash=False)[0]

    def get(self, handles: Any, *, timeout: Optional[float] = None) -> Any:
        """The value of a handle, or the values of a list of handles.

        A failed task raises its own exception; ``TimeoutError`` if the values are not
        ready within ``timeout`` seconds.
        """
        self._check_open()
        many = isinstance(handles, (list, tuple))
        items = list(handles) if many else [handles]
        self._require_handles("gets", items)
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
