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
import ipaddress
import logging
import math
import os
import socket
import sys
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..backend import BaseParallelBackend, available_cpus
from ..config import ParallelConfig, RayConfig, RayTaskOptions, plain
from ..executor import DoneCallback, TaskRunner

__all__ = ["RayParallelBackend"]

logger = logging.getLogger(__name__)

#: The per-task option names Ray accepts from us (the fields of ``RayTaskOptions``).
TASK_OPTION_KEYS: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RayTaskOptions))

#: Environment variable through which Ray clients opt in to token authentication.
_AUTH_MODE_ENV = "RAY_AUTH_MODE"

#: Seconds stop() waits for force-cancelled tasks to be gone before it gives up.
_STOP_TIMEOUT = 30.0

# How many live backends share the Ray session (a local runtime, or a cluster joined by
# address) that one of them opened. Ray allows one session per process, so it is
# stopped or disconnected when the last of them shuts down.
_runtime_lock = threading.Lock()
_runtime_users = 0
_session_joined = False  # whether that shared session is a cluster joined by address


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
        self._functions: "OrderedDict[Callable[..., Any], Any]" = OrderedDict()
        self._trampoline: Any = None

    def __len__(self) -> int:
        return len(self._functions)

    def lookup(self, fn: Callable[..., Any]) -> Tuple[Any, bool]:
        """The remote function for ``fn``, and whether ``fn`` must be passed as first argument."""
        import inspect

        if inspect.isfunction(fn):
            with self._lock:
                remote = self._functions.get(fn)
                if remote is None:
                    remote = self._ray.remote(**self._defaults)(fn) if self._defaults else self._ray.remote(fn)
                    self._functions[fn] = remote
                    if len(self._functions) > self.MAX_FUNCTIONS:
                        self._functions.popitem(last=False)
                else:
                    self._functions.move_to_end(fn)
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


def _unwrap(ray: Any, exc: BaseException) -> BaseException:
    """The task's own exception behind Ray's ``RayTaskError`` wrapper."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return exc


# -- the executor's engine side --------------------------------------------------------


class _RayRunner(TaskRunner):
    """Runs one executor's tasks as Ray tasks of the backend's session."""

    def __init__(self, backend: "RayParallelBackend") -> None:
        self._backend = backend
        self._ray = backend._ray
        self._cache = backend._remote_cache
        self._error_type = self._ray.exceptions.RayError
        self._task_error = self._ray.exceptions.RayTaskError

    def check_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        return check_task_options(options)

    def enforces_bound(self, max_workers: int) -> bool:
        # True only when the cluster has no room for more than max_workers of our tasks
        # (with the config's task options), so Ray's own scheduler is the bound. Only a
        # runtime this process started has a known, fixed size: a cluster may autoscale.
        if not self._backend._started_runtime and not self._backend._shares_runtime:
            return False
        slots = self._backend._task_slots(exact=True)
        return slots is not None and slots <= max_workers

    def start(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Mapping[str, Any], on_done: DoneCallback) -> Any:
        ref = _submit(self._cache, fn, args, kwargs, options)
        error_type, task_error = self._error_type, self._task_error

        def completed(value: Any) -> None:
            # Ray hands over the value, or the error object when the task failed. An
            # exception *returned* by a task is a value: only Ray's errors are failures.
            if isinstance(value, error_type):
                if isinstance(value, task_error) and isinstance(getattr(value, "cause", None), BaseException):
                    value = value.cause
                on_done(False, value)
            else:
                on_done(True, value)

        on_completed = getattr(ref, "_on_completed", None)
        if on_completed is not None:
            # Measured here: ~7% cheaper per task than ObjectRef.future() callbacks.
            on_completed(completed)
        else:  # pragma: no cover - a Ray without the private hook
            ref.future().add_done_callback(lambda f: on_done(False, _unwrap(self._ray, f.exception())) if f.exception() else on_done(True, f.result()))
        return ref

    def stop(self, tokens: List[Any]) -> None:
        # force=True kills the worker process running the task: the work really ends.
        # Ray starts new workers for later tasks.
        refs = [ref for ref in tokens if ref is not None]
        for ref in refs:
            try:
                self._ray.cancel(ref, force=True)
            except Exception as exc:  # already finished, or its worker already gone
                logger.debug("ray.cancel(%s) failed: %s", ref, exc)
        # ray.cancel only asks; the worker dies a little later. The work must have
        # ended when stop() returns, so wait (bounded) until Ray settles every ref:
        # a force-cancelled task's ref settles once its worker is gone.
        if refs:
            deadline = time.monotonic() + _STOP_TIMEOUT
            pending = refs
            while pending and time.monotonic() < deadline:
                _, pending = self._ray.wait(
                    pending, num_returns=len(pending), timeout=min(1.0, deadline - time.monotonic()), fetch_local=False
                )
            if pending:
                logger.warning("%d cancelled Ray task(s) had not ended after %.0f s", len(pending), _STOP_TIMEOUT)


# -- connecting -----------------------------------------------------------------------


def _split_host_port(address: str) -> Tuple[str, int]:
    """``HOST:PORT`` (optionally ``ray://``-prefixed, IPv6 in brackets) to a pair."""
    rest = address.split("://", 1)[1] if "://" in address else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(
            f"parallel config: address must be auto, HOST:PORT or ray://HOST:PORT; got {address!r}"
        )
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _probe(host: str, port: int, deadline: float, shown: str) -> None:
    """Wait until ``host:port`` accepts a TCP connection, or raise ``ConnectionError``.

    ``shown`` is the address as the user wrote it, so that the error names it.
    """
    delay = 0.1
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(remaining, 5.0))):
                return
        except OSError as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionError(
                    f"could not reach the Ray cluster at address {shown!r}: nothing accepted a "
                    f"connection at {host}:{port} ({exc}). Is the cluster running (`ray start --head`)? "
                    f"Check the address in the parallel config."
                ) from None
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)


def _token_available() -> bool:
    """Whether a Ray auth token is at hand (env var, token path, or ``~/.ray/auth_token``)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    return os.path.isfile(path)


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
        global _runtime_users, _session_joined
        ray = self._ray = _import_ray()
        self._started_runtime = False  # this backend ran ray.init for a local runtime
        self._shares_runtime = False  # counted among the users of our local runtime
        self._joined = False  # this backend connected to a cluster by address
        config = self.config
        defaults = _ray_options(dataclasses.asdict(config.task))
        self._task_defaults = defaults
        with _runtime_lock:
            if ray.is_initialized():
                if _runtime_users > 0:
                    # Another backend of ours started or joined this session: share it.
                    _runtime_users += 1
                    self._shares_runtime = True
                    self._joined = _session_joined
                    logger.info("reusing the Ray session of another ray backend")
                else:
                    logger.info("Ray is already initialised in this process; using that session (not stopping it at shutdown)")
                if config.address is not None:
                    logger.warning(
                        "Ray is already initialised in this process; address %r is ignored", config.address
                    )
            elif config.address is None:
                self._init_local()
                _runtime_users += 1
                self._shares_runtime = True
            else:
                self._connect(config.address)
                _runtime_users += 1
                self._shares_runtime = True
            _session_joined = self._joined
        self._remote_cache = _RemoteCache(ray, defaults)

    def _init_local(self) -> None:
        """Start a new local runtime on 127.0.0.1, sized by the config."""
        ray = self._ray
        config = self.config
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
            host, port = _split_host_port(target)
            _probe(host, port, deadline, address)
            if (
                "://" not in target
                and _AUTH_MODE_ENV not in os.environ
                and _is_loopback(host)
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

    def _stop(self) -> None:
        global _runtime_users
        cache = getattr(self, "_remote_cache", None)
        if cache is not None:
            cache.clear()
        ray = self._ray
        with _runtime_lock:
            if self._shares_runtime:
                _runtime_users -= 1
                if _runtime_users > 0:
                    return
                if self._joined:
                    # We only joined this cluster: disconnect this driver; the cluster
                    # keeps running (ray.shutdown stops only what its ray.init started).
                    logger.info("disconnecting from the Ray cluster at %r", self.config.address)
                else:
                    # We (or a backend we shared with) started it: stop it.
                    logger.info("stopping the local Ray runtime")
                ray.shutdown()
            # Otherwise user code initialised Ray: its session is left alone.

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

    # -- object store -------------------------------------------------------------

    def put(self, obj: Any) -> Any:
        self._check_open()
        return self._ray.put(obj)

    def get(self, handles: Any, *, timeout: Optional[float] = None) -> Any:
        self._check_open()
        ray = self._ray
        many = isinstance(handles, (list, tuple))
        try:
            return ray.get(list(handles) if many else handles, timeout=timeout)
        except ray.exceptions.GetTimeoutError as exc:
            raise TimeoutError(str(exc)) from None
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(ray, exc) from None

    def _check_task_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        return check_task_options(options)

    def _start_wrapped(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Dict[str, Any]) -> Any:
        return _submit(self._remote_cache, fn, args, kwargs, options)

    def wait(self, handles: Sequence[Any], *, num_returns: int = 1, timeout: Optional[float] = None) -> Tuple[List[Any], List[Any]]:
        self._check_open()
        handles = list(handles)
        self._check_num_returns(handles, num_returns)
        unique = list(dict.fromkeys(handles))
        ready, _ = self._ray.wait(unique, num_returns=min(num_returns, len(unique)), timeout=timeout, fetch_local=False)
        ready_set = set(ready)
        done = [h for h in handles if h in ready_set]
        return done, [h for h in handles if h not in ready_set]
