"""Runs a Hydra sweep's jobs as tasks on a parallel_hydra backend (``hydra/launcher=parallel_*``).

The launcher is a thin layer over what the ``parallel`` group already has: it starts the
backend its option describes (``init_parallel_backend``), submits each job as one task to
``backend.executor(max_concurrent_jobs)``, and shuts both down before ``launch`` returns.
The bound, stopping running jobs (``ALL`` on ``fail_fast`` and on Ctrl-C), crash reports
and teardown are the executor's and the backend's, the same as for any task.

Each job's config is composed here, in the app's process, while earlier jobs already
run: a bad override fails before its job starts, and workers need neither the app's
config files nor its search path. A worker only runs Hydra's ``run_job``
(:func:`execute_job`), as Hydra's basic launcher does in the app.

Hydra imports the plugin in every app, so this module imports no engine at import time;
the plugin imports it only inside ``launch``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.errors import CompactHydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from .checks import require_integer
from .config import plain
from .hydra_config import LAUNCHER_KEYS
from .errors import EngineLostError, WorkerCrashedError
from .executor import NamedAfter
from .policy import CancellationPolicy
from .sendable import sendable_exception, sendable_value

__all__ = ["launch", "execute_job", "JobInfo", "LauncherConfigError", "RESULTS_FILE"]

logger = logging.getLogger(__name__)

#: The file in the sweep folder with one JSON line per job.
RESULTS_FILE = "results.jsonl"

#: One Hydra job per process at a time. Hydra keeps a job's state per process (the
#: working directory, the root logger's handlers, ``HydraConfig``), so two jobs run by
#: two threads of one worker (a Dask worker with several threads, or ``processes=false``)
#: would write into each other's log files; the second one waits here instead.
_job_lock = threading.Lock()


@dataclass
class JobInfo:
    """What a worker reports about a job besides its ``JobReturn``."""

    #: Seconds the job ran in the worker (``run_job`` alone).
    seconds: float
    #: Host name and process id of the worker process.
    host: str
    pid: int
    #: The engine's name for the worker (Ray worker and node ids, a Dask worker's address).
    worker: str
    #: The job's log files (those of the job's logging config), if it has any.
    log_files: List[str]


# -- in the worker ----------------------------------------------------------------------


def _execute_job_of(
    task_function: TaskFunction,
    job_num: int,
    sweep_config: DictConfig,
    hydra_context: HydraContext,
    singleton_state: Dict[Any, Any],
    launch_cwd: str,
    task_file: Optional[str] = None,
) -> Tuple[JobReturn, "JobInfo"]:
    """:func:`execute_job` with the task function first, as :class:`NamedAfter` calls it."""
    return execute_job(job_num, sweep_config, hydra_context, task_function, singleton_state, launch_cwd, task_file)


def execute_job(
    job_num: int,
    sweep_config: DictConfig,
    hydra_context: HydraContext,
    task_function: TaskFunction,
    singleton_state: Dict[Any, Any],
    launch_cwd: str,
    task_file: Optional[str] = None,
) -> Tuple[JobReturn, JobInfo]:
    """Run one job in an engine worker, as the basic launcher runs it in the app.

    The worker gets the app's Hydra state (``Singleton`` state: the ConfigStore, custom
    resolvers, ...), runs in the app's working directory when that folder exists on its
    machine, and ``run_job`` gives the job its output folder, ``.hydra/`` and log file.
    A job that raises comes back as a ``FAILED`` ``JobReturn`` (``run_job`` does that);
    its traceback is written to its log file and attached to the exception as a note,
    because the traceback itself does not survive the trip back to the app.
    """
    started = time.perf_counter()
    if task_file:
        _restore_file_name(task_function, task_file)
    if not _job_lock.acquire(blocking=False):
        logger.warning(
            "job #%d waits for another Hydra job of this worker process to end (its threads share "
            "one working directory and logging setup): give workers one thread each",
            job_num,
        )
        _job_lock.acquire()
    try:
        worker = _engine_worker()
        with _job_surroundings(launch_cwd) as log_files:
            setup_globals()
            Singleton.set_state(singleton_state)
            HydraConfig.instance().set_config(sweep_config)
            ret = run_job(
                hydra_context=hydra_context,
                config=sweep_config,
                task_function=task_function,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            log_files.extend(_root_log_files())
            if ret.status == JobStatus.FAILED:
                _record_failure(job_num, ret._return_value)
                # What goes back to the app must arrive: an exception that does not
                # survive pickling is sent as a stand-in of its class (see sendable),
                # a return value as its repr, which is all the app shows of it.
                ret._return_value = sendable_exception(ret._return_value)
            else:
                ret._return_value = sendable_value(ret._return_value)
    finally:
        _job_lock.release()
    info = JobInfo(time.perf_counter() - started, socket.gethostname(), os.getpid(), worker, log_files)
    return ret, info


@contextmanager
def _job_surroundings(launch_cwd: str) -> Iterator[List[str]]:
    """The app's working directory and the worker's own logging, around one job.

    ``run_job`` points the root logger at the job's log file and leaves it so; a worker
    runs many jobs, and what it logs after a job must not land in that job's file.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        old_cwd: Optional[str] = os.getcwd()
    except OSError:
        old_cwd = None
    if os.path.isdir(launch_cwd):
        os.chdir(launch_cwd)
    try:
        yield []
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        if old_cwd is not None:
            try:
                os.chdir(old_cwd)
            except OSError:
                pass


#: What cloudpickle (3.1+, which loky and Dask use) names the file of code it sends by value.
_DYNAMIC_CODE = "<dynamic-code>"

#: Seconds before a Ctrl-C reached this process in which a job whose worker died counts
#: as interrupted (the same Ctrl-C reached the worker first), not failed.
_CTRL_C_WINDOW = 5.0


def _restore_file_name(task_function: Any, file_name: str) -> None:
    """Give the app's functions, sent by value, their script's name back.

    cloudpickle sends the functions of an app's ``__main__`` by value and drops their
    file name, so a failed job's traceback would show ``<dynamic-code>`` and no source
    lines. The task function and the functions of its script it refers to get the
    script's name again (its source is read from there when the traceback is printed).
    """
    def fix(code: Any) -> Any:
        if code.co_filename != _DYNAMIC_CODE:
            return code
        consts = tuple(fix(c) if isinstance(c, type(code)) else c for c in code.co_consts)
        return code.replace(co_filename=file_name, co_consts=consts)

    functions = [task_function]
    functions += [v for v in getattr(task_function, "__globals__", {}).values() if callable(v)]
    for fn in functions:
        code = getattr(fn, "__code__", None)
        if code is not None and getattr(code, "co_filename", None) == _DYNAMIC_CODE:
            try:
                fn.__code__ = fix(code)
            except (TypeError, ValueError, AttributeError):  # a builtin or an unusual callable
                pass


def _root_log_files() -> List[str]:
    return [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def _record_failure(job_num: int, error: BaseException) -> None:
    """Write a failed job's traceback to its log files (not to the console: the app says
    it in one line), and keep it on the exception as a note for the app's report."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    record = logging.LogRecord(
        "parallel_hydra.launcher", logging.ERROR, __file__, 0, "job #%d failed:\n%s", (job_num, text.rstrip()), None
    )
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    note = f"[parallel_hydra] traceback of job #{job_num} in its worker:\n{text.rstrip()}"
    add_note = getattr(error, "add_note", None)
    try:
        if add_note is not None:
            add_note(note)
        else:  # Python 3.10: kept for anyone who reads __notes__
            error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]
    except Exception:  # an exception type that refuses attributes
        pass


def _engine_worker() -> str:
    """The engine's name for this worker, read only from engines already loaded here."""
    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            if ray.is_initialized():
                context = ray.get_runtime_context()
                return f"ray worker {context.get_worker_id()[:12]} on node {context.get_node_id()[:12]}"
        except Exception:
            pass
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        try:
            return f"dask worker {distributed.get_worker().address}"
        except Exception:  # not in a Dask worker
            pass
    return f"process {os.getpid()}"


# -- in the app -------------------------------------------------------------------------


@dataclass
class _Job:
    num: int
    overrides: List[str]
    ret: Optional[JobReturn] = None
    info: Optional[JobInfo] = None
    #: Set when the job did not end by itself: cancelled by fail_fast, or interrupted.
    stopped: Optional[str] = None
    #: When (``time.monotonic()``) its worker died under it, if it did.
    worker_died_at: Optional[float] = None


class _Tracker:
    """Follows the jobs' futures from the engine's callback threads.

    It reports a failed job on the console the moment its future settles, and tells the
    app's thread when every job is done or when ``fail_fast`` must stop the sweep.
    """

    def __init__(self, jobs: List[_Job], fail_fast: bool) -> None:
        self.jobs = jobs
        self.fail_fast = fail_fast
        self.first_failure: Optional[_Job] = None
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._pending = len(jobs)

    def on_done(self, job: _Job, future: Future) -> None:
        if future.cancelled():
            return
        try:
            job.ret, job.info = future.result()
        except KeyboardInterrupt as exc:  # the terminal's Ctrl-C reached the job's worker too
            job.ret = JobReturn(overrides=job.overrides, status=JobStatus.FAILED, _return_value=exc)
            job.stopped = "INTERRUPTED"
        except BaseException as exc:  # the engine failed the task: a crash, pickling, a lost cluster
            job.ret = JobReturn(overrides=job.overrides, status=JobStatus.FAILED, _return_value=exc)
            if isinstance(exc, (WorkerCrashedError, EngineLostError)):
                job.worker_died_at = time.monotonic()
        failed = job.ret.status == JobStatus.FAILED and job.stopped is None
        if failed:
            logger.error("job #%d (%s) failed: %s%s", job.num, " ".join(filter_overrides(job.overrides)) or "no overrides",
                         _describe(job.ret._return_value), _where_logged(job))
        with self._lock:
            self._pending -= 1
            if failed and self.first_failure is None:
                self.first_failure = job
            if self._pending == 0 or (failed and self.fail_fast):
                self.wake.set()

    def wait(self) -> None:
        """Until every job is done, or a job failed under ``fail_fast``; Ctrl-C works."""
        while not self.wake.wait(0.5):
            pass


def _describe(error: Any) -> str:
    return f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else repr(error)


def _where_logged(job: _Job) -> str:
    if job.info is not None and job.info.log_files:
        return f" (traceback in {', '.join(job.info.log_files)})"
    return ""


class LauncherConfigError(ValueError, CompactHydraException):
    """A ``hydra.launcher`` value the launcher cannot use. Hydra prints the message of
    such an error alone, as it does for a bad override, not a traceback through itself."""


def _launcher_settings(settings: Mapping[str, Any]) -> Tuple[Dict[str, Any], Optional[int], bool]:
    """Split the option's fields into the backend's config and the launcher's own."""
    values = plain(dict(settings))
    max_jobs = values.pop("max_concurrent_jobs", None)
    fail_fast = values.pop("fail_fast", False)
    assert not set(LAUNCHER_KEYS) & set(values), "a launcher field was left among the backend's"
    try:
        require_integer("hydra.launcher.max_concurrent_jobs", max_jobs, minimum=1, none="null")
    except ValueError as exc:
        raise LauncherConfigError(str(exc)) from None
    if not isinstance(fail_fast, bool):
        raise LauncherConfigError(f"hydra.launcher.fail_fast must be true or false; got {fail_fast!r}")
    task = values.get("task")
    if values.get("backend") == "ray" and isinstance(task, dict) and task.get("max_calls") is None:
        # Jobs do not share a process: each gets a fresh Ray worker (task.max_calls=0 reuses them).
        task["max_calls"] = 1
    return values, max_jobs, fail_fast


@contextmanager
def _engine_settings(config: Mapping[str, Any]) -> Iterator[None]:
    """Engine settings a sweep needs while it runs.

    (The workers of a local Dask cluster may start processes, so that a job can use
    ``parallel=joblib`` or a local cluster itself: the Dask backend's own cluster
    allows it, see ``backends/dask/workers.py``.)
    """
    if config.get("backend") == "dask" and not config.get("processes", True):
        logger.warning("processes=false: the jobs run as threads of this process, one at a time")
    yield


def _shown(value: Any) -> str:
    return repr(value.name) if isinstance(value, CancellationPolicy) else repr(value)


def _start_backend(config: Dict[str, Any]) -> Any:
    from .backend import init_parallel_backend

    shown = ", ".join(f"{key!r}: {_shown(value)}" for key, value in config.items())
    logger.info("parallel_hydra launcher: init_parallel_backend({%s})", shown)
    try:
        return init_parallel_backend(config)
    except ValueError as exc:
        raise LauncherConfigError(f"hydra/launcher=parallel_{config.get('backend')}: {exc}") from None


def launch(
    *,
    settings: Mapping[str, Any],
    config: DictConfig,
    task_function: TaskFunction,
    hydra_context: HydraContext,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
) -> List[JobReturn]:
    """Run a batch of a sweep's jobs on the backend ``settings`` describe; their
    ``JobReturn`` objects in job order.

    The backend is started here and shut down before returning (a cluster given by
    ``address`` is only disconnected from). A failed job is reported as it fails and
    returned as ``FAILED``, as the basic launcher returns it; with ``fail_fast`` the
    other jobs are stopped (policy ``ALL``) and the failure is raised. Ctrl-C stops every
    job (the executor's rule). ``results.jsonl`` in the sweep folder gets a line per job
    in every case; a batch that starts a sweep (``initial_job_idx == 0``) starts the file
    anew, later batches add to it.
    """
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    backend_config, max_jobs, fail_fast = _launcher_settings(settings)
    jobs = [_Job(initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides)]
    logger.info("Launching %d jobs on %s, sweep output dir: %s", len(jobs), backend_config.get("backend"), sweep_dir)
    for job in jobs:
        logger.info("\t#%d : %s", job.num, " ".join(filter_overrides(job.overrides)))

    tracker = _Tracker(jobs, fail_fast)
    # Named after the app's task function, in the engines' messages and dashboards.
    job_of_task = NamedAfter(_execute_job_of, task_function)
    state = Singleton.get_state()
    launch_cwd = os.getcwd()
    task_file = getattr(getattr(task_function, "__code__", None), "co_filename", None)
    interrupted = False
    try:
        with _engine_settings(backend_config), _start_backend(backend_config) as backend:
            limit = -1 if max_jobs is None else max_jobs
            workers = backend.effective_n_jobs(limit)
            logger.info("parallel_hydra launcher: backend.executor(max_workers=%d, cancel_futures=ALL)", workers)
            with backend.executor(max_workers=workers, cancel_futures=CancellationPolicy.ALL) as executor:
                for job in jobs:
                    if tracker.wake.is_set() and tracker.first_failure is not None:
                        break  # fail_fast: do not even compose the rest
                    sweep_config = hydra_context.config_loader.load_sweep_config(config, job.overrides)
                    with open_dict(sweep_config):
                        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{job.num}"
                        sweep_config.hydra.job.num = job.num
                    future = executor.submit(
                        job_of_task, job.num, sweep_config, hydra_context, state, launch_cwd, task_file
                    )
                    future.add_done_callback(lambda f, job=job: tracker.on_done(job, f))
                if jobs:
                    tracker.wait()
                if fail_fast and tracker.first_failure is not None:
                    stopping = sum(1 for job in jobs if job.ret is None)
                    if stopping:
                        logger.warning("fail_fast: job #%d failed; stopping the other %d job(s) (policy ALL)",
                                       tracker.first_failure.num, stopping)
                    executor.shutdown(wait=True, cancel_futures=CancellationPolicy.ALL)
                    for job in jobs:
                        if job.ret is None:
                            job.stopped = "CANCELLED"
    except KeyboardInterrupt:
        interrupted = True
        now = time.monotonic()
        for job in jobs:
            # A terminal's Ctrl-C reaches the engine's worker processes too, and one may
            # die of it a moment before this process hears of it: that job was
            # interrupted, not failed.
            died = job.worker_died_at is not None and now - job.worker_died_at < _CTRL_C_WINDOW
            if job.ret is None or died:
                job.stopped = "INTERRUPTED"
        raise
    finally:
        _write_results(sweep_dir / RESULTS_FILE, jobs, append=initial_job_idx > 0)
        if interrupted:
            logger.warning("interrupted: %d job(s) had finished; results in %s",
                           sum(1 for job in jobs if job.ret is not None), sweep_dir / RESULTS_FILE)

    if fail_fast and tracker.first_failure is not None:
        failed = tracker.first_failure.ret
        assert failed is not None
        _ = failed.return_value  # raises the job's error, as the basic sweeper does for a failed job
    returns = []
    for job in jobs:
        assert job.ret is not None, f"job #{job.num} has no result"
        returns.append(job.ret)
    return returns


def _write_results(path: Path, jobs: List[_Job], append: bool) -> None:
    """One JSON line per job: what a sweep did, in one file."""
    with open(path, "a" if append else "w", encoding="utf-8") as out:
        for job in jobs:
            out.write(json.dumps(_result_line(job)) + "\n")


def _result_line(job: _Job) -> Dict[str, Any]:
    line: Dict[str, Any] = {"job": job.num, "overrides": job.overrides}
    ret, info = job.ret, job.info
    if ret is None or job.stopped == "INTERRUPTED":
        line["status"] = job.stopped or "NOT_RUN"
    else:
        line["status"] = ret.status.name
        value = ret._return_value
        if ret.status == JobStatus.COMPLETED:
            try:
                json.dumps(value, allow_nan=True)
                line["return_value"] = value
            except (TypeError, ValueError):
                line["return_value"] = None
                line["return_repr"] = repr(value)[:200]
        else:
            line["error"] = _describe(value)
        if ret.hydra_cfg is not None:
            line["output_dir"] = ret.hydra_cfg.hydra.runtime.output_dir
    if info is not None:
        line.update(seconds=round(info.seconds, 3), worker=info.worker, host=info.host, pid=info.pid)
    return line
