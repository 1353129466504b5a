"""Dask workers in batch jobs: the dask-jobqueue cluster a Dask backend starts and owns.

With ``cluster`` set to a batch option (``parallel/cluster=slurm``, ``pbs``, ``sge``,
``lsf``, ``htcondor``), :func:`start_batch_cluster` builds that dask-jobqueue cluster
(its scheduler runs in this process), submits ``ceil(n_workers / processes)`` batch jobs,
each starting ``processes`` Dask workers that connect back, and waits up to
``connect_timeout`` for the first worker. :class:`BatchCluster` closes it again, and
cancels every batch job it submitted, whatever happened (an error, Ctrl-C).

What is done to the workers (``RUNNING``): Dask cannot interrupt a task in a worker
thread, and the worker processes run on other machines, so :class:`BatchWorkers` cancels
the tasks on the scheduler, then cancels the batch job of each worker that ran one
(``scancel``, ``qdel``, ...), and submits a new job in its place. It waits until those
workers have left (their tasks have stopped), not for the new jobs to start: a queue may
take its time.

dask-jobqueue is imported here only, and only when a batch cluster is started.
"""

from __future__ import annotations

import importlib
import logging
import math
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from ...cluster_config import CLUSTER_OPTIONS
from ...config import DaskConfig
from . import distributed
from .workers import Workers, _joined_worker_pids

# The package's logger: records keep the name ``parallel_hydra.backends.dask``.
logger = logging.getLogger(__package__)

#: Seconds RUNNING waits for the workers of cancelled jobs to leave the scheduler.
_LEAVE_TIMEOUT = 30.0
#: Seconds a batch scheduler's command (cancel, list) may take.
_COMMAND_TIMEOUT = 60.0
#: Seconds shutdown waits for cancelled SLURM jobs to leave the queue.
_QUEUE_DRAIN_TIMEOUT = 30.0
#: How to list jobs by id, for the schedulers whose cancel command we know: the job
#: states named in errors, and the check that cancelled jobs are gone.
_LISTERS = {"scancel": ["squeue", "--noheader", "--format=%i %T %r", "--jobs"]}


def _import_jobqueue() -> Any:
    """Import dask-jobqueue, keeping this process's Ctrl-C handler.

    dask-jobqueue 0.9 replaces the SIGINT handler when it is imported (its runner module
    makes Ctrl-C raise ``SystemExit``), which would turn an app's Ctrl-C into an exit
    that the executor does not treat as Ctrl-C; the handler is put back at once.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ImportError(
            "a batch cluster (parallel.cluster) needs dask-jobqueue, which is not installed; "
            "install it with: pip install 'parallel-hydra[hpc]'"
        ) from exc
    except ValueError as exc:  # signal.signal off the main thread
        raise ImportError(
            f"dask-jobqueue could not be imported off the main thread ({exc}): start the first "
            f"batch-cluster backend of a process from its main thread"
        ) from exc
    finally:
        if in_main_thread and handler is not None and signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)
    return dask_jobqueue


def batch_layout(config: DaskConfig) -> Tuple[int, int, int]:
    """``(jobs, workers, threads_per_worker)`` of the batch cluster ``config`` describes.

    ``n_workers`` counts Dask worker processes, as dask-jobqueue's ``scale(n=...)`` does,
    rounded up to whole jobs of ``processes`` workers. Without it, ``n_cpus`` worker
    threads are asked for (rounded up likewise), else one job.
    """
    assert config.cluster is not None
    processes = int(config.cluster.get("processes", 1))
    threads = max(1, int(config.cluster.get("cores", 1)) // processes)
    if config.n_workers is not None:
        wanted = config.n_workers
    elif config.n_cpus is not None:
        wanted = math.ceil(config.n_cpus / threads)
    else:
        wanted = processes
    jobs = math.ceil(wanted / processes)
    return jobs, jobs * processes, threads


# -- the jobs it submitted ------------------------------------------------------------


class _JobLedger:
    """Every batch job the cluster submitted, and every submission that failed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ids: List[str] = []
        self.failures: List[str] = []

    def submitted(self, job_id: str) -> None:
        with self._lock:
            if job_id not in self.ids:
                self.ids.append(job_id)

    def failed(self, error: BaseException) -> None:
        with self._lock:
            self.failures.append(f"{type(error).__name__}: {str(error).strip()}")


def _ledger_job_class(base: Any, ledger: _JobLedger) -> Any:
    """A subclass of dask-jobqueue's job class ``base`` that notes its job in ``ledger``."""

    async def start(self: Any) -> None:
        try:
            await base.start(self)
        except BaseException as exc:
            ledger.failed(exc)
            # Marked failed, so that closing the cluster does not trip over it (a job that
            # never started stays "created", which SpecCluster.close asserts against).
            self.status = distributed.core.Status.failed
            raise
        finally:
            if getattr(self, "job_id", None):
                ledger.submitted(str(self.job_id))

    return type(base.__name__, (base,), {"start": start, "__module__": __name__})


def _run(command: List[str]) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(command, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)


def _list_jobs(cancel_command: str, job_ids: List[str]) -> Optional[List[str]]:
    """``ID STATE REASON`` of those of ``job_ids`` still in the queue; None if unknown here."""
    lister = _LISTERS.get(shlex.split(cancel_command)[0])
    if lister is None or not job_ids or shutil.which(lister[0]) is None:
        return None
    try:
        done = _run(lister + [",".join(job_ids)])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:  # squeue refuses a list of ids that are all gone
        return [] if "Invalid job id" in done.stderr else None
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def _cancel_jobs(cancel_command: str, job_ids: List[str]) -> None:
    """Cancel ``job_ids`` with one call of the scheduler's cancel command (jobs already
    gone make it complain, which is fine)."""
    if not job_ids:
        return
    command = shlex.split(cancel_command) + list(job_ids)
    try:
        done = _run(command)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("Dask: could not run %s to cancel batch job(s) %s: %s", command[0], ", ".join(job_ids), exc)
        return
    logger.debug("Dask: %s -> %s %s", " ".join(command), done.returncode, done.stderr.strip())


# -- the cluster ----------------------------------------------------------------------


class BatchCluster:
    """A dask-jobqueue cluster this backend started, and the jobs it submitted."""

    def __init__(self, cluster: Any, ledger: _JobLedger, cancel_command: str, jobs: int) -> None:
        self.cluster = cluster
        self.ledger = ledger
        self.cancel_command = cancel_command
        self.jobs = jobs

    def queued(self) -> str:
        """The submitted jobs and what the queue says of them, for error messages."""
        ids = list(self.ledger.ids)
        if not ids:
            return "no batch job was submitted yet"
        listed = _list_jobs(self.cancel_command, ids)
        text = f"batch job(s) {', '.join(ids)}"
        if listed:
            text += f" ({'; '.join(listed)})"
        return text

    def close(self, timeout: float = 30.0) -> None:
        """Close the cluster (its scheduler, its jobs), then cancel every job it ever
        submitted that may still be queued or running, and wait (SLURM) until they are
        gone from the queue."""
        try:
            try:
                self.cluster.close(timeout=timeout)
            except Exception as exc:
                logger.warning("Dask: the batch cluster did not close cleanly (%r); cancelling its jobs", exc)
        finally:
            ids = list(self.ledger.ids)
            _cancel_jobs(self.cancel_command, ids)
            end = time.monotonic() + _QUEUE_DRAIN_TIMEOUT
            while ids:
                left = _list_jobs(self.cancel_command, ids)
                if not left:
                    break
                if time.monotonic() > end:
                    logger.warning("Dask: batch job(s) still in the queue after cancelling: %s", "; ".join(left))
                    break
                time.sleep(0.2)
            if ids:
                logger.info("Dask: batch job(s) %s cancelled", ", ".join(ids))


def _cluster_class(target: str) -> Any:
    """The dask-jobqueue class named by ``target`` (imported here)."""
    dask_jobqueue = _import_jobqueue()
    module_name, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        cls = None
    if not isinstance(cls, type) or not issubclass(cls, dask_jobqueue.JobQueueCluster):
        raise ValueError(
            f"parallel config: cluster._target_ must name a dask-jobqueue cluster class "
            f"(options: {', '.join(CLUSTER_OPTIONS)}); got {target!r}"
        )
    return cls


def _check_commands(target: str, job_cls: Any) -> None:
    """Fail at once if the batch scheduler's commands are not on ``PATH``."""
    for what in ("submit_command", "cancel_command"):
        command = shlex.split(getattr(job_cls, what) or "")[:1]
        if command and shutil.which(command[0]) is None:
            raise FileNotFoundError(
                f"parallel config: cluster {target} runs {command[0]!r} to {what.split('_')[0]} batch jobs, "
                f"but no {command[0]} is on PATH: run on a machine of the cluster that can submit jobs "
                f"(a login node), or pick the local cluster (parallel/cluster=local)"
            )


def _ignored_fields(config: DaskConfig) -> List[str]:
    ignored = [
        name
        for name, default in (("threads_per_worker", None), ("memory_limit", "auto"), ("local_directory", None))
        if getattr(config, name) != default
    ]
    if not config.processes:
        ignored.append("processes")
    return ignored


def start_batch_cluster(config: DaskConfig) -> Tuple[BatchCluster, Any]:
    """Build the cluster ``config.cluster`` describes, submit its jobs, and return it
    with a client once the first worker has joined (within ``connect_timeout``).

    Raises ``FileNotFoundError`` at once if the submit command is missing, ``ValueError``
    for arguments the cluster class refuses, ``RuntimeError`` if a submission fails
    (with the scheduler's message), and ``TimeoutError`` naming the jobs (cancelled by
    then) if no worker joined in time. Whatever is raised, nothing is left queued.
    """
    assert config.cluster is not None
    kwargs = dict(config.cluster)
    target = kwargs.pop("_target_")
    cls = _cluster_class(target)
    _check_commands(target, cls.job_cls)
    ignored = _ignored_fields(config)
    if ignored:
        logger.warning("Dask: cluster %s: local-cluster settings %s are ignored (the cluster's own fields apply)",
                       target, ", ".join(ignored))
    jobs, n_workers, _ = batch_layout(config)

    import dask

    # Ours are merged over the site's own (jobqueue.<name>.scheduler-options in Dask's
    # config), which dask-jobqueue would otherwise use only when we pass none.
    scheduler_options = dict(dask.config.get(f"jobqueue.{cls.job_cls.config_name}.scheduler-options", None) or {})
    scheduler_options.update(kwargs.pop("scheduler_options", None) or {})
    host = kwargs.pop("host", None)
    if host is not None:
        scheduler_options["host"] = host
    # The scheduler serves HTTP (health, metrics, the dashboard): on a free port, and on
    # 127.0.0.1 only unless a dashboard is asked for (reach it with an SSH tunnel).
    scheduler_options.setdefault("dashboard_address", (f"{host or ''}:0") if config.dashboard else "127.0.0.1:0")
    scheduler_options.setdefault("dashboard", config.dashboard)
    kwargs["scheduler_options"] = scheduler_options
    # The workers may start processes (joblib, scikit-learn's n_jobs, a backend of the
    # task's own, a launcher's job), as those of a local cluster the backend starts may
    # (workers._ParentWorker). The jobs' workers read their Dask config from their
    # environment; SLURM and the other schedulers end what they started with the job.
    kwargs["job_script_prologue"] = list(kwargs.get("job_script_prologue") or []) + [
        "export DASK_DISTRIBUTED__WORKER__DAEMON=False"
    ]
    # The worker replaces the job's shell (exec): cancelling the job then signals the
    # worker itself, which cannot outlive a shell that died first (SLURM's linuxproc
    # tracking, for one, loses processes whose parent is gone).
    python = str(kwargs.get("python") or sys.executable)
    kwargs["python"] = python if python.startswith("exec ") else f"exec {python}"
    kwargs.setdefault("silence_logs", config.logging_level)
    logging.getLogger("dask_jobqueue").setLevel(config.logging_level)

    ledger = _JobLedger()
    job_cls = _ledger_job_class(cls.job_cls, ledger)
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    logger.info("starting Dask: %s(%s); then scale(n=%d): %d batch job(s)", target, shown, n_workers, jobs)
    try:
        # The scheduler (made here, in this process) gives each worker only as many tasks
        # as it has threads: the others wait on the scheduler for whichever worker is free
        # or joins next. Workers join one by one as the queue starts their jobs, and a
        # task handed ahead to an early worker would wait there behind a long one.
        with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
            cluster = cls(job_cls=job_cls, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"parallel config: cluster: {target} refused its arguments ({shown}): {exc}") from None
    batch = BatchCluster(cluster, ledger, cls.job_cls.cancel_command, jobs)
    try:
        logger.info("Dask: the job script of each batch job:\n%s", cluster.job_script())
        client = distributed.Client(cluster, timeout=config.connect_timeout)
        cluster.scale(n=n_workers)
        _await_first_worker(batch, client, target, config.connect_timeout)
    except BaseException:
        batch.close()
        raise
    logger.info("Dask: %s up at %s, first worker joined; batch job(s) %s",
                target, client.scheduler.address, ", ".join(ledger.ids))
    return batch, client


def _await_first_worker(batch: BatchCluster, client: Any, target: str, timeout: float) -> None:
    """Block until a worker has joined; raise as soon as a submission failed, or at ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        if batch.ledger.failures:
            # dask-jobqueue's error holds the command and its output; its stderr says why.
            error = batch.ledger.failures[0]
            reason = error.split("stderr:", 1)[1].strip() if "stderr:" in error else error
            raise RuntimeError(f"{target}: submitting a batch job failed: {reason}")
        if client.run_on_scheduler(_joined_worker_pids):
            return
        if time.monotonic() > end:
            break
        time.sleep(0.1)
    raise TimeoutError(
        f"no Dask worker joined within {timeout} s (connect_timeout): {batch.queued()} still queued or "
        f"starting; they are cancelled. Check the queue and the job's limits (partition, account, walltime), "
        f"or raise parallel.connect_timeout to wait longer for the queue"
    )


# -- the backend's view of its workers --------------------------------------------------


class BatchWorkers(Workers):
    """The workers of a batch cluster this backend started.

    Its scheduler runs in this process, so it is asked directly which workers have
    joined. The cluster's size is what was asked for, but jobs start when the queue lets
    them: nothing waits for the whole cluster. Stopping a running task cancels the batch
    job of its worker (with the other workers of that job) and submits a new job.
    """

    def __init__(self, batch: BatchCluster, client: Any, wait_timeout: float, restore_timeout: float) -> None:
        super().__init__(client, wait_timeout)
        self._restore_timeout = restore_timeout
        self._batch = batch
        self._stop_lock = threading.Lock()
        self._replaced = 0
        # Workers the cluster had before stop_tasks cancelled their jobs: the next
        # executor waits (up to connect_timeout) until that many have joined again.
        self._restoring = 0

    def joined(self) -> Dict[str, Any]:
        return dict(self._client.run_on_scheduler(_joined_worker_pids))

    def await_whole(self) -> None:
        """After ``stop_tasks`` replaced jobs, wait (up to ``connect_timeout``) until as
        many workers as before have joined again.

        Tasks handed to Dask while a replacement is still starting would all go to the
        workers present, where one can wait behind a long task while the new worker
        idles. Otherwise nothing waits: jobs start when the queue lets them.
        """
        if self._restoring and len(self.joined()) < self._restoring:
            self.wait_for(self._restoring, self._restore_timeout)
        self._restoring = 0

    def _job_of(self, address: str) -> Optional[Tuple[str, Any]]:
        """``(spec name, job)`` of the batch job that runs the worker at ``address``."""
        info = self._client.scheduler_info(n_workers=-1)["workers"].get(address)
        if info is None:
            return None
        worker_name = str(info.get("name"))
        cluster = self._batch.cluster
        for spec_name, spec in list(cluster.worker_spec.items()):
            names = {f"{spec_name}{suffix}" for suffix in spec.get("group", [""])}
            if worker_name in names:
                job = cluster.workers.get(spec_name)
                return (spec_name, job) if job is not None else None
        return None

    def stop_tasks(self, futures: List[Any]) -> None:
        """Cancel ``futures``, and the batch jobs of the workers running them."""
        if not futures:
            return
        with self._stop_lock:
            before = len(self.joined())
            done = self._cancel_when_known(futures, only_unstarted=False)
            self._client.cancel(futures, force=True)
            jobs: Dict[str, Any] = {}
            unmapped = []
            for address in done["workers"]:
                found = self._job_of(address)
                if found is None:
                    unmapped.append(address)
                else:
                    jobs[found[0]] = found[1]
            if unmapped:
                logger.warning("Dask: found no batch job for worker(s) %s; their running tasks go on until they return",
                               ", ".join(unmapped))
            if not jobs:
                return
            cluster = self._batch.cluster
            ids = [str(job.job_id) for job in jobs.values() if job.job_id]
            _cancel_jobs(self._batch.cancel_command, ids)
            logger.info("Dask: cancelled batch job(s) %s to stop %d task(s); submitting new ones",
                        ", ".join(ids), len(done["cancelled"]))
            # Each cancelled job's spec is replaced by a new one of a name never used (a
            # name the cluster still has a job under would not start a new job); the
            # cluster then closes the old job and submits the new one.
            for spec_name in jobs:
                spec = cluster.worker_spec.pop(spec_name, None)
                if spec is not None:
                    self._replaced += 1
                    cluster.worker_spec[f"{spec_name}-r{self._replaced}"] = spec
            cluster.scale(jobs=self._batch.jobs)
            self._restoring = max(self._restoring, before)
            self._await_left(set(done["workers"]) - set(unmapped))

    def _await_left(self, addresses: set) -> None:
        """Wait (boundedly) until the workers at ``addresses`` have left the scheduler."""
        end = time.monotonic() + _LEAVE_TIMEOUT
        while addresses & set(self._client.scheduler_info(n_workers=-1)["workers"]):
            if time.monotonic() > end:
                logger.warning("Dask: worker(s) %s still connected %s s after their jobs were cancelled",
                               ", ".join(sorted(addresses)), _LEAVE_TIMEOUT)
                return
            time.sleep(self._pause)


__all__ = ["BatchCluster", "BatchWorkers", "batch_layout", "start_batch_cluster"]
