"""The Ray backend: a local Ray runtime, or a Ray cluster reached by ``address``.

Lifecycle
---------
With no ``address`` and no Ray already initialised in this process, the backend starts a
*new* local runtime (``ray.init(address="local")``, so it never attaches to a cluster
left behind by someone else) on 127.0.0.1, and stops it again at ``shutdown``. With an
``address`` it connects to that cluster and only disconnects at ``shutdown``: the
cluster keeps running. When user code already called ``ray.init``, the backend reuses
that session and never shuts it down.

Reaching a cluster is bounded by ``connect_timeout``: before Ray is asked to connect,
the cluster's port is probed with plain TCP connects, because ``ray.init`` itself keeps
retrying an unreachable address for minutes and then names another address than the
one the user wrote.

Tasks
-----
Each plain Python function becomes a Ray remote function once per backend (a weak
cache), with the config's ``task`` options as its defaults; per-call options of
``executor.with_options`` go through ``.options()``. Other callables (builtins,
``functools.partial``, bound methods, callable objects) run through one shared
trampoline remote function. Completion comes by callback on the ``ObjectRef``, never by
polling, and a failed task reports the task's own exception, not Ray's wrapper.
Stopping a running task force-cancels it, which kills its worker process.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pickle
import signal
import socket
import sys
import threading
import time
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from ..backend import BaseParallelBackend, SizedJoblibBackend, available_cpus
from ..config import ParallelConfig, RayConfig, RayTaskOptions, plain
from ..errors import EngineLostError, WorkerCrashedError
from ..executor import DoneCallback, NamedAfter, TaskRunner
from ..in_task import InTask
from .network import is_loopback, split_host_port, wait_for_listener
from .ray_reaper import BatchReaper

__all__ = ["RayParallelBackend"]

logger = logging.getLogger(__name__)

#: The per-task option names Ray accepts from us (the fields of ``RayTaskOptions``).
TASK_OPTION_KEYS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RayTaskOptions))

#: Environment variable through which Ray clients opt in to token authentication.
_AUTH_MODE_ENV = "RAY_AUTH_MODE"

#: Seconds stop() waits for force-cancelled tasks to be gone before it gives up.
_STOP_TIMEOUT = 30.0

#: Seconds a verdict on whether some node can run a task's resources is reused.
_PLACEMENT_TTL = 2.0

#: The address forms the Ray backend takes, for error messages.
_ADDRESS_FORMS = "auto, HOST:PORT or ray://HOST:PORT"

#: How often the watch of a joined cluster's head probes it, and for how long the head
#: may refuse connections (it is gone) or not answer (unreachable) before the session
#: counts as lost.
_WATCH_INTERVAL = 0.5
_LOST_REFUSED = 1.5
_LOST_SILENT = 30.0


def _stat_fields(pid: int) -> Optional[List[bytes]]:
    """Fields 3 onwards of ``/proc/PID/stat`` (state, ppid, ...); None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in (b"Z", b"X") else fields


def _runtime_family(ray: Any) -> Dict[int, bytes]:
    """The processes of the local runtime this process started, ``{pid: start time}``:
    those Ray lists (GCS, raylet, monitors) and all their descendants (agents, workers).

    Read from ``/proc``, so only on Linux (elsewhere: empty). The start time tells a
    process from a later one that reuses its PID.
    """
    node = getattr(getattr(ray, "_private", None) and ray._private.worker, "_global_node", None)
    listed = getattr(node, "all_processes", None) or {}
    roots = {info.process.pid for infos in listed.values() for info in infos if getattr(info, "process", None)}
    if not roots or not os.path.isdir("/proc"):
        return {}
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None:
                stats[int(name)] = fields
    family = {pid for pid in roots if pid in stats}
    while True:
        children = {pid for pid, fields in stats.items() if int(fields[1]) in family} - family
        if not children:
            break
        family |= children
    return {pid: stats[pid][19] for pid in family}


def _end_leftovers(family: Dict[int, bytes], grace: float = 5.0) -> None:
    """After ``ray.shutdown()``: kill what is left of a local runtime this process started.

    When its GCS or raylet died first (killed from outside), ``ray.shutdown`` cannot
    stop the rest: Ray's agents, children of the raylet, outlive it. Only the processes
    in ``family`` are touched, by PID and start time.
    """
    def alive() -> List[int]:
        return [pid for pid, started in family.items() if (_stat_fields(pid) or [b""] * 20)[19] == started]

    end = time.monotonic() + grace
    left = alive()
    while left and time.monotonic() < end:
        time.sleep(0.1)
        left = alive()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if left:
        logger.warning("killed %d process(es) left by the local Ray runtime: %s", len(left), left)


class _SharedSession:
    """The one Ray session of this process, shared by the backends that opened or joined it.

    Ray allows one session per process. The first backend opens it (a local runtime, or
    a cluster joined by address); later backends share it; the last one to leave stops
    it (or disconnects). A session that user code opened is used but never counted, and
    never stopped. A cluster joined by address is watched (:class:`_HeadWatch`), so that
    its head's death fails our tasks instead of leaving them waiting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._joined = False
        self._watch: Optional["_HeadWatch"] = None
        # The processes of a local runtime the session started, as seen when it started.
        self._family: Dict[int, bytes] = {}

    @property
    def users(self) -> int:
        return self._users

    def acquire(self, ray: Any, open_session: Callable[[], bool]) -> Tuple[bool, bool]:
        """Use the session, opening it with ``open_session`` if Ray runs nowhere yet.

        ``open_session`` returns whether it joined a cluster by address. Returns
        ``(counted, joined)``: whether the caller counts among the session's users (it
        must then :meth:`release` it), and whether the session is a joined cluster.
        """
        with self._lock:
            if ray.is_initialized():
                if self._users > 0:
                    self._users += 1
                    logger.info("reusing the Ray session of another ray backend")
                    return True, self._joined
                logger.info("Ray is already initialised in this process; using that session (not stopping it at shutdown)")
                return False, False
            joined = open_session()
            self._users += 1
            self._joined = joined
            self._family = {} if joined else _runtime_family(ray)
            return True, joined

    def watch(self, host: str, port: int, what: str) -> "_HeadWatch":
        """Start watching the head of the session's cluster (once per session)."""
        with self._lock:
            if self._watch is None:
                self._watch = _HeadWatch(host, port, what)
            return self._watch

    def release(self, ray: Any, address: Optional[str]) -> None:
        """Stop using the session; the last user stops it (or disconnects from it)."""
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            watch, self._watch = self._watch, None
            if watch is not None:
                watch.close()
            if self._joined:
                # We only joined this cluster: disconnect this driver; the cluster keeps
                # running (ray.shutdown stops only what its ray.init started).
                logger.info("disconnecting from the Ray cluster at %r", address)
                self._joined = False
                ray.shutdown()
                return
            # We (or a backend we shared with) started it: stop it, and whatever of it
            # ray.shutdown could not stop (a runtime whose GCS or raylet died first).
            logger.info("stopping the local Ray runtime")
            family = {**self._family, **_runtime_family(ray)}
            self._family = {}
            ray.shutdown()
            _end_leftovers(family)


_session = _SharedSession()


class _HeadWatch:
    """Watches the head of the session's cluster (joined, or the local runtime this
    process started); when it is gone, tells its listeners.

    Ray 2.60 gives a driver no word when the head dies. If the driver shares the
    head's node (its raylet and object store), Ray ends the whole process once its
    connection to the object store breaks; otherwise the driver's calls retry for
    ``gcs_rpc_server_reconnect_timeout_s`` (60 s) before Ray ends the process too. Our
    tasks' ObjectRefs never settle in between. So a thread probes the head's port
    (a plain TCP connect, twice a second): once it refuses connections for
    ``_LOST_REFUSED`` seconds (or does not answer for ``_LOST_SILENT``), every listener
    is told, and fails its tasks with :class:`EngineLostError`.
    """

    def __init__(self, host: str, port: int, what: str) -> None:
        self._host, self._port, self._what = host, port, what
        self._listeners: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.lost: Optional[EngineLostError] = None
        self._thread = threading.Thread(target=self._run, name="parallel_hydra-ray-head-watch", daemon=True)
        self._thread.start()

    def add(self, listener: Any) -> None:
        """``listener.engine_lost(error)`` is called once the head is gone."""
        with self._lock:
            self._listeners.add(listener)

    def discard(self, listener: Any) -> None:
        with self._lock:
            self._listeners.discard(listener)

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failing_since: Optional[float] = None
        while not self._stop.wait(_WATCH_INTERVAL):
            try:
                with socket.create_connection((self._host, self._port), timeout=5.0):
                    pass
            except ConnectionRefusedError as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since >= _LOST_REFUSED:
                    self._declare_lost(f"its head refuses connections ({exc})")
                    return
            except OSError as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since >= _LOST_SILENT:
                    self._declare_lost(f"its head has not answered for {_LOST_SILENT:.0f} s ({exc})")
                    return
            else:
                failing_since = None

    def confirm_lost(self, within: float = 3.0) -> bool:
        """Whether the head is gone, checked now (a task just failed with a dead node):
        it counts as gone once it refuses connections within ``within`` seconds."""
        end = time.monotonic() + within
        while self.lost is None and time.monotonic() < end:
            try:
                with socket.create_connection((self._host, self._port), timeout=1.0):
                    pass
            except ConnectionRefusedError as exc:
                self._declare_lost(f"its head refuses connections ({exc})")
                break
            except OSError:
                pass
            time.sleep(0.2)
        return self.lost is not None

    def _declare_lost(self, why: str) -> None:
        error = EngineLostError(
            f"lost {self._what}: {why}. Its tasks cannot "
            f"finish; Ray will end this process once it gives up on the cluster."
        )
        with self._lock:
            self.lost = error
            listeners = list(self._listeners)
        logger.error("%s", error)
        for listener in listeners:
            try:
                listener.engine_lost(error)
            except Exception:  # pragma: no cover - one listener must not spare the others
                logger.exception("could not fail the tasks of a lost Ray cluster")


def _import_ray() -> Any:
    """Import Ray, keeping a local runtime on loopback; a clear error if it is missing."""
    if "ray" not in sys.modules:
        # Ray reads this at import time; "0" keeps single-node runtimes on 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - exercised only without ray
        raise ImportError(
            "the ray backend needs Ray, which is not installed: pip install 'parallel-hydra[ray]'"
        ) from exc
    return ray


# -- options ----------------------------------------------------------------------


def _ray_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Drop unset (None) options, and make every container a plain one for Ray."""
    return {key: plain(value) for key, value in options.items() if value is not None}


def check_task_options(options: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate per-call Ray task options; return them as plain values.

    Raises ``ValueError`` naming the bad key and the allowed ones, and validates values
    the same way the ``task`` config does.
    """
    options = plain(dict(options))
    unknown = sorted(set(options) - set(TASK_OPTION_KEYS))
    if unknown:
        raise ValueError(
            f"unknown Ray task option {unknown[0]!r}; allowed options: {', '.join(TASK_OPTION_KEYS)}"
        )
    if "max_calls" in options:
        raise ValueError("the Ray task option 'max_calls' can be set only in the config (task.max_calls), "
                         "not per call: Ray fixes it when a remote function is made")
    # Reuse the config's validation of values (it raises ValueError naming the field).
    RayTaskOptions(**options)
    return dict(options)


# -- remote functions ---------------------------------------------------------------


def _make_trampoline() -> Callable[..., Any]:
    """A function that runs any callable in a Ray worker (for non-function callables).

    It is made inside this function so that Ray pickles it by value: workers of a
    cluster need not have ``parallel_hydra`` installed to run it.
    """

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    call.__name__ = call.__qualname__ = "parallel_hydra_call"
    return call


class _TokenNotice(logging.Filter):
    """Drops Ray's notice that token authentication is on (its default), printed on
    every start of a local runtime; its warning that authentication is *off* stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled")


#: The logger of Ray's authentication notices.
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


def _quiet_token_notice(logging_level: int) -> None:
    """At the default ``logging_level`` (WARNING) and above, hide the token notice."""
    log = logging.getLogger(_TOKEN_LOGGER)
    if logging_level >= logging.WARNING and not any(isinstance(f, _TokenNotice) for f in log.filters):
        log.addFilter(_TokenNotice())


class _RemoteCache:
    """One Ray remote function per Python function, made once and reused.

    ``ray.remote`` pickles and exports a function to the cluster; doing that on every
    submit would cost far more than a trivial task. A remote function holds its Python
    function, so a weak cache would never drop anything: the cache keeps the most
    recently used ``MAX_FUNCTIONS`` instead, so that lambdas made in a loop do not pile up.
    """

    MAX_FUNCTIONS = 256

    def __init__(self, ray: Any, defaults: Mapping[str, Any]) -> None:
        self._ray = ray
        self._defaults = dict(defaults)
        self._lock = threading.Lock()
        self._functions: "OrderedDict[Any, Any]" = OrderedDict()
        self._trampoline: Any = None

    def __len__(self) -> int:
        return len(self._functions)

    def lookup(self, fn: Callable[..., Any]) -> Tuple[Any, bool]:
        """The remote function for ``fn``, and whether ``fn`` must be passed as first argument."""
        import inspect

        # A task the executor wrapped (thread cap, log capture) is cached by what it
        # wraps: Ray takes only functions, so it goes out as a function made once.
        key: Any = fn.key if isinstance(fn, InTask) and inspect.isfunction(fn.fn) else fn
        if key is not fn or inspect.isfunction(fn):
            with self._lock:
                remote = self._functions.get(key)
                if remote is None:
                    target = fn.as_function() if isinstance(fn, InTask) else fn
                    remote = self._ray.remote(**self._defaults)(target) if self._defaults else self._ray.remote(target)
                    self._functions[key] = remote
                    if len(self._functions) > self.MAX_FUNCTIONS:
                        self._functions.popitem(last=False)
                else:
                    self._functions.move_to_end(key)
            return remote, False
        return self._wrapped_trampoline(), True

    def _wrapped_trampoline(self) -> Any:
        if self._trampoline is None:
            with self._lock:
                if self._trampoline is None:
                    remote = self._ray.remote(**self._defaults) if self._defaults else self._ray.remote
                    self._trampoline = remote(_make_trampoline())
        return self._trampoline

    def clear(self) -> None:
        with self._lock:
            self._functions.clear()
            self._trampoline = None


def _submit(cache: _RemoteCache, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Mapping[str, Any], options: Mapping[str, Any]) -> Any:
    """Start ``fn(*args, **kwargs)`` as a Ray task; return its ObjectRef."""
    remote, via_trampoline = cache.lookup(fn)
    if options:
        remote = remote.options(**options)
    if via_trampoline:
        return remote.remote(fn, *args, **kwargs)
    return remote.remote(*args, **kwargs)


def _task_name(fn: Any) -> str:
    """A readable name of a task's callable, for messages."""
    if isinstance(fn, InTask):  # the executor's wrapper: name what it wraps (and cheaply)
        fn = fn.fn
    if isinstance(fn, NamedAfter):  # a map's chunk: named after the user's function
        fn = fn.fn
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None and not hasattr(fn, "__qualname__"):
        return f"partial({_task_name(inner)})"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if not isinstance(name, str):
        return repr(fn)[:80]
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if isinstance(module, str) and module not in ("builtins", "__main__") else name


class _RemoteTraceback(Exception):
    """The traceback of a task's exception in the Ray worker, as text.

    Attached as the ``__cause__`` of the exception a future raises, so that the frames
    of the function that raised (gone with the worker) still show in its traceback.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _remote_traceback_text(traceback_str: str) -> str:
    # Ray's own frame (its Cython task loop) says nothing to the user: drop it.
    lines = [line for line in traceback_str.rstrip().splitlines() if 'File "python/ray/_raylet.pyx"' not in line]
    body = "\n".join(lines)
    return f'\n"""\n(in the Ray worker)\n{body}\n"""'


def _attach_remote_traceback(exc: BaseException, traceback_str: Optional[str]) -> None:
    """Hang the worker's traceback text at the end of ``exc``'s chain of causes."""
    if not traceback_str:
        return
    end, seen = exc, 0
    while end.__cause__ is not None and seen < 20:
        if isinstance(end.__cause__, _RemoteTraceback):
            return  # already attached
        end, seen = end.__cause__, seen + 1
    end.__cause__ = _RemoteTraceback(_remote_traceback_text(traceback_str))


def _unwrap(ray: Any, exc: BaseException) -> BaseException:
    """The task's own exception behind Ray's ``RayTaskError`` wrapper, with the
    worker's traceback as its cause."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            # The instance ray.get raises (of a class made from RayTaskError and the
            # cause's class) has no traceback_str; its text holds the traceback.
            _attach_remote_traceback(cause, getattr(exc, "traceback_str", None) or str(exc))
            return cause
    return exc


def _is_serialization_error(exc: BaseException) -> bool:
    """Whether ``exc`` (raised by ``.remote()``) says an argument or the function could
    not be pickled."""
    return isinstance(exc, (TypeError, pickle.PicklingError)) and str(exc).startswith("Could not serialize")


def _pickling_error(name: str, exc: BaseException) -> pickle.PicklingError:
    """Ray's complaint about an unpicklable argument of task ``name``, in our words."""
    # Ray's message opens with "Could not serialize the argument <obj> for a task or
    # actor <fn>:", then pages of its serializability check: keep the first line, and
    # the innermost reason.
    first = str(exc).strip().splitlines()[0].rstrip(":")
    inner = exc
    while inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    reason = f" ({inner})" if inner is not exc else ""
    error = pickle.PicklingError(f"task {name}: an argument could not be pickled to send it to Ray: {first}{reason}")
    error.__cause__ = exc
    return error


# -- the executor's engine side --------------------------------------------------------


def _unpickling_error(token: "_RayTask", what: Any, cause: BaseException) -> pickle.UnpicklingError:
    """The error of a task whose result came back but could not be unpickled here."""
    error = pickle.UnpicklingError(f"task {token.name}: its result could not be unpickled in this process: {what!r}")
    error.__cause__ = cause
    return error


class _RayTask:
    """The token of one task handed to Ray: its ObjectRef and what the runner knows of it.

    ``state`` is ``running`` until the task ends one way: ``done`` (reported),
    ``withdrawn`` (taken back unstarted) or ``stopped`` (force-cancelled).
    """

    __slots__ = ("ref", "name", "on_done", "demand", "unplaceable", "state")

    def __init__(self, name: str, on_done: DoneCallback, demand: "_Demand") -> None:
        self.ref: Any = None
        self.name = name
        self.on_done: Optional[DoneCallback] = on_done
        self.demand = demand
        self.unplaceable = False
        self.state = "running"


#: A task's resource demand: sorted ``(resource, amount)`` pairs of nonzero amounts.
_Demand = Tuple[Tuple[str, float], ...]


def _demand_of(options: Mapping[str, Any]) -> _Demand:
    """What a task with these (merged) Ray options reserves on a node."""
    demand: Dict[str, float] = {}
    cpus = options.get("num_cpus")
    demand["CPU"] = 1.0 if cpus is None else float(cpus)  # Ray's default for a task
    demand["GPU"] = float(options.get("num_gpus") or 0.0)
    demand["memory"] = float(options.get("memory") or 0.0)
    for name, amount in (options.get("resources") or {}).items():
        demand[str(name)] = float(amount)
    return tuple(sorted((name, amount) for name, amount in demand.items() if amount > 0))


def _fits(demand: _Demand, totals: Sequence[Mapping[str, float]]) -> bool:
    """Whether some node with these total resources can run a task of ``demand``."""
    return any(all(node.get(name, 0.0) + 1e-9 >= amount for name, amount in demand) for node in totals)


def _describe_nodes(totals: Sequence[Mapping[str, float]]) -> str:
    if not totals:
        return "no alive node"
    shown = []
    for node in totals:
        parts = []
        for name, amount in sorted(node.items()):
            if name.startswith("node:") or name == "object_store_memory":
                continue
            parts.append(f"{name}: {amount:g}")
        shown.append("{" + ", ".join(parts) + "}")
    return f"{len(totals)} alive node(s) with " + ", ".join(shown)


class _RayRunner(TaskRunner):
    """Runs one executor's tasks as Ray tasks of the backend's session."""

    def __init__(self, backend: "RayParallelBackend") -> None:
        self._backend = backend
        self._ray = backend._ray
        self._cache = backend._remote_cache
        exceptions = self._ray.exceptions
        self._error_type = exceptions.RayError
        self._task_error = exceptions.RayTaskError
        self._crash_errors = tuple(
            getattr(exceptions, name)
            for name in ("WorkerCrashedError", "OutOfMemoryError", "NodeDiedError", "LocalRayletDiedError")
            if hasattr(exceptions, name)
        )
        self._node_errors = tuple(
            getattr(exceptions, name) for name in ("NodeDiedError", "LocalRayletDiedError") if hasattr(exceptions, name)
        )
        self._system_error = exceptions.RaySystemError
        self._lock = threading.Lock()
        self._live: Set[_RayTask] = set()
        self._base_demand = _demand_of(backend._task_defaults)
        self._demands: Dict[int, Tuple[Mapping[str, Any], _Demand]] = {}
        self._reaper: Optional[BatchReaper] = None  # set when tasks' ends are heard in batches
        watch = backend._watch
        if watch is not None:
            watch.add(self)

    def check_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        return check_task_options(options)

    def expect_in_flight(self, limit: float) -> None:
        # Every task handed over at once: nothing waits on one task's end, so results
        # are collected in batches, cheaper than a callback per task (see ray_reaper).
        # Only on a runtime this process started: the reaper looks at the oldest few
        # hundred tasks, and a large joined cluster may run more than that at once.
        if math.isinf(limit) and self._backend._owns_runtime():
            self._reaper = self._backend._batch_reaper()

    def enforces_bound(self, max_workers: int) -> bool:
        # True only when the cluster has no room for more than max_workers of our tasks
        # (with the config's task options), so Ray's own scheduler is the bound. Only a
        # runtime this process started has a known, fixed size: a cluster joined by
        # address may autoscale, or gain nodes started by hand.
        if not self._backend._owns_runtime():
            return False
        slots = self._backend._task_slots(exact=True)
        return slots is not None and slots <= max_workers

    def can_withdraw(self, max_workers: int) -> bool:
        # A task that no node can run waits in Ray unstarted: it can be taken back.
        return True

    def lends_while_waiting(self) -> bool:
        # In a Ray task, Ray lends the task's CPU (and other resources) to other tasks
        # while the task's own thread is blocked in ray.wait or ray.get, and only then.
        try:
            return bool(self._ray.get_runtime_context().worker.mode == self._ray.WORKER_MODE)
        except Exception:  # pragma: no cover - Ray internals moved: wait as anywhere else
            return False

    def wait_any(self, tokens: List[Any], timeout: float) -> List[Any]:
        refs = {token.ref: token for token in tokens if token.ref is not None}
        if not refs:
            time.sleep(min(timeout, 0.01))
            return []
        ready, _ = self._ray.wait(list(refs), num_returns=1, timeout=timeout, fetch_local=False)
        return [refs[ref] for ref in ready]

    def _demand(self, options: Mapping[str, Any]) -> _Demand:
        if not options:
            return self._base_demand
        cached = self._demands.get(id(options))
        if cached is None or cached[0] is not options:
            merged = dict(self._backend._task_defaults)
            merged.update({key: value for key, value in options.items() if value is not None})
            cached = (options, _demand_of(merged))
            if len(self._demands) > 256:
                self._demands.clear()
            self._demands[id(options)] = cached
        return cached[1]

    def start(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Mapping[str, Any], on_done: DoneCallback) -> Any:
        watch = self._backend._watch
        if watch is not None and watch.lost is not None:
            raise watch.lost
        demand = self._demand(options)
        token = _RayTask(_task_name(fn), on_done, demand)
        token.unplaceable = not self._backend._placeable(demand, token.name)
        try:
            ref = _submit(self._cache, fn, args, kwargs, options)
        except Exception as exc:
            if _is_serialization_error(exc):
                raise _pickling_error(token.name, exc) from None
            raise
        token.ref = ref
        with self._lock:
            self._live.add(token)

        def completed(value: Any) -> None:
            try:
                self._completed(token, value)
            except BaseException as exc:  # Ray would only log it: the future must end
                self._report(token, False, exc)

        if self._reaper is not None:
            try:
                self._reaper.add(token, completed, lambda exc: self._report(token, False, self._unfetchable(token, exc)))
            except RuntimeError:
                # The backend shut down between the submission and here: nothing would
                # hear of this task's end, so it must not run on unwatched.
                try:
                    self.stop([token])
                except Exception as exc:  # Ray itself is already gone: so is the task
                    logger.debug("could not stop a task refused at shutdown: %s", exc)
                raise
            return token
        on_completed = getattr(ref, "_on_completed", None)
        if on_completed is not None:
            # Measured here: ~7% cheaper per task than ObjectRef.future() callbacks.
            on_completed(completed)
        else:  # pragma: no cover - a Ray without the private hook
            ref.future().add_done_callback(
                lambda f: self._completed(token, f.exception() if f.exception() is not None else f.result())
            )
        return token

    def _completed(self, token: _RayTask, value: Any) -> None:
        # Ray hands over the value, or the error object when the task failed. An
        # exception *returned* by a task is a value: only Ray's errors are failures.
        if isinstance(value, self._error_type):
            self._report(token, False, self._translate(token, value))
        else:
            self._report(token, True, value)

    def _translate(self, token: _RayTask, error: BaseException) -> BaseException:
        """Ray's error for a task, as the exception its future raises."""
        if isinstance(error, self._task_error):
            # (The instance ray.get raises has no traceback_str: its text holds it.)
            traceback_str = getattr(error, "traceback_str", "") or str(error)
            cause = _unwrap(self._ray, error)
            if cause is not error and "store_task_outputs" in traceback_str and isinstance(
                cause, (TypeError, AttributeError, pickle.PicklingError)
            ):
                # Ray could not pickle the value the task returned.
                failure = pickle.PicklingError(f"task {token.name}: its result could not be pickled to send it back: {cause}")
                failure.__cause__ = cause
                return failure
            return cause
        if isinstance(error, self._crash_errors):
            watch = self._backend._watch
            node_gone = isinstance(error, self._node_errors)
            if node_gone and watch is not None and watch.confirm_lost() and watch.lost is not None:
                # Older Rays fail the tasks of a joined cluster whose head died this way.
                return watch.lost
            crash = WorkerCrashedError(
                f"the Ray worker process running task {token.name} died before the task returned "
                f"({type(error).__name__}: a segmentation fault, os._exit, sys.exit, or a signal "
                f"such as the out-of-memory killer's SIGKILL). Ray says: {error}"
            )
            crash.__cause__ = error
            return crash
        if isinstance(error, self._system_error) and "deserializ" in (getattr(error, "traceback_str", "") or ""):
            inner = getattr(error, "client_exc", None)
            return _unpickling_error(token, inner, inner if isinstance(inner, BaseException) else error)
        return error

    @staticmethod
    def _unfetchable(token: _RayTask, error: BaseException) -> BaseException:
        """The exception for a result that was ready but could not be had here."""
        if isinstance(error, (SystemExit, KeyboardInterrupt, pickle.UnpicklingError, AttributeError, ImportError)):
            return _unpickling_error(token, error, error)
        return error

    def _report(self, token: _RayTask, ok: bool, value: Any) -> None:
        with self._lock:
            if token.state != "running":
                return
            token.state = "done"
            self._live.discard(token)
        on_done, token.on_done = token.on_done, None
        if on_done is not None:
            on_done(ok, value)

    def _forget(self, token: _RayTask, state: str) -> bool:
        """Mark a task withdrawn or stopped; False if it had already ended."""
        with self._lock:
            if token.state != "running":
                return False
            token.state = state
            self._live.discard(token)
        token.on_done = None
        return True

    def withdraw(self, tokens: List[Any]) -> List[bool]:
        # Only tasks that no node could run when they were handed over, and still none
        # can (a node may have joined since): those never started. Cheap for the rest.
        taken = [False] * len(tokens)
        candidates = [i for i, t in enumerate(tokens) if t is not None and t.unplaceable and t.state == "running"]
        if not candidates:
            return taken
        try:
            totals = self._backend._node_totals()
        except Exception as exc:  # the cluster cannot say: take nothing back
            logger.debug("could not read the Ray cluster's nodes: %s", exc)
            return taken
        for i in candidates:
            token = tokens[i]
            if _fits(token.demand, totals) or not self._forget(token, "withdrawn"):
                continue
            try:
                # Not forced: a task that waits for a node is dropped from Ray's queue.
                self._ray.cancel(token.ref, force=False)
            except Exception as exc:
                logger.debug("ray.cancel(%s) failed: %s", token.ref, exc)
            taken[i] = True
        return taken

    def stop(self, tokens: List[Any]) -> None:
        # force=True kills the worker process running the task: the work really ends.
        # Ray starts new workers for later tasks.
        refs = []
        for token in tokens:
            if token is None:
                continue
            self._forget(token, "stopped")
            refs.append(token.ref)
        for ref in refs:
            try:
                self._ray.cancel(ref, force=True)
            except Exception as exc:  # already finished, or its worker already gone
                logger.debug("ray.cancel(%s) failed: %s", ref, exc)
        # ray.cancel only asks; the worker dies a little later. The work must have
        # ended when stop() returns, so wait (bounded) until Ray settles every ref:
        # a force-cancelled task's ref settles once its worker is gone.
        watch = self._backend._watch
        if refs and (watch is None or watch.lost is None):
            deadline = time.monotonic() + _STOP_TIMEOUT
            pending = refs
            while pending and time.monotonic() < deadline:
                _, pending = self._ray.wait(
                    pending, num_returns=len(pending), timeout=min(1.0, deadline - time.monotonic()), fetch_local=False
                )
                if watch is not None and watch.lost is not None:
                    break
            if pending:
                logger.warning("%d cancelled Ray task(s) had not ended after %.0f s", len(pending), _STOP_TIMEOUT)

    def engine_lost(self, error: EngineLostError) -> None:
        """The cluster's head is gone: every task still running fails with ``error``."""
        with self._lock:
            lost = list(self._live)
        for token in lost:
            self._report(token, False, error)

    def close(self) -> None:
        watch = self._backend._watch
        if watch is not None:
            watch.discard(self)


# -- connecting -----------------------------------------------------------------------


def _token_available() -> bool:
    """Whether a Ray auth token is at hand (env var, token path, or ``~/.ray/auth_token``)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return os.path.isfile(path)


# -- joblib on Ray ----------------------------------------------------------------------

#: The task options that also apply to the actors of Ray's joblib pool.
_ACTOR_OPTION_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "runtime_env")


@functools.lru_cache(maxsize=None)
def _joblib_backend_class() -> type:
    """``ray.util.joblib``'s backend with ``n_jobs`` counted by our backend (made once,
    on first use, so that importing this module does not import Ray).

    Ray's class takes ``n_jobs=-1`` as every CPU of the cluster and starts a pool of
    that many actors whatever ``n_cpus`` says (a larger pool fails); its ``ray.init``
    when no session runs is never reached, since the backend's session runs.
    """
    from ray.util.joblib.ray_backend import RayBackend

    class _SizedRayBackend(SizedJoblibBackend, RayBackend):
        """Ray's joblib backend on the backend's session, sized by the backend."""

        def configure(self, *args: Any, **kwargs: Any) -> Any:
            # joblib hands every pool a multiprocessing context, which Ray's pool does
            # not use and warns about.
            kwargs.pop("context", None)
            return super().configure(*args, **kwargs)

    return _SizedRayBackend


# -- the backend ----------------------------------------------------------------------


class RayParallelBackend(BaseParallelBackend, name="ray"):
    """Runs tasks on Ray: a local runtime it starts, or a cluster at ``address``.

    Examples
    --------
    >>> with RayParallelBackend(n_cpus=2) as backend:  # doctest: +SKIP
    ...     handle = backend.put([1, 2, 3])
    ...     backend.get(backend.wrap(sum)(handle))
    6
    """

    config_class = RayConfig
    config: RayConfig

    # -- lifecycle ----------------------------------------------------------------

    def _start(self) -> None:
        ray = self._ray = _import_ray()
        self._started_runtime = False  # this backend ran ray.init for a local runtime
        self._shares_runtime = False  # counted among the users of the shared session
        self._joined = False  # the session is a cluster joined by address
        self._watch: Optional[_HeadWatch] = None
        self._placement: Dict[_Demand, Tuple[bool, float]] = {}
        self._reaper: Optional[BatchReaper] = None
        self._reaper_lock = threading.Lock()
        self._placement_lock = threading.Lock()
        self._warned_unplaceable: Set[_Demand] = set()
        config = self.config
        defaults = _ray_options(dataclasses.asdict(config.task))
        self._task_defaults = defaults

        def open_session() -> bool:
            if config.address is None:
                self._init_local()
                return False
            self._connect(config.address)
            return True

        if config.address is not None and ray.is_initialized():
            logger.warning("Ray is already initialised in this process; address %r is ignored", config.address)
        self._shares_runtime, self._joined = _session.acquire(ray, open_session)
        if self._shares_runtime:
            # Watched when local too: if its GCS dies (the out-of-memory killer, say),
            # Ray leaves our tasks waiting for 60 s and then ends this process.
            self._watch = _session.watch(*self._watched_head())
        self._remote_cache = _RemoteCache(ray, defaults)

    def _watched_head(self) -> Tuple[str, int, str]:
        """Host and port of the session's head (GCS), and what to call it."""
        shown = self.config.address or ""
        if shown.startswith("ray://"):  # Ray Client: its server is what we talk to
            host, port = split_host_port(shown, _ADDRESS_FORMS)
            return host, port, f"the Ray cluster at address {shown!r}"
        address = self._ray.get_runtime_context().gcs_address
        host, port = split_host_port(address, _ADDRESS_FORMS)
        if not self._joined:
            return host, port, f"the local Ray runtime this process started (its GCS at {address})"
        return host, port, f"the Ray cluster at address {shown if shown not in ('', 'auto') else address!r}"

    def _owns_runtime(self) -> bool:
        """Whether the session is a local runtime that this process started (fixed size)."""
        return (self._started_runtime or self._shares_runtime) and not self._joined

    def _init_local(self) -> None:
        """Start a new local runtime on 127.0.0.1, sized by the config."""
        ray = self._ray
        config = self.config
        _quiet_token_notice(config.logging_level)
        kwargs: Dict[str, Any] = dict(
            address="local",
            num_cpus=config.n_cpus if config.n_cpus is not None else available_cpus(),
            include_dashboard=config.include_dashboard,
            logging_level=config.logging_level,
            _node_ip_address="127.0.0.1",
        )
        if config.num_gpus is not None:
            kwargs["num_gpus"] = config.num_gpus
        if config.object_store_memory is not None:
            kwargs["object_store_memory"] = config.object_store_memory
        if config.namespace is not None:
            kwargs["namespace"] = config.namespace
        if config.runtime_env is not None:
            kwargs["runtime_env"] = plain(config.runtime_env)
        logger.info("starting a local Ray runtime: ray.init(%s)", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
        ray.init(**kwargs)
        self._started_runtime = True

    def _connect(self, address: str) -> None:
        """Join the cluster at ``address``, failing within ``connect_timeout``."""
        ray = self._ray
        config = self.config
        deadline = time.monotonic() + config.connect_timeout
        target = address
        if address == "auto":
            target = os.environ.get("RAY_ADDRESS") or ""
            if not target:
                try:
                    from ray._private.services import canonicalize_bootstrap_address

                    target = canonicalize_bootstrap_address("auto") or ""
                except Exception as exc:
                    raise ConnectionError(
                        f"could not find a running Ray cluster for address 'auto' ({exc}); start one with "
                        f"`ray start --head`, or give its HOST:PORT as address"
                    ) from None
        if target != "auto" and target != "local":
            host, port = split_host_port(target, _ADDRESS_FORMS)
            wait_for_listener(
                host, port, deadline, f"the Ray cluster at address {address!r}",
                "Is the cluster running (`ray start --head`)? Check the address in the parallel config.",
            )
            if (
                "://" not in target
                and _AUTH_MODE_ENV not in os.environ
                and is_loopback(host)
                and _token_available()
            ):
                # A head started with `ray start` on this machine turns token auth on
                # once ~/.ray/auth_token exists, but Ray only sends the token for an
                # explicit address when RAY_AUTH_MODE=token. Sending this machine's own
                # token to this machine is safe, and a head without auth ignores it.
                os.environ[_AUTH_MODE_ENV] = "token"
                self._refresh_ray_config()
        kwargs: Dict[str, Any] = dict(address=address, logging_level=config.logging_level)
        if config.namespace is not None:
            kwargs["namespace"] = config.namespace
        if config.runtime_env is not None:
            kwargs["runtime_env"] = plain(config.runtime_env)
        logger.info("connecting to a Ray cluster: ray.init(%s)", ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
        try:
            ray.init(**kwargs)
        except Exception as exc:
            if ray.is_initialized():  # pragma: no cover - half-connected
                ray.shutdown()
            hint = ""
            if "uthenticat" in str(exc) or "UNAUTHENTICATED" in str(exc):
                hint = " The cluster uses token authentication: set RAY_AUTH_MODE=token and provide the token."
            raise ConnectionError(f"could not connect to the Ray cluster at address {address!r}: {exc}.{hint}") from exc
        self._joined = True

    @staticmethod
    def _refresh_ray_config() -> None:
        """Make Ray re-read RAY_AUTH_MODE (it caches its config per process)."""
        try:
            from ray._raylet import Config  # type: ignore[attr-defined]

            Config.initialize("")
        except Exception as exc:  # pragma: no cover - Ray internals moved
            logger.debug("could not refresh Ray's config: %s", exc)

    def _batch_reaper(self) -> BatchReaper:
        """The backend's one thread that collects results in batches, started on demand."""
        with self._reaper_lock:
            if self._reaper is None:
                self._reaper = BatchReaper(self._ray)
            return self._reaper

    def _stop(self) -> None:
        reaper = getattr(self, "_reaper", None)
        if reaper is not None:
            reaper.close()
        cache = getattr(self, "_remote_cache", None)
        if cache is not None:
            cache.clear()
        if self._shares_runtime:
            _session.release(self._ray, self.config.address)
        # Otherwise user code initialised Ray: its session is left alone.

    # -- where tasks can run --------------------------------------------------------

    def _node_totals(self) -> Sequence[Mapping[str, float]]:
        """The total resources of each alive node of the cluster."""
        return [dict(node.get("Resources") or {}) for node in self._ray.nodes() if node.get("Alive")]

    def _placeable(self, demand: _Demand, name: str) -> bool:
        """Whether some alive node can run a task of ``demand`` (a verdict reused briefly).

        The first time a demand fits no node, a warning says so: the task waits,
        unstarted, until such a node joins, and its future can be cancelled.
        """
        if not demand:
            return True
        now = time.monotonic()
        cached = self._placement.get(demand)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            totals = self._node_totals()
        except Exception as exc:  # the cluster cannot say: assume it can run it
            logger.debug("could not read the Ray cluster's nodes: %s", exc)
            return True
        verdict = _fits(demand, totals)
        with self._placement_lock:
            self._placement[demand] = (verdict, now + _PLACEMENT_TTL)
            warn = not verdict and demand not in self._warned_unplaceable
            if warn:
                self._warned_unplaceable.add(demand)
        if warn:
            asked = ", ".join(f"{key}: {amount:g}" for key, amount in demand)
            logger.warning(
                "no node of the Ray cluster can run task %s, which asks for {%s}; the cluster has %s. "
                "It waits unstarted until such a node joins; cancelling its future (or leaving the "
                "executor) drops it.",
                name,
                asked,
                _describe_nodes(totals),
            )
        return verdict

    # -- slots ---------------------------------------------------------------------

    def _task_slots(self, exact: bool = False) -> Optional[int]:
        """How many tasks with the config's options fit on the cluster at once.

        ``None`` when that is unbounded (a task reserving no CPU, GPU or resource).
        """
        totals = self._ray.cluster_resources()
        task = self.config.task
        demands: Dict[str, float] = {"CPU": task.num_cpus, "GPU": task.num_gpus}
        demands.update(task.resources or {})
        counts = []
        for name, amount in demands.items():
            if amount and amount > 0:
                counts.append(math.floor(totals.get(name, 0.0) / amount + 1e-9))
        if not counts:
            return None
        return min(counts)

    def _count_slots(self) -> int:
        task_cpus = self.config.task.num_cpus
        cpus = self._ray.cluster_resources().get("CPU", 0.0)
        if task_cpus and task_cpus > 0:
            return max(1, math.floor(cpus / task_cpus + 1e-9))
        return max(1, int(cpus))

    @classmethod
    def _count_slots_unstarted(cls, config: ParallelConfig) -> Optional[int]:
        ray = sys.modules.get("ray")
        if config.address is not None or (ray is not None and ray.is_initialized()):
            return None
        cpus = config.n_cpus if config.n_cpus is not None else available_cpus()
        task_cpus = config.task.num_cpus if isinstance(config, RayConfig) else 1.0
        if task_cpus and task_cpus > 0:
            return max(1, math.floor(cpus / task_cpus + 1e-9))
        return cpus

    def _task_runner(self, max_workers: int) -> TaskRunner:
        return _RayRunner(self)

    def _joblib_backend(self) -> Any:
        # Ray's joblib backend runs each joblib.Parallel call on a pool of actors that
        # it starts on the session this backend opened or joined, and stops after the
        # call; the actors reserve what the config's tasks do.
        actor_options = {key: value for key, value in self._task_defaults.items() if key in _ACTOR_OPTION_KEYS}
        return _joblib_backend_class()(sized_by=self, ray_remote_args=actor_options)

    # -- object store -------------------------------------------------------------

    def put(self, obj: Any) -> Any:
        self._check_open()
        return self._ray.put(obj)

    def get(self, handles: Any, *, timeout: Optional[float] = None) -> Any:
        self._check_open()
        ray = self._ray
        many = isinstance(handles, (list, tuple))
        self._require_handles("gets", handles if many else [handles])
        try:
            return ray.get(list(handles) if many else handles, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            items = list(handles) if many else [handles]
            _, waiting = self._wait(items, len(items), 0)
            raise TimeoutError(f"{len(waiting)} Ray result(s) not ready within {timeout} s") from None
        except ray.exceptions.RayTaskError as exc:
            error = _unwrap(ray, exc)
            # Not "from None": that would drop the worker's traceback, its cause.
            raise error from error.__cause__

    def _check_task_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        return check_task_options(options)

    def _start_wrapped(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Dict[str, Any]) -> Any:
        return _submit(self._remote_cache, fn, args, kwargs, options)

    def _is_handle(self, obj: Any) -> bool:
        return isinstance(obj, self._ray.ObjectRef)

    def _wait(self, handles: List[Any], num_returns: int, timeout: Optional[float]) -> Tuple[List[Any], List[Any]]:
        unique = list(dict.fromkeys(handles))
        ready, _ = self._ray.wait(unique, num_returns=min(num_returns, len(unique)), timeout=timeout, fetch_local=False)
        ready_set = set(ready)
        done = [h for h in handles if h in ready_set]
        return done, [h for h in handles if h not in ready_set]
