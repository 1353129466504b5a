"""Where the Dask backend's workers run: the ``parallel/cluster`` config group.

``local`` (the default) is the ``LocalCluster`` the backend starts on this machine. The
other options are batch clusters of dask-jobqueue: the backend submits batch jobs
(``sbatch``, ``qsub``, ``bsub``, ``condor_submit``) whose scripts start Dask workers
that connect back to a scheduler in the app's process::

    python train.py parallel=dask +parallel/cluster=slurm parallel.cluster.queue=gpu \\
        parallel.cluster.cores=8 parallel.cluster.memory=32GB parallel.n_workers=20

Each option is a dataclass whose ``_target_`` names the dask-jobqueue class and whose
fields are that class's common keyword arguments. A field left ``null`` is not passed,
so dask-jobqueue's own default (its ``jobqueue.yaml`` config) applies. Any other keyword
argument of the class can be added on the command line with
``+parallel.cluster.KEY=VALUE``: Hydra keeps the fields' types, and the option's node
accepts new keys (see :func:`open_node`).

In Python, ``DaskConfig(cluster=...)`` takes ``None`` or ``"local"``, an option's name
(``"slurm"``), one of these dataclasses (``SLURMClusterConfig(cores=8)``), or a mapping
with a ``_target_``; :func:`as_cluster_kwargs` turns each into the plain dictionary the
backend uses.

This module imports neither Dask nor dask-jobqueue (nor Hydra): the Hydra plugin reads it
in every Hydra app on the machine.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NoReturn, Optional

from .checks import require_integer

__all__ = [
    "LocalClusterConfig",
    "JobQueueClusterConfig",
    "SLURMClusterConfig",
    "PBSClusterConfig",
    "SGEClusterConfig",
    "LSFClusterConfig",
    "HTCondorClusterConfig",
    "CLUSTER_OPTIONS",
    "LOCAL_TARGET",
    "as_cluster_kwargs",
    "open_node",
]

#: The ``_target_`` of the ``local`` option: the backend's own ``LocalCluster``.
LOCAL_TARGET = "distributed.LocalCluster"

_PREFIX = "parallel config: "


def _fail(key: str, allowed: str, value: Any) -> NoReturn:
    raise ValueError(f"{_PREFIX}{key} must be {allowed}; got {value!r}")


@dataclass
class LocalClusterConfig:
    """``parallel/cluster=local``: a ``LocalCluster`` on this machine (the default).

    Its size and layout are the Dask option's own fields (``n_cpus``, ``n_workers``,
    ``threads_per_worker``, ``processes``, ``memory_limit``, ``local_directory``).
    """

    # The cluster class: the backend's own LocalCluster.
    _target_: str = LOCAL_TARGET


#: A size such as ``4GB``, ``500 MiB`` or a plain byte count.
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([kKmMgGtTpP]i?)?[bB]?\s*$")


@dataclass
class JobQueueClusterConfig:
    """What every dask-jobqueue cluster takes. Not an option itself: see its subclasses.

    ``n_workers`` of the Dask option counts Dask worker processes, as dask-jobqueue's
    ``scale(n=...)`` does: the backend submits ``ceil(n_workers / processes)`` batch jobs.
    """

    # The dask-jobqueue cluster class the backend builds.
    _target_: str = ""
    # Cores of each batch job; its worker processes share them (threads per worker:
    # cores / processes).
    cores: int = 1
    # Dask worker processes per batch job.
    processes: int = 1
    # Memory of each batch job, shared by its worker processes (e.g. 4GB).
    memory: str = "2GB"
    # Name of the batch jobs (null: dask-jobqueue's, dask-worker).
    job_name: Optional[str] = None
    # Shell lines run in each job before its workers start (module load, source a venv).
    job_script_prologue: Optional[List[str]] = None
    # Header directives to leave out of the job script (lines containing these strings).
    job_directives_skip: Optional[List[str]] = None
    # Folder for the batch jobs' output and error files (null: the scheduler's default).
    log_directory: Optional[str] = None
    # More arguments of `dask worker` in each job (e.g. [--resources, GPU=1]).
    worker_extra_args: Optional[List[str]] = None
    # Folder on the compute node for the workers' spill files (e.g. $TMPDIR).
    local_directory: Optional[str] = None
    # Network interface of the workers and the scheduler (e.g. ib0); null: Dask's choice.
    interface: Optional[str] = None
    # Address the scheduler (in this process) listens on; the compute nodes must reach
    # it. null: the interface's address, or every interface.
    host: Optional[str] = None
    # More arguments of the scheduler in this process (e.g. {port: 8786}).
    scheduler_options: Optional[Dict[str, Any]] = None
    # Seconds a worker waits for a scheduler that is gone before it exits, ending its job.
    death_timeout: Optional[float] = None
    # Python that runs the workers in the jobs (null: the interpreter of this process).
    python: Optional[str] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the common fields, raising ``ValueError`` that names the first bad one."""
        if not isinstance(self._target_, str) or not self._target_.strip():
            _fail("cluster._target_", "the dotted name of a dask-jobqueue cluster class", self._target_)
        require_integer("cluster.cores", self.cores, minimum=1, prefix=_PREFIX)
        require_integer("cluster.processes", self.processes, minimum=1, prefix=_PREFIX)
        if self.processes > self.cores:
            raise ValueError(
                f"{_PREFIX}cluster.processes ({self.processes}) must be at most cluster.cores ({self.cores}): "
                f"each worker process gets cores / processes threads"
            )
        if not isinstance(self.memory, (str, int)) or isinstance(self.memory, bool) or not _SIZE.match(str(self.memory)):
            _fail("cluster.memory", "a size such as 4GB or 500MiB", self.memory)
        self.memory = str(self.memory)
        for name in ("job_name", "log_directory", "local_directory", "interface", "host", "python"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                _fail(f"cluster.{name}", "a non-empty string or null", value)
        for name in ("job_script_prologue", "job_directives_skip", "worker_extra_args"):
            value = _plain(getattr(self, name))
            if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
                _fail(f"cluster.{name}", "a list of strings or null", value)
            setattr(self, name, value)
        self.scheduler_options = _plain(self.scheduler_options)
        if self.scheduler_options is not None and not isinstance(self.scheduler_options, dict):
            _fail("cluster.scheduler_options", "a mapping or null", self.scheduler_options)
        if self.death_timeout is not None and (
            isinstance(self.death_timeout, bool) or not isinstance(self.death_timeout, (int, float)) or self.death_timeout <= 0
        ):
            _fail("cluster.death_timeout", "a number of seconds > 0 or null", self.death_timeout)

    @property
    def threads_per_worker(self) -> int:
        """Threads of each Dask worker process: ``cores // processes``."""
        return self.cores // self.processes


@dataclass
class SLURMClusterConfig(JobQueueClusterConfig):
    """``parallel/cluster=slurm``: Dask workers in SLURM batch jobs (``sbatch``)."""

    # The dask-jobqueue cluster class the backend builds.
    _target_: str = "dask_jobqueue.SLURMCluster"
    # Partition of the jobs (#SBATCH -p); null: the cluster's default partition.
    queue: Optional[str] = None
    # Account the jobs are charged to (#SBATCH -A).
    account: Optional[str] = None
    # Time limit of each job (#SBATCH -t), e.g. 02:00:00; a worker ends with its job.
    walltime: Optional[str] = "01:00:00"
    # More #SBATCH directives, e.g. ["--gres=gpu:1", "--qos=short"].
    job_extra_directives: Optional[List[str]] = None


@dataclass
class PBSClusterConfig(JobQueueClusterConfig):
    """``parallel/cluster=pbs``: Dask workers in PBS / Torque batch jobs (``qsub``)."""

    # The dask-jobqueue cluster class the backend builds.
    _target_: str = "dask_jobqueue.PBSCluster"
    # Queue of the jobs (#PBS -q).
    queue: Optional[str] = None
    # Account the jobs are charged to (#PBS -A).
    account: Optional[str] = None
    # Resource request of each job (#PBS -l), e.g. select=1:ncpus=8:mem=32GB; null: from cores and memory.
    resource_spec: Optional[str] = None
    # Time limit of each job (#PBS -l walltime=), e.g. 02:00:00.
    walltime: Optional[str] = "01:00:00"
    # More #PBS directives, e.g. ["-m abe"].
    job_extra_directives: Optional[List[str]] = None


@dataclass
class SGEClusterConfig(JobQueueClusterConfig):
    """``parallel/cluster=sge``: Dask workers in (Sun/Univa/Son of) Grid Engine jobs (``qsub``)."""

    # The dask-jobqueue cluster class the backend builds.
    _target_: str = "dask_jobqueue.SGECluster"
    # Queue of the jobs (#$ -q).
    queue: Optional[str] = None
    # Project the jobs are charged to (#$ -P).
    project: Optional[str] = None
    # Resource request of each job (#$ -l), e.g. h_vmem=32G,num_proc=8.
    resource_spec: Optional[str] = None
    # Time limit of each job (#$ -l h_rt=), e.g. 02:00:00.
    walltime: Optional[str] = "01:00:00"
    # More #$ directives.
    job_extra_directives: Optional[List[str]] = None


@dataclass
class LSFClusterConfig(JobQueueClusterConfig):
    """``parallel/cluster=lsf``: Dask workers in IBM Spectrum LSF jobs (``bsub``)."""

    # The dask-jobqueue cluster class the backend builds.
    _target_: str = "dask_jobqueue.LSFCluster"
    # Queue of the jobs (#BSUB -q).
    queue: Optional[str] = None
    # Project the jobs are charged to (#BSUB -P).
    project: Optional[str] = None
    # Time limit of each job (#BSUB -W), as HH:MM.
    walltime: Optional[str] = "01:00"
    # More #BSUB directives.
    job_extra_directives: Optional[List[str]] = None


@dataclass
class HTCondorClusterConfig(JobQueueClusterConfig):
    """``parallel/cluster=htcondor``: Dask workers in HTCondor jobs (``condor_submit``).

    HTCondor has no queues or time limits in the job script; use ``job_extra_directives``
    (a mapping of submit-file keys) for what your pool asks for.
    """

    # The dask-jobqueue cluster class the backend builds.
    _target_: str = "dask_jobqueue.HTCondorCluster"
    # Disk of each job (request_disk), e.g. 4GB.
    disk: str = "1GB"
    # More submit-file entries, e.g. {+JobFlavour: '"tomorrow"', requirements: ...}.
    job_extra_directives: Optional[Dict[str, str]] = None

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.disk, (str, int)) or isinstance(self.disk, bool) or not _SIZE.match(str(self.disk)):
            _fail("cluster.disk", "a size such as 4GB", self.disk)
        self.disk = str(self.disk)


#: ``parallel/cluster=NAME``: the group's options.
CLUSTER_OPTIONS: Dict[str, type] = {
    "local": LocalClusterConfig,
    "slurm": SLURMClusterConfig,
    "pbs": PBSClusterConfig,
    "sge": SGEClusterConfig,
    "lsf": LSFClusterConfig,
    "htcondor": HTCondorClusterConfig,
}

#: The option of each ``_target_``.
_BY_TARGET: Dict[str, type] = {cls._target_: cls for cls in CLUSTER_OPTIONS.values()}  # type: ignore[attr-defined]


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain ``dict``/``list`` (a late import: no cycle, no cost)."""
    from .config import plain

    return plain(value)


def _options_text() -> str:
    return ", ".join(CLUSTER_OPTIONS)


def as_cluster_kwargs(value: Any) -> Optional[Dict[str, Any]]:
    """Check a ``cluster`` value; ``None`` for the local cluster, else a plain dict.

    The dict holds the ``_target_`` and the keyword arguments of the cluster class: every
    field that is not ``null``, plus any extra key (added with ``+parallel.cluster.KEY=``).
    Raises ``ValueError`` naming the key at fault and what it allows; an unknown option
    name lists the options.

    Examples
    --------
    >>> as_cluster_kwargs("local") is None
    True
    >>> as_cluster_kwargs({"_target_": "dask_jobqueue.SLURMCluster", "cores": 2, "qos": "short"})["qos"]
    'short'
    >>> as_cluster_kwargs("slrum")
    Traceback (most recent call last):
    ...
    ValueError: parallel config: cluster must be null or one of local, slurm, pbs, sge, lsf, htcondor (or a cluster config with a _target_); got 'slrum'
    """
    if value is None:
        return None
    if isinstance(value, str):
        option = CLUSTER_OPTIONS.get(value.strip().lower())
        if option is None:
            _fail("cluster", f"null or one of {_options_text()} (or a cluster config with a _target_)", value)
        value = option()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    value = _plain(value)
    if not isinstance(value, Mapping):
        _fail("cluster", f"null, one of {_options_text()}, a cluster config or a mapping with a _target_", value)
    values = dict(value)
    target = values.get("_target_")
    if target is None or target == LOCAL_TARGET:
        extra = sorted(set(values) - {"_target_"})
        if extra:
            raise ValueError(
                f"{_PREFIX}cluster.{extra[0]} is not a field of the local cluster (parallel/cluster=local): "
                f"set the Dask option's own fields (n_workers, threads_per_worker, memory_limit, ...)"
            )
        return None
    cls: Any = _BY_TARGET.get(target)
    if cls is None:
        if not isinstance(target, str) or not target.startswith("dask_jobqueue."):
            _fail("cluster._target_", f"{LOCAL_TARGET} or a dask-jobqueue class ({', '.join(_BY_TARGET)}, ...)", target)
        cls = JobQueueClusterConfig
    known = {f.name for f in dataclasses.fields(cls)}
    checked = cls(**{k: v for k, v in values.items() if k in known})
    result: Dict[str, Any] = {}
    for f in dataclasses.fields(checked):
        if getattr(checked, f.name) is not None:
            result[f.name] = getattr(checked, f.name)
    result.update({k: v for k, v in values.items() if k not in known})
    return result


def open_node(cls: type) -> Any:
    """The option ``cls`` as an OmegaConf node that accepts keys it does not declare.

    Its fields keep their types (``parallel.cluster.cores=abc`` is refused), but the node
    is not in struct mode, so ``+parallel.cluster.KEY=VALUE`` adds any other keyword
    argument of the cluster class. (OmegaConf 2.2 and 2.3 keep a node's own struct flag
    when Hydra merges it into the app's config.)
    """
    from omegaconf import OmegaConf

    node = OmegaConf.structured(cls)
    OmegaConf.set_struct(node, False)
    return node

