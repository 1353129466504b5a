"""The exceptions a task's future can end with, the same on every engine.

An engine reports a failure in its own words (loky's ``TerminatedWorkerError``, Dask's
``KilledWorker``, Ray's ``WorkerCrashedError``); the backends translate those into the
types below and keep the engine's error as ``__cause__``, so code that handles a crash
is written once, whatever engine runs it.
"""

from __future__ import annotations

import signal
from concurrent.futures import BrokenExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Optional

__all__ = ["WorkerCrashedError", "NeighborCrashedError", "EngineLostError", "UnsendableExceptionError", "describe_exit"]


def describe_exit(exitcode: Optional[int]) -> str:
    """How a process ended, in words, from its exit code (negative: the signal).

    >>> describe_exit(-9), describe_exit(3), describe_exit(None)
    ('killed by SIGKILL', 'exit code 3', 'it died')
    """
    if exitcode is None:
        return "it died"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class WorkerCrashedError(BrokenProcessPool):
    """The process running this task died before the task returned.

    A segmentation fault, ``os._exit``, a ``SIGKILL`` (the out-of-memory killer's
    signal) or a ``sys.exit`` that took the worker down. The task that was running in
    that process fails; the executor's other tasks are kept if they finished, and run
    again if they had not started; the executor stays usable. A subclass of
    ``concurrent.futures.process.BrokenProcessPool``, so code written for the standard
    process pool catches it too.
    """


class NeighborCrashedError(WorkerCrashedError):
    """This task did nothing wrong: another task's crash stopped it.

    A loky pool is all or nothing: when one of its workers dies, loky kills the others
    too, with the tasks they were running (or whose results were on their way back).
    Those tasks had started, so they may have had effects (files written, rows
    inserted); running them again could do that twice, so they fail with this error and
    the caller decides. A task that had not started yet is run again on new workers
    instead. The joblib backend raises it, and the Dask backend for a task that shared
    a worker process (``threads_per_worker`` above 1) with one the ``RUNNING`` policy
    stopped; otherwise on Ray and Dask one worker's death stops only its own task.
    """


class UnsendableExceptionError(Exception):
    """A task raised an exception that could not be sent back, not even rebuilt as its
    own class (see :mod:`parallel_hydra.sendable`): this one says which, with the
    message and the worker's traceback as text."""


class EngineLostError(BrokenExecutor):
    """The engine behind the executor is gone: a cluster's scheduler or head died, or
    the connection to it was lost.

    Every task of the executor that had not finished fails with this error, and the
    executor accepts no more tasks. The message names the address of the cluster.
    """
