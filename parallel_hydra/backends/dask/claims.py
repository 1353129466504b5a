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
installs :class:`RunClaims`, a scheduler plugin holding the set of task names that have
started, and each task, before it runs, asks it to add its name (one round trip to the
scheduler). A second run finds the name taken and fails with
:class:`~parallel_hydra.errors.WorkerCrashedError` instead of running. As with the
files, a task that raises gives its claim back (``retries`` still run it again), and
the backend gives the others back once Dask has let the task go.

A scheduler that cannot load this module (one started from an environment without
parallel_hydra) cannot take the plugin: the backend then warns once and runs tasks
unclaimed, as Dask alone would.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Set, Tuple

from distributed.diagnostics.plugin import SchedulerPlugin

from ...errors import WorkerCrashedError
from ...start_log import CLAIM_GRACE

__all__ = ["RunClaims", "SchedulerClaims", "run_claimed"]

logger = logging.getLogger(__package__)

#: Seconds a task waits for the scheduler's answer to its claim before it runs
#: unclaimed (a worker cut off from its scheduler loses its results anyway).
_CLAIM_TIMEOUT = 30.0


class RunClaims(SchedulerPlugin):  # type: ignore[misc]
    """On the scheduler: the names of the tasks that have started and not given back.

    Installed once per scheduler (``idempotent``): every backend on the cluster shares
    it, with names made unique by a token of each backend.
    """

    name = "parallel_hydra-run-claims"
    idempotent = True

    def __init__(self) -> None:
        self._taken: Set[str] = set()

    async def start(self, scheduler: Any) -> None:
        scheduler.handlers["parallel_hydra_claim"] = self.claim
        scheduler.handlers["parallel_hydra_release"] = self.release
        scheduler.handlers["parallel_hydra_claimed"] = self.claimed

    # The handlers run on the scheduler's event loop, one message at a time: a claim
    # is a test-and-set no other message can come between.

    def claim(self, name: str) -> bool:
        if name in self._taken:
            return False
        self._taken.add(name)
        return True

    def release(self, names: List[str]) -> None:
        self._taken.difference_update(names)

    def claimed(self, names: List[str]) -> List[bool]:
        return [name in self._taken for name in names]


def _ask_scheduler(op: str, **message: Any) -> Any:
    """From a task on a worker: call the scheduler's handler ``op`` and wait for it."""
    from distributed import get_worker
    from distributed.utils import sync

    worker = get_worker()
    return sync(worker.loop, getattr(worker.scheduler, op), callback_timeout=_CLAIM_TIMEOUT, **message)


def run_claimed(name: str, fn: Callable[..., Any], args: List[Any], kwargs: Dict[str, Any]) -> Any:
    """On a worker: run one task of an executor once, under the claim ``name``.

    The arguments travel as plain arguments of this function, so Dask still replaces
    the futures among them, and any keyword name reaches ``fn``.
    """
    try:
        first = _ask_scheduler("parallel_hydra_claim", name=name)
    except Exception as exc:  # the scheduler cannot answer: run as Dask alone would
        logger.warning("could not claim the run of task %s on the Dask scheduler (%s); it runs unclaimed", name, exc)
        first = True
    if not first:
        raise WorkerCrashedError(
            f"task {getattr(fn, '__qualname__', fn)!s} had already started on a Dask worker that died or left (its "
            f"process crashed or was killed, or its batch job ended) before its result was fetched; Dask ran it "
            f"again, and it is not run a second time: it may have had effects"
        )
    try:
        return fn(*args, **kwargs)
    except BaseException:
        try:  # it failed: Dask's own retries may run it again
            _ask_scheduler("parallel_hydra_release", names=[name])
        except Exception as exc:
            logger.debug("could not give back the claim of task %s: %s", name, exc)
        raise


class SchedulerClaims:
    """The client's side: names for its tasks, and claims given back in batches."""

    def __init__(self, client: Any) -> None:
        client.register_plugin(RunClaims(), name=RunClaims.name)
        self._client = client
        self._prefix = f"{uuid.uuid4().hex}-"
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._due: Deque[Tuple[float, str]] = deque()  # (when, name) to give back

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

    def new_name(self) -> str:
        return f"{self._prefix}{next(self._numbers)}"

    def give_back(self, name: str, later: bool = False) -> None:
        """Give back ``name``'s claim: now, or ``CLAIM_GRACE`` seconds from now, once the
        scheduler has let the task go. Claims that have come due go back with it."""
        now = time.monotonic()
        names = [] if later else [name]
        with self._lock:
            if later:
                self._due.append((now + CLAIM_GRACE, name))
            while self._due and self._due[0][0] <= now:
                names.append(self._due.popleft()[1])
        self._send(names)

    def _send(self, names: List[str]) -> None:
        if names:  # not waited for: the client's loop sends it
            self._client.loop.add_callback(self._release, names)

    async def _release(self, names: List[str]) -> None:
        try:
            await self._client.scheduler.parallel_hydra_release(names=names)
        except Exception as exc:  # a lost scheduler keeps no claims to give back
            logger.debug("could not give back %d run claims: %s", len(names), exc)

    def held(self, names: Iterable[str]) -> Set[str]:
        """Which of ``names`` have claimed their run (asks the scheduler)."""
        names = list(names)
        if not names:
            return set()
        try:
            answers = self._client.sync(self._client.scheduler.parallel_hydra_claimed, names=names)
        except Exception as exc:  # cannot tell: count them as started, never withdrawn
            logger.debug("could not ask the scheduler for run claims: %s", exc)
            return set(names)
        return {name for name, taken in zip(names, answers) if taken}

    def close(self) -> None:
        """Give back every claim still due (the backend is done with its tasks)."""
        with self._lock:
            names = [name for _, name in self._due]
            self._due.clear()
        if names:
            try:
                self._client.sync(self._client.scheduler.parallel_hydra_release, names=names, callback_timeout=10)
            except Exception as exc:
                logger.debug("could not give back %d run claims: %s", len(names), exc)
