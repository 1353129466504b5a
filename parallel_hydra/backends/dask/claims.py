"""Runs claimed on the scheduler, for Dask workers that are not this machine's processes.

Dask may run a task a second time: when the worker holding a finished task's only
result dies (or its batch job ends) before the result was fetched, the scheduler
computes the task again from its lineage; when a worker dies while a task runs there,
it gives the task to another worker (up to ``distributed.scheduler.allowed-failures``
times). Either way a task that had started, and may have had effects, runs again.

On a cluster of worker processes on this machine the backend prevents that with files
(:func:`~parallel_hydra.start_log.claim_run`). Workers on other machines (a cluster
reached by ``address``, batch jobs on an HPC cluster) share no folder with it, but they
all talk to the scheduler. So there, the scheduler keeps the claims: the backend
installs :class:`RunClaims`, a scheduler plugin holding the keys of the tasks that have
started, and each task, before it runs, asks it to add its own key (one round trip to
the scheduler). A second run finds its key taken and fails with
:class:`~parallel_hydra.errors.WorkerCrashedError` instead of running. A task that
raises gives its claim back (``retries`` still run it again); the others go when the
scheduler forgets the task (no client wants it any more), so nothing is left behind
by a client that went away.

A scheduler that cannot load this module (one started from an environment without
parallel_hydra) cannot take the plugin: the backend then warns once and runs tasks
unclaimed, as Dask alone would.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Set

from distributed.diagnostics.plugin import SchedulerPlugin

from ...errors import WorkerCrashedError

__all__ = ["RunClaims", "SchedulerClaims", "run_claimed"]

logger = logging.getLogger(__package__)

#: Seconds a task waits for the scheduler's answer to its claim before it runs
#: unclaimed (a worker cut off from its scheduler loses its results anyway).
_CLAIM_TIMEOUT = 30.0


class RunClaims(SchedulerPlugin):  # type: ignore[misc]
    """On the scheduler: the keys of the tasks that have started and not given back.

    Installed once per scheduler (``idempotent``): every backend on the cluster shares
    it. A key leaves the set when its task raised, or when the scheduler forgets it.
    """

    name = "parallel_hydra-run-claims"
    idempotent = True

    def __init__(self) -> None:
        self._taken: Set[Any] = set()
        self._tasks: Any = {}

    async def start(self, scheduler: Any) -> None:
        self._tasks = scheduler.tasks
        scheduler.handlers["parallel_hydra_claim"] = self.claim
        scheduler.handlers["parallel_hydra_release"] = self.release
        scheduler.handlers["parallel_hydra_claimed"] = self.claimed

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "forgotten":
            self._taken.discard(key)

    # The handlers run on the scheduler's event loop, one message at a time: a claim
    # is a test-and-set no other message can come between.

    def claim(self, key: Any) -> bool:
        if key in self._taken:
            return False
        if key in self._tasks:  # (a task already forgotten, being cancelled, keeps no claim)
            self._taken.add(key)
        return True

    def release(self, key: Any) -> None:
        self._taken.discard(key)

    def claimed(self, keys: List[Any]) -> List[bool]:
        return [key in self._taken for key in keys]


def _ask_scheduler(op: str, **message: Any) -> Any:
    """From a task on a worker: call the scheduler's handler ``op`` and wait for it."""
    from distributed import get_worker
    from distributed.utils import sync

    worker = get_worker()
    return sync(worker.loop, getattr(worker.scheduler, op), callback_timeout=_CLAIM_TIMEOUT, **message)


_warned_unclaimed = False


def run_claimed(fn: Callable[..., Any], args: List[Any], kwargs: Dict[str, Any]) -> Any:
    """On a worker: run one task of an executor once, under a claim of its own key.

    The arguments travel as plain arguments of this function, so Dask still replaces
    the futures among them, and any keyword name reaches ``fn``.
    """
    global _warned_unclaimed
    from distributed import get_worker

    key = get_worker().get_current_task()
    try:
        first = _ask_scheduler("parallel_hydra_claim", key=key)
    except Exception as exc:  # the scheduler cannot answer: run as Dask alone would
        first = None
        reason = f"{type(exc).__name__}: {exc}"
    else:
        reason = f"the scheduler answered {first!r}"
    if first is False:
        raise WorkerCrashedError(
            f"task {getattr(fn, '__name__', None) or fn!s} had already started on a Dask worker that died or left (its "
            f"process crashed or was killed, or its batch job ended) before its result was fetched; Dask ran it "
            f"again, and it is not run a second time: it may have had effects"
        )
    if first is not True and not _warned_unclaimed:
        _warned_unclaimed = True
        logger.warning("could not claim a task's run on the Dask scheduler (%s); tasks run unclaimed", reason)
    try:
        return fn(*args, **kwargs)
    except Exception:
        # It failed, and its worker lives on: Dask's own retries may run it again.
        # (SystemExit and the like end the worker: the claim stays.)
        try:
            _ask_scheduler("parallel_hydra_release", key=key)
        except Exception as exc:
            logger.debug("could not give back the claim of task %s: %s", key, exc)
        raise


class SchedulerClaims:
    """The client's side: the plugin installed, and which tasks have claimed their run."""

    def __init__(self, client: Any) -> None:
        client.register_plugin(RunClaims(), name=RunClaims.name)
        self._client = client

    @classmethod
    def install(cls, client: Any, address: str) -> "SchedulerClaims | None":
        """Claims on ``client``'s scheduler; ``None`` (with a warning) where it cannot
        take the plugin."""
        try:
            return cls(client)
        except Exception as exc:
            logger.warning(
                "the Dask scheduler at %s cannot keep parallel_hydra's run claims (%s: %s); is parallel_hydra "
                "installed where the scheduler runs? Without them, Dask may run a task a second time after its "
                "worker died", address, type(exc).__name__, exc,
            )
            return None

    def held(self, keys: Iterable[Any]) -> Set[Any]:
        """Which of the tasks of ``keys`` have claimed their run (asks the scheduler)."""
        keys = list(keys)
        if not keys:
            return set()
        try:
            answers = self._client.sync(self._client.scheduler.parallel_hydra_claimed, keys=keys, callback_timeout=10)
        except Exception as exc:  # cannot tell: count them as started, never withdrawn
            logger.debug("could not ask the scheduler for run claims: %s", exc)
            return set(keys)
        return {key for key, taken in zip(keys, answers) if taken}
