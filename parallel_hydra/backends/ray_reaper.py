"""Hearing of many Ray tasks' ends in batches, on one thread.

A completion callback per ObjectRef (``ref._on_completed``) costs Ray about a tenth
more per tiny task than one ``ray.get`` of all the refs: every callback fetches and
unpickles its own object on Ray's callback thread, competing for the GIL with the
thread that submits. When an executor hands Ray every task at once (its policy never
cancels pending tasks and Ray's own scheduler bounds concurrency), nothing waits on one
task's end to hand over the next, so the backend collects results the way a Ray user
does: ``ray.wait`` on the oldest refs, then one ``ray.get`` of those that are ready.

Tasks mostly end in the order Ray was given them, so the reaper watches a window of
the oldest unfinished refs. It waits until all of them are ready, or ``_PATIENCE``
seconds; if the oldest is still running then (a long task), it also looks, without
waiting, at the refs after the window, so that tasks behind a long one are reported
within ``_PATIENCE`` of their end, not when it ends. After a round in which nothing
ended (long tasks), the reaper waits for the *first* of them to end instead, up to
``_MAX_PATIENCE`` at a time: hours of running tasks cost a few calls a second, not a
hundred, and the first end is reported at once.
"""

from __future__ import annotations

import itertools
import logging
import threading
from typing import Any, Callable, Dict, List, Optional

__all__ = ["BatchReaper"]

logger = logging.getLogger(__name__)

#: Refs waited on at once: enough for a batch, few enough that a wait stays cheap.
_WINDOW = 64
#: The longest a finished task waits to be reported while tasks keep ending (seconds).
_PATIENCE = 0.01
#: How long one wait for the first end lasts, once tasks have stopped ending.
_MAX_PATIENCE = 0.2
#: Windows looked at beyond the first when the oldest task is still running.
_LOOK_AHEAD = 4

#: ``report(value_or_ray_error)`` for a task that ended; ``fail(exception)`` for one
#: whose result could not be had (it could not be unpickled here, say).
Report = Callable[[Any], None]
Fail = Callable[[BaseException], None]


class _Entry:
    __slots__ = ("key", "token", "report", "fail")

    def __init__(self, key: int, token: Any, report: Report, fail: Fail) -> None:
        self.key = key
        self.token = token
        self.report = report
        self.fail = fail


class BatchReaper:
    """One thread that reports the ends of the tasks it is given, in submission order
    mostly and in batches.

    A token is ``running`` while its task is unreported (the runner's ``state``). An
    entry leaves the reaper as soon as it is reported, so that nothing holds a
    reported task's ObjectRef (and its result in Ray's object store); entries whose
    tokens ended another way (withdrawn, stopped, failed because the cluster was lost)
    are dropped when the reaper comes across them, without asking Ray about them.
    """

    def __init__(self, ray: Any) -> None:
        self._ray = ray
        self._error_type = ray.exceptions.RayError
        self._changed = threading.Condition()
        # Insertion-ordered: the oldest unreported task first. Keyed by a counter.
        self._entries: Dict[int, _Entry] = {}
        self._counter = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def add(self, token: Any, report: Report, fail: Fail) -> None:
        """Report the end of ``token.ref``'s task to ``report`` (or ``fail``)."""
        with self._changed:
            if self._closed:
                raise RuntimeError("the backend was shut down")
            key = next(self._counter)
            self._entries[key] = _Entry(key, token, report, fail)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="parallel_hydra-ray-reaper", daemon=True)
                self._thread.start()
            elif len(self._entries) == 1:
                self._changed.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread once the tasks it watches have ended (or at once, if none)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        quiet = False  # nothing ended in the last round
        while True:
            window = self._next_window()
            if window is None:
                return
            try:
                quiet = not self._reap(window, quiet)
            except Exception as exc:  # Ray itself failed: a lost cluster, or shut down
                with self._changed:
                    closed = self._closed
                if closed:  # Ray's session is gone with the backend: nothing will end
                    self._fail_all(RuntimeError(f"the Ray backend was shut down before the task ended ({exc})"))
                    return
                logger.debug("reaping Ray results failed: %s", exc)
                with self._changed:
                    self._changed.wait(_MAX_PATIENCE)

    def _next_window(self) -> Optional[List[_Entry]]:
        """The oldest unreported entries (at least one); ``None`` when closed with
        nothing left."""
        limit = _WINDOW * (_LOOK_AHEAD + 1)
        with self._changed:
            while True:
                window, dropped = [], []
                for key, entry in self._entries.items():
                    if entry.token.state != "running":
                        dropped.append(key)
                    else:
                        window.append(entry)
                        if len(window) == limit:
                            break
                for key in dropped:
                    del self._entries[key]
                if window:
                    return window
                if self._closed:
                    return None
                self._changed.wait()

    def _fail_all(self, error: BaseException) -> None:
        with self._changed:
            entries = list(self._entries.values())
            self._entries.clear()
        for entry in entries:
            entry.fail(error)

    def _forget(self, ended: List[_Entry]) -> None:
        with self._changed:
            for entry in ended:
                self._entries.pop(entry.key, None)

    def _reap(self, candidates: List[_Entry], quiet: bool) -> bool:
        """Report the candidates that end in this round; whether any did.

        A round waits until the whole window has ended, or ``_PATIENCE``; when the
        last round was ``quiet``, it first waits (up to ``_MAX_PATIENCE``) for any
        candidate to end, then takes whatever has ended without waiting more."""
        ray = self._ray
        if quiet:
            first, _ = ray.wait([e.token.ref for e in candidates], num_returns=1, timeout=_MAX_PATIENCE, fetch_local=True)
            if not first:
                return False
        window = candidates[:_WINDOW]
        refs = [e.token.ref for e in window]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0 if quiet else _PATIENCE, fetch_local=True)
        done = set(ready)
        ended = [e for e in window if e.token.ref in done]
        if window[0].token.ref not in done and len(candidates) > len(window):
            # The oldest task is slow: report what ended behind it too, without waiting.
            later = candidates[len(window) :]
            more, _ = ray.wait([e.token.ref for e in later], num_returns=len(later), timeout=0, fetch_local=True)
            done = set(more)
            ended += [e for e in later if e.token.ref in done]
        if ended:
            self._forget(ended)
            self._deliver(ended)
        return bool(ended)

    def _deliver(self, ended: List[_Entry]) -> None:
        """Fetch the results of ``ended`` (all ready) and report each one."""
        try:
            values = self._ray.get([e.token.ref for e in ended])
        except BaseException:  # one of them failed: fetch each on its own
            for entry in ended:
                self._deliver_one(entry)
            return
        for entry, value in zip(ended, values):
            entry.report(value)

    def _deliver_one(self, entry: _Entry) -> None:
        ref = entry.token.ref
        try:
            value = self._ray.get(ref)
        except self._error_type as error:
            # The task failed. ray.get raises a copy of Ray's error that has lost the
            # worker's full traceback (which says, for one, whether the task raised or
            # its result could not be pickled); a completion callback gets the error
            # itself, as it does when results are not collected in batches.
            on_completed = getattr(ref, "_on_completed", None)
            if on_completed is not None:
                on_completed(entry.report)
            else:  # pragma: no cover - a Ray without the private hook
                entry.report(error)
            return
        except BaseException as error:  # e.g. unpickling the result raised here
            entry.fail(error)
            return
        entry.report(value)
