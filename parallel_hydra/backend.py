"""The backend abstraction, its registry, and the module-level helpers of the API.

A backend owns one engine session: a local runtime it started, or a connection to a
cluster. It hands out executors (see :mod:`parallel_hydra.executor`) and an object store
(``put``/``get``/``wrap``/``wait``). Engines live in :mod:`parallel_hydra.backends`, one
module each, imported only when their backend is first used.
"""

from __future__ import annotations

import importlib
import logging
import os
import weakref
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar, Union

from .checks import require_integer
from .config import ParallelConfig, plain
from .engines import BY_NAME
from .executor import ParallelExecutor, TaskRunner
from .in_task import InTask
from .policy import CancellationPolicy, PolicyLike, as_policy

__all__ = [
    "BaseParallelBackend",
    "init_parallel_backend",
    "available_cpus",
    "effective_n_jobs",
    "init_executor",
    "check_n_jobs",
    "resolve_n_jobs",
    "SizedJoblibBackend",
    "ConfigLike",
]

logger = logging.getLogger(__name__)

ConfigLike = Union[ParallelConfig, Mapping[str, Any]]
B = TypeVar("B", bound="BaseParallelBackend")

#: Keys a Hydra node carries that are not configuration fields.
_HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_", "_args_")


def available_cpus() -> int:
    """Count the CPU cores this process may use, at least 1.

    Unlike ``os.cpu_count()``, this respects CPU affinity (``taskset``), cgroup CPU
    quotas (containers) and ``LOKY_MAX_CPU_COUNT``; loky, which joblib ships, does the
    counting.

    Examples
    --------
    >>> available_cpus() >= 1
    True
    """
    from joblib.externals.loky import cpu_count

    return max(1, int(cpu_count(only_physical_cores=False)))


class BaseParallelBackend(ABC):
    """One engine session: executors, an object store, and a CPU count.

    Build one with :func:`init_parallel_backend`, with Hydra's ``instantiate``, or
    directly (``JoblibParallelBackend(n_cpus=2)``). Use it as a context manager, or call
    :meth:`shutdown`: a backend stops what it started (a local Ray runtime, a Dask
    ``LocalCluster``, worker processes) and leaves running what it only connected to.

    Subclasses register under a name with ``class MyBackend(BaseParallelBackend,
    name="mine")`` and set ``config_class``.
    """

    #: The name the registry knows this backend by, the value of ``config.backend``.
    name: ClassVar[str] = ""
    #: The dataclass of this backend's configuration.
    config_class: ClassVar[Type[ParallelConfig]] = ParallelConfig
    _registry: ClassVar[Dict[str, Type["BaseParallelBackend"]]] = {}

    def __init_subclass__(cls, name: Optional[str] = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            BaseParallelBackend._registry[name] = cls

    def __init__(self, config: Optional[ConfigLike] = None, **fields: Any) -> None:
        self.config = self._make_config(config, fields)
        self._shut_down = False
        self._executors: "weakref.WeakSet[ParallelExecutor]" = weakref.WeakSet()
        self._start()

    @classmethod
    def _make_config(cls, config: Optional[ConfigLike], fields: Mapping[str, Any]) -> ParallelConfig:
        """Build this backend's config from a config object, a mapping and/or fields."""
        values: Dict[str, Any] = {}
        if isinstance(config, ParallelConfig):
            values.update({k: getattr(config, k) for k in config.__dataclass_fields__})
        elif config is not None:
            values.update(plain(config))
        values.update(plain(dict(fields)))
        for key in _HYDRA_KEYS:
            values.pop(key, None)
        backend = values.setdefault("backend", cls.name)
        if backend != cls.name:
            raise ValueError(
                f"parallel config: backend is {backend!r}, but this is the {cls.name!r} backend "
                f"({cls.__name__}); change backend or pick the matching config group option"
            )
        known = set(cls.config_class.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"parallel config: unknown key {unknown[0]!r} for the {cls.name} backend; "
                f"known keys: {', '.join(sorted(known))}"
            )
        return cls.config_class(**values)

    # -- lifecycle ----------------------------------------------------------------

    @abstractmethod
    def _start(self) -> None:
        """Start or connect to the engine, as ``self.config`` says."""

    @abstractmethod
    def _stop(self) -> None:
        """Stop what ``_start`` started; only disconnect from what it joined."""

    def shutdown(self) -> None:
        """Release the engine: stop what this backend started, leave the rest running.

        Executors of this backend that are still open are shut down first, with the
        ``ALL`` policy. Calling it again does nothing.
        """
        if self._shut_down:
            return
        self._shut_down = True
        # Executors still open would outlive their engine (and wait on it forever).
        for executor in list(self._executors):
            executor.shutdown(wait=True, cancel_futures=CancellationPolicy.ALL)
        self._stop()

    @property
    def is_shut_down(self) -> bool:
        """Whether :meth:`shutdown` was called."""
        return self._shut_down

    def _check_open(self) -> None:
        if self._shut_down:
            raise RuntimeError(f"the {self.name} backend was shut down")

    def __enter__(self: B) -> B:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "shut down" if self._shut_down else "open"
        return f"{type(self).__name__}(n_cpus={self.config.n_cpus}, address={self.config.address!r}, {state})"

    # -- executors ----------------------------------------------------------------

    def executor(
        self,
        max_workers: Optional[int] = None,
        *,
        config: Optional[ParallelConfig] = None,
        cancel_futures: Optional[PolicyLike] = None,
    ) -> ParallelExecutor:
        """A ``concurrent.futures.Executor`` running tasks on this backend's engine.

        Parameters
        ----------
        max_workers
            At most this many tasks run at once; ``None`` means every CPU the backend
            has (with no ``n_cpus`` in the config, every CPU of a cluster joined by
            ``address``, also those that join later). Capped like :meth:`effective_n_jobs`.
        config
            Accepted for compatibility with the classmethod form of the API; only its
            ``cancel_futures`` is used, when ``cancel_futures`` is not given.
        cancel_futures
            What leaving the executor's ``with`` block cancels; defaults to the config's.

        Examples
        --------
        >>> from parallel_hydra import init_parallel_backend
        >>> with init_parallel_backend() as backend:
        ...     with backend.executor(max_workers=2) as executor:
        ...         list(executor.map(abs, [-1, -2, 3]))
        [1, 2, 3]
        """
        self._check_open()
        if max_workers is not None:
            check_n_jobs(max_workers, "max_workers")
        slots = self.effective_n_jobs(-1)
        n = slots if max_workers is None else resolve_n_jobs(max_workers, slots)
        if cancel_futures is None:
            cancel_futures = (config or self.config).cancel_futures
        policy = as_policy(cancel_futures)
        executor = ParallelExecutor(
            self._task_runner(n),
            n,
            policy,
            self.config.wait_timeout,
            threads_per_task=self.threads_per_task(n, slots),
            log_level=self.config.logging_level,
            progress=self.config.progress,
            engine_sized=max_workers is None and self.config.n_cpus is None,
        )
        self._executors.add(executor)
        return executor

    @abstractmethod
    def _task_runner(self, max_workers: int) -> TaskRunner:
        """The engine's side of one new executor."""

    def threads_per_task(self, max_workers: int, slots: Optional[int] = None) -> int:
        """The BLAS/OpenMP threads each task of an executor of ``max_workers`` may use.

        The config's ``threads_per_task`` if set; otherwise the backend's CPUs shared
        among the tasks that run at once, at least 1 (and never more than the CPUs of
        the machine a task runs on). Without a cap, each of two tasks on two cores
        would start a thread per core.
        """
        if self.config.threads_per_task is not None:
            return self.config.threads_per_task
        if slots is None:
            slots = self.effective_n_jobs(-1)
        return max(1, slots // max(1, max_workers))

    # -- CPU counts ---------------------------------------------------------------

    def effective_n_jobs(self, n_jobs: int) -> int:
        """How many tasks this backend can run at once, for a request of ``n_jobs``.

        ``-1`` means all of them, ``-2`` all but one (as in joblib), and so on, never
        fewer than 1; a larger request is capped at what the engine has and at
        ``n_cpus``. ``0`` is an error.
        """
        check_n_jobs(n_jobs)
        self._check_open()
        return resolve_n_jobs(n_jobs, self._capped(self._count_slots(), self.config))

    @abstractmethod
    def _count_slots(self) -> int:
        """How many tasks the engine could run at once right now."""

    @classmethod
    def _count_slots_unstarted(cls, config: ParallelConfig) -> Optional[int]:
        """The slot count for ``config`` without starting an engine, if it can be known."""
        return None

    @staticmethod
    def _capped(slots: int, config: ParallelConfig) -> int:
        if config.n_cpus is not None:
            slots = min(slots, config.n_cpus)
        return slots

    # -- joblib inside --------------------------------------------------------------

    @contextmanager
    def joblib_context(self, n_jobs: Optional[int] = None) -> Iterator[None]:
        """Inside the block, ``joblib.Parallel`` runs on this backend's engine.

        Research code parallelises with joblib, often without saying so (scikit-learn's
        ``n_jobs``, ``GridSearchCV``, ``cross_val_score``). Left alone, each such call
        starts its own loky pool on this machine, sized by this machine's CPUs, even
        when the backend is a Ray or Dask cluster. Inside this block, those calls use
        the engine's own joblib backend on this backend's session (loky sized by the
        backend; ``ray.util.joblib`` on the backend's Ray session; joblib's Dask backend
        on the backend's ``client``), and a call's ``n_jobs`` means what
        :meth:`effective_n_jobs` says: ``-1`` is every slot of this backend, ``-2`` all
        but one, a larger number is capped at the slots.

        Parameters
        ----------
        n_jobs
            The ``n_jobs`` of calls that give none (``None``, scikit-learn's default).
            ``None`` keeps what an enclosing ``joblib.parallel_config`` says, or else
            1, on every engine (joblib's own Dask backend would take every thread).

        The previous joblib configuration is back when the block ends. Like
        ``joblib.parallel_config``, which it uses, the setting belongs to the thread
        that entered the block; blocks nest.

        Examples
        --------
        >>> import joblib
        >>> from parallel_hydra import init_parallel_backend
        >>> with init_parallel_backend({"n_cpus": 1}) as backend:
        ...     with backend.joblib_context():
        ...         joblib.effective_n_jobs(-1)
        1
        """
        self._check_open()
        settings: Dict[str, Any] = {}
        if n_jobs is not None:
            check_n_jobs(n_jobs)
            settings["n_jobs"] = n_jobs
        import joblib

        with joblib.parallel_config(backend=self._joblib_backend(), **settings):
            yield

    def _joblib_backend(self) -> Any:
        """A new joblib backend (``ParallelBackendBase``) that runs on this engine.

        Each engine's module makes one, from the engine's own joblib backend class with
        :class:`SizedJoblibBackend` mixed in.
        """
        raise NotImplementedError(f"the {self.name} backend has no joblib backend; joblib_context() is not available")

    # -- object store -------------------------------------------------------------

    @abstractmethod
    def put(self, obj: Any) -> Any:
        """Store ``obj`` where tasks can reach it; return a handle.

        A handle given as an argument to ``executor.submit`` (or to a wrapped function)
        reaches the task as the object itself, so large data is sent once.
        """

    @abstractmethod
    def get(self, handles: Any, *, timeout: Optional[float] = None) -> Any:
        """The value behind a handle, or a list of values for a list of handles."""

    def wrap(self, fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
        """``wrap(fn)(*args)`` starts ``fn(*args)`` on the engine and returns a handle.

        ``options`` are per-task engine options, as for ``executor.with_options``; they
        are checked here, so a bad key fails before anything runs.
        """
        if not callable(fn):
            raise TypeError(f"wrap needs a callable; got {fn!r}")
        checked = self._check_task_options(options)
        # Its calls run side by side on every slot: each gets its share of the CPUs.
        in_task = InTask(fn, self.threads_per_task(self.effective_n_jobs(-1)), None, os.getpid())

        def remote(*args: Any, **kwargs: Any) -> Any:
            self._check_open()
            return self._start_wrapped(in_task, args, kwargs, checked)

        remote.__name__ = getattr(fn, "__name__", "remote")
        remote.__doc__ = getattr(fn, "__doc__", None)
        return remote

    def _check_task_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
        """Validate per-call engine options; this default takes none."""
        if options:
            raise ValueError(f"the {self.name} backend takes no per-task options; got {sorted(options)}")
        return {}

    @abstractmethod
    def _start_wrapped(self, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any], options: Dict[str, Any]) -> Any:
        """Start ``fn(*args, **kwargs)`` on the engine with checked options; a handle."""

    def wait(
        self, handles: Sequence[Any], *, num_returns: int = 1, timeout: Optional[float] = None
    ) -> Tuple[List[Any], List[Any]]:
        """Wait until ``num_returns`` of ``handles`` are ready, or ``timeout`` passes.

        Returns ``(done, not_done)``, each in the order of ``handles``. An empty list
        returns at once, as ``concurrent.futures.wait`` and ``ray.wait`` do.
        """
        self._check_open()
        handles = list(handles)
        if not handles:
            return [], []
        require_integer("num_returns", num_returns, minimum=1, maximum=len(handles), hint="the number of handles at most")
        self._require_handles("waits on", handles)
        return self._wait(handles, num_returns, timeout)

    def _require_handles(self, verb: str, handles: Sequence[Any]) -> None:
        """Refuse anything among ``handles`` that is not a handle of this backend."""
        for handle in handles:
            if not self._is_handle(handle):
                raise TypeError(f"the {self.name} backend {verb} handles from its put or wrap; got {type(handle).__name__}")

    @abstractmethod
    def _is_handle(self, obj: Any) -> bool:
        """Whether ``obj`` is a handle of this backend's object store."""

    @abstractmethod
    def _wait(self, handles: List[Any], num_returns: int, timeout: Optional[float]) -> Tuple[List[Any], List[Any]]:
        """``wait`` on a non-empty list of checked handles."""


def check_n_jobs(n_jobs: Any, key: str = "n_jobs") -> None:
    """Refuse an ``n_jobs`` that is not a non-zero integer, naming ``key``."""
    require_integer(key, n_jobs, nonzero=True, hint="-1 for all CPUs")


def resolve_n_jobs(n_jobs: int, available: int) -> int:
    """The one rule for ``n_jobs``: a positive request is capped at ``available``; ``-k``
    means all but ``k - 1`` of them; never fewer than 1 (as ``joblib`` does)."""
    if n_jobs < 0:
        return max(1, available + 1 + n_jobs)
    return max(1, min(n_jobs, available))


class SizedJoblibBackend:
    """Mixed into an engine's joblib backend class: ``n_jobs`` counted by our backend.

    The engines' joblib backends each read ``n_jobs`` their own way: loky's ``-1`` is
    every CPU of this machine, Ray's every CPU of the whole cluster (whatever ``n_cpus``
    and ``task.num_cpus`` say, and a pool larger than the cluster fails), and Dask's
    backend ignores ``n_jobs`` and counts every thread. Mixed in before the engine's
    class (``class _Sized(SizedJoblibBackend, LokyBackend)``), it makes every request
    mean :meth:`BaseParallelBackend.effective_n_jobs` of the backend given as
    ``sized_by``, and nothing more than the engine's class allows (joblib's own
    fallbacks to one job, such as inside a daemonic process, stay). A call that gives no
    ``n_jobs`` gets one job, as joblib documents, on every engine.
    """

    #: ``n_jobs`` of a call that gives none and has no enclosing ``parallel_config``'s.
    default_n_jobs = 1

    def __init__(self, *args: Any, sized_by: BaseParallelBackend, **kwargs: Any) -> None:
        self._sized_by = sized_by
        super().__init__(*args, **kwargs)

    def effective_n_jobs(self, n_jobs: Optional[int]) -> int:
        """The jobs a call of ``n_jobs`` gets: the backend's count, within the engine's."""
        wanted = self._sized_by.effective_n_jobs(self.default_n_jobs if n_jobs is None else n_jobs)
        return int(min(wanted, super().effective_n_jobs(wanted)))  # type: ignore[misc]


def _backend_class(name: str) -> Type[BaseParallelBackend]:
    """The backend class registered as ``name``, importing its module if needed."""
    if name not in BaseParallelBackend._registry and name in BY_NAME:
        importlib.import_module(BY_NAME[name].module)
    try:
        return BaseParallelBackend._registry[name]
    except KeyError:
        known = sorted(set(BY_NAME) | set(BaseParallelBackend._registry))
        raise ValueError(f"parallel config: unknown backend {name!r}; known backends: {', '.join(known)}") from None


def _config_backend_name(config: Optional[ConfigLike]) -> str:
    if config is None:
        return "joblib"
    if isinstance(config, ParallelConfig):
        return config.backend
    if isinstance(config, BaseParallelBackend):
        return config.name
    name = plain(config).get("backend", "joblib")
    if not isinstance(name, str):
        raise ValueError(f"parallel config: backend must be a backend name; got {name!r}")
    return name


def init_parallel_backend(config: Optional[ConfigLike] = None) -> BaseParallelBackend:
    """Start (or connect to) the backend that ``config`` names, and return it.

    ``config`` may be a :class:`ParallelConfig` or an engine's own config class, a
    mapping, or a Hydra ``DictConfig`` (``_target_`` and such keys are ignored). The
    default is a local joblib backend. The caller owns the result: shut it down, or use
    it in a ``with`` block.

    Examples
    --------
    >>> with init_parallel_backend(ParallelConfig(n_cpus=1)) as backend:
    ...     backend.effective_n_jobs(-1)
    1
    """
    return _backend_class(_config_backend_name(config))(config)


def effective_n_jobs(n_jobs: int, config: Optional[ConfigLike] = None) -> int:
    """How many jobs ``config``'s backend can run at once for a request of ``n_jobs``.

    Starts no engine when the answer is known without one (joblib always; Ray and Dask
    when no cluster address is given). Otherwise it connects, counts and disconnects.
    The rule is :meth:`BaseParallelBackend.effective_n_jobs`'s: ``-k`` is all but
    ``k - 1``, and never fewer than 1.

    Raises
    ------
    ValueError
        If ``n_jobs`` is 0 or not an integer.

    Examples
    --------
    >>> effective_n_jobs(1)
    1
    >>> effective_n_jobs(64, ParallelConfig(n_cpus=2))
    2
    >>> effective_n_jobs(-50, ParallelConfig(n_cpus=2))
    1
    """
    check_n_jobs(n_jobs)
    if isinstance(config, BaseParallelBackend):
        return config.effective_n_jobs(n_jobs)
    cls = _backend_class(_config_backend_name(config))
    parsed = cls._make_config(config, {})
    slots = cls._count_slots_unstarted(parsed)
    if slots is None:
        with cls(parsed) as backend:
            return backend.effective_n_jobs(n_jobs)
    return resolve_n_jobs(n_jobs, cls._capped(slots, parsed))


@contextmanager
def init_executor(
    max_workers: Optional[int] = None, config: Optional[ConfigLike] = None, **kwargs: Any
) -> Iterator[ParallelExecutor]:
    """Start ``config``'s backend and yield one of its executors.

    On exit the executor shuts down with its policy, then the backend shuts down.
    ``kwargs`` go to :meth:`BaseParallelBackend.executor` (``cancel_futures``).

    Examples
    --------
    >>> with init_executor(max_workers=1) as executor:
    ...     executor.submit(pow, 2, 10).result()
    1024
    """
    with init_parallel_backend(config) as backend:
        with backend.executor(max_workers, **kwargs) as executor:
            yield executor
