"""Configuration schemas: the dataclasses users build by hand and Hydra validates.

Every class here is both a plain dataclass (``ParallelConfig(n_cpus=2)``) and an
OmegaConf structured-config schema, so a typo'd key or a value of the wrong type is
refused by Hydra before anything starts. What OmegaConf cannot express with
hydra-core 1.3 (ranges, enums given by name, dictionaries of numbers) is checked in
``__post_init__``, which raises a ``ValueError`` naming the field and what it allows.

This module imports neither an engine nor Hydra: it is read by the Hydra plugin that
every Hydra app on the machine loads, so it must stay cheap.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from .checks import require_integer
from .cluster_config import as_cluster_kwargs
from .policy import CancellationPolicy, as_policy

__all__ = [
    "ParallelConfig",
    "JoblibConfig",
    "RayConfig",
    "RayTaskOptions",
    "DaskConfig",
    "DaskTaskOptions",
    "plain",
]


def plain(value: Any) -> Any:
    """Turn OmegaConf containers (from Hydra) into plain ``dict``/``list`` values.

    Engines get confused by ``DictConfig`` objects (Ray serialises them, Dask compares
    them by type), so every container that reaches an engine goes through here.
    """
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


#: What Dask's workers take as a memory limit: auto, a number of bytes (a fraction of
#: the machine's memory below 1), or a size with a unit such as 4GB, 512 MiB or 2g.
_MEMORY_LIMIT = re.compile(r"^\s*(auto|(\d+\.?\d*|\.\d+)(e[+-]?\d+)?\s*([kmgtp]i?)?b?)\s*$", re.IGNORECASE)

#: The smallest object store Ray starts with (75 MiB); it refuses less in its own words.
RAY_MIN_OBJECT_STORE_BYTES = 75 * 1024 * 1024


def _fail(key: str, allowed: str, value: Any) -> None:
    raise ValueError(f"parallel config: {key} must be {allowed}; got {value!r}")


def _check_int(key: str, value: Any, minimum: int, optional: bool = True) -> None:
    require_integer(key, value, minimum=minimum, none="null" if optional else None, prefix="parallel config: ")


def _check_number(key: str, value: Any, minimum: float, strict: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        _fail(key, f"a number {bound}" + (" or null" if optional else ""), value)


# Why the mapping fields above are typed ``Optional[Any]`` and checked in ``validate``:
# OmegaConf (2.2, 2.3) cannot merge a mapping into an ``Optional[Dict]`` field that is
# null, so ``parallel.task.resources={GPU:1}`` on the command line failed with a raw
# ``AttributeError`` from inside it. An ``Any`` field takes the mapping.
def _check_resources(key: str, value: Any) -> Optional[Dict[str, float]]:
    value = plain(value)
    if value is None:
        return None
    if not isinstance(value, dict):
        _fail(key, "a mapping of resource name to amount, or null", value)
    for name, amount in value.items():
        _check_number(f"{key}.{name}", amount, 0)
    return dict(value)


@dataclass
class ParallelConfig:
    """What every backend understands; engines extend it with their own fields.

    Examples
    --------
    >>> ParallelConfig(n_cpus=2).backend
    'joblib'
    >>> ParallelConfig(n_cpus=0)
    Traceback (most recent call last):
    ...
    ValueError: parallel config: n_cpus must be an integer >= 1 or null; got 0
    """

    # Name of the engine: joblib, ray, dask (or one registered by a plugin).
    backend: str = "joblib"
    # Cluster to connect to (Ray: auto, HOST:PORT, ray://...; Dask: tcp://HOST:PORT).
    # null starts a local runtime that is stopped again at shutdown.
    address: Optional[str] = None
    # CPUs to use (the local runtime's size, and a cap on workers); null means all.
    n_cpus: Optional[int] = None
    # Log level of the engine's own loggers (a number: 10 DEBUG, 20 INFO, 30 WARNING).
    logging_level: int = logging.WARNING
    # Seconds a blocking call waits for the engine between checks (e.g. on workers
    # to appear, or a killed worker to be gone).
    wait_timeout: float = 1.0
    # Seconds to try to reach a cluster at `address` before failing.
    connect_timeout: float = 60.0
    # What leaving an executor's `with` block cancels: NONE, PENDING, RUNNING or ALL.
    cancel_futures: CancellationPolicy = CancellationPolicy.PENDING
    # BLAS/OpenMP threads each task may use; null: the backend's CPUs divided by the
    # executor's max_workers, at least 1.
    threads_per_task: Optional[int] = None
    # Show a progress bar for executor.map and MapReduceJob unless they say otherwise.
    progress: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field, raising ``ValueError`` that names the first bad one."""
        if not isinstance(self.backend, str) or not self.backend.strip():
            _fail("backend", "the name of a backend, such as joblib, ray or dask", self.backend)
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            _fail("address", "a cluster address string or null", self.address)
        _check_int("n_cpus", self.n_cpus, 1)
        _check_int("logging_level", self.logging_level, 0, optional=False)
        _check_number("wait_timeout", self.wait_timeout, 0, strict=True)
        _check_number("connect_timeout", self.connect_timeout, 0, strict=True)
        self.cancel_futures = as_policy(self.cancel_futures)
        _check_int("threads_per_task", self.threads_per_task, 1)
        if not isinstance(self.progress, bool):
            _fail("progress", "true or false", self.progress)

    def replace(self, **changes: Any) -> "ParallelConfig":
        """A copy with some fields changed (and validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass
class JoblibConfig(ParallelConfig):
    """The joblib backend: loky worker processes on this machine."""

    # Name of the engine.
    backend: str = "joblib"
    # Seconds an idle worker of the backend's own pool (used by `wrap`) lives on.
    idle_worker_timeout: float = 300.0

    def validate(self) -> None:
        super().validate()
        if self.address is not None:
            _fail("address", "null for the joblib backend (it runs on this machine only)", self.address)
        _check_number("idle_worker_timeout", self.idle_worker_timeout, 0, strict=True)


@dataclass
class RayTaskOptions:
    """Options of every Ray task the backend submits (Ray's ``.options()``).

    ``executor.with_options(...)`` and ``backend.wrap(fn, ...)`` override them per call.
    """

    # CPUs each task reserves.
    num_cpus: float = 1.0
    # GPUs each task reserves.
    num_gpus: float = 0.0
    # Memory each task reserves, in bytes; null reserves none.
    memory: Optional[int] = None
    # Custom resources each task reserves, e.g. {special_hardware: 1}.
    resources: Optional[Any] = None  # (a mapping; see _check_resources)
    # Times Ray retries a task whose worker died (-1: forever).
    max_retries: int = 0
    # Retry tasks that raised an application exception too.
    retry_exceptions: bool = False
    # Per-task runtime environment (pip, env_vars, working_dir, ...).
    runtime_env: Optional[Any] = None  # (a mapping; see _check_resources)
    # Tasks a Ray worker process runs before Ray replaces it: 1 gives every task a fresh
    # process (no globals or CUDA context left by the one before); 0 never replaces it;
    # null is Ray's default (0, or 1 for tasks with GPUs). Set in the config only.
    max_calls: Optional[int] = None

    def __post_init__(self) -> None:
        _check_number("task.num_cpus", self.num_cpus, 0)
        _check_number("task.num_gpus", self.num_gpus, 0)
        _check_int("task.memory", self.memory, 1)
        self.resources = _check_resources("task.resources", self.resources)
        _check_int("task.max_retries", self.max_retries, -1, optional=False)
        _check_int("task.max_calls", self.max_calls, 0)
        self.runtime_env = plain(self.runtime_env)
        if self.runtime_env is not None and not isinstance(self.runtime_env, dict):
            _fail("task.runtime_env", "a mapping or null", self.runtime_env)


@dataclass
class RayConfig(ParallelConfig):
    """The Ray backend: a local Ray runtime, or a Ray cluster reached by ``address``."""

    # Name of the engine.
    backend: str = "ray"
    # GPUs of a local runtime (null: Ray detects them). Ignored with an address.
    num_gpus: Optional[int] = None
    # Bytes of a local runtime's object store (null: Ray's default).
    object_store_memory: Optional[int] = None
    # Start Ray's dashboard with a local runtime.
    include_dashboard: bool = False
    # Ray namespace of the job (null: an anonymous one).
    namespace: Optional[str] = None
    # Job-wide runtime environment passed to ray.init (pip, env_vars, working_dir, ...).
    runtime_env: Optional[Any] = None  # (a mapping; see _check_resources)
    # Options of every task: CPUs, GPUs, resources, retries, runtime_env.
    task: RayTaskOptions = field(default_factory=RayTaskOptions)

    def validate(self) -> None:
        super().validate()
        _check_int("num_gpus", self.num_gpus, 0)
        _check_int("object_store_memory", self.object_store_memory, RAY_MIN_OBJECT_STORE_BYTES)
        self.runtime_env = plain(self.runtime_env)
        if self.runtime_env is not None and not isinstance(self.runtime_env, dict):
            _fail("runtime_env", "a mapping or null", self.runtime_env)
        self.task = _as_options(RayTaskOptions, self.task, "task")


@dataclass
class DaskTaskOptions:
    """Options of every Dask task the backend submits (``Client.submit`` arguments).

    ``executor.with_options(...)`` and ``backend.wrap(fn, ...)`` override them per call.
    """

    # Abstract worker resources each task needs, e.g. {GPU: 1} (workers must declare them).
    resources: Optional[Any] = None  # (a mapping; see _check_resources)
    # Times Dask retries a task that failed.
    retries: int = 0
    # Scheduling priority; higher runs first.
    priority: int = 0

    def __post_init__(self) -> None:
        self.resources = _check_resources("task.resources", self.resources)
        _check_int("task.retries", self.retries, 0, optional=False)
        _check_int("task.priority", self.priority, -(2**31), optional=False)


@dataclass
class DaskConfig(ParallelConfig):
    """The Dask backend: a ``LocalCluster``, a batch cluster (``cluster``), or a
    scheduler reached by ``address``."""

    # Name of the engine.
    backend: str = "dask"
    # Worker processes of a local cluster (null: derived from n_cpus).
    n_workers: Optional[int] = None
    # Threads per worker of a local cluster (null: derived from n_cpus).
    threads_per_worker: Optional[int] = None
    # Workers are processes (true: CPU-bound Python scales) or threads of this process.
    processes: bool = True
    # Memory limit per worker of a local cluster: auto, 0 (none), or e.g. 4GB.
    memory_limit: str = "auto"
    # Serve a local cluster's dashboard (on 127.0.0.1, a free port).
    dashboard: bool = False
    # Folder for a local cluster's spill files (null: a temporary folder).
    local_directory: Optional[str] = None
    # Options of every task: resources, retries, priority.
    task: DaskTaskOptions = field(default_factory=DaskTaskOptions)
    # Where the workers run (the parallel/cluster group): null or local, a LocalCluster
    # on this machine; slurm, pbs, sge, lsf or htcondor, Dask workers in batch jobs of
    # that scheduler (n_workers of them). See parallel_hydra.cluster_config.
    cluster: Optional[Any] = None

    def validate(self) -> None:
        super().validate()
        self.cluster = as_cluster_kwargs(self.cluster)
        if self.cluster is not None and self.address is not None:
            _fail("cluster", "null (local) when address is set: the backend either connects to a scheduler "
                  "or starts a cluster", self.cluster["_target_"])
        _check_int("n_workers", self.n_workers, 1)
        _check_int("threads_per_worker", self.threads_per_worker, 1)
        if (
            not isinstance(self.memory_limit, (str, int))
            or isinstance(self.memory_limit, bool)
            or not _MEMORY_LIMIT.match(str(self.memory_limit))
        ):
            _fail("memory_limit", "auto, 0, a byte count or a size such as 4GB", self.memory_limit)
        self.memory_limit = str(self.memory_limit)
        self.task = _as_options(DaskTaskOptions, self.task, "task")


def _as_options(cls: type, value: Any, key: str) -> Any:
    """Build a task-options dataclass from itself, a mapping, or a Hydra node."""
    if isinstance(value, cls):
        return value
    value = plain(value)
    if not isinstance(value, dict):
        _fail(key, f"a mapping of {cls.__name__} fields", value)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        _fail(f"{key}.{unknown[0]}", "one of " + ", ".join(sorted(known)), unknown[0])
    return cls(**value)
