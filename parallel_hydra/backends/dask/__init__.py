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

Where things are:

* :mod:`.backend`: :class:`DaskParallelBackend` itself: starting a local cluster or
  connecting to one, shutting down, counting worker threads, the object store
  (``put``/``get``/``wrap``/``wait``), and making executors.
* :mod:`.runner`: how an executor's tasks become Dask futures and how their outcomes
  come back: submitting, per-task options, results pickled on the worker, and Dask's
  failures turned into ours (a dead worker, a lost scheduler, unpicklable data).
* :mod:`.workers`: the workers of the backend's cluster: waiting until they have
  joined, and stopping tasks that run on them (cancelling on the scheduler, killing
  the worker processes of a cluster the backend started, and keeping that cluster whole
  while its nannies restart them).

The engine is imported here, once: every submodule takes ``distributed`` from this
package, so a missing Dask is reported by :func:`_import_engine` whichever of them is
imported first.
"""

from __future__ import annotations

from typing import Any


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

from .backend import DaskParallelBackend  # noqa: E402

__all__ = ["DaskParallelBackend"]
