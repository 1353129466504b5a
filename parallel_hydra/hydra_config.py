"""The Hydra config groups ``parallel`` and ``hydra/launcher``: one option per engine.

Each ``parallel`` option is its engine's config dataclass plus a ``_target_``, so
``hydra.utils.instantiate(cfg.parallel)`` returns a started backend. Each launcher option
(``hydra/launcher=parallel_ray``, ...) is the same dataclass plus the launcher's own
fields, so a sweep runs on the same engines, clusters and fields as the jobs themselves.
The Dask options also have a ``cluster`` subgroup (``parallel/cluster`` and
``hydra/launcher/cluster``: ``local``, ``slurm``, ``pbs``, ...; see
:mod:`parallel_hydra.cluster_config`). All groups are put in Hydra's ``ConfigStore`` by
:func:`register_configs`, which the
package's Hydra plugin (``hydra_plugins.parallel_hydra_plugin``) calls whenever any Hydra
app starts: a user's ``defaults: [{parallel: joblib}]`` or ``-m
hydra/launcher=parallel_joblib`` then works with no YAML copied from us.

Nothing here imports an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any, Dict, List, Optional, Tuple, Type

from .cluster_config import CLUSTER_OPTIONS, open_node
from .config import ParallelConfig
from .engines import ENGINES

__all__ = [
    "JoblibNode",
    "RayNode",
    "DaskNode",
    "LauncherOptions",
    "JoblibLauncherNode",
    "RayLauncherNode",
    "DaskLauncherNode",
    "GROUP",
    "CLUSTER_GROUP",
    "LAUNCHER_GROUP",
    "LAUNCHER_KEYS",
    "register_configs",
]

#: The name of the config group, as in ``parallel=ray`` on the command line.
GROUP = "parallel"
#: The Dask option's cluster group, as in ``+parallel/cluster=slurm``; the launcher's is
#: ``hydra/launcher/cluster``.
CLUSTER_GROUP = "parallel/cluster"
#: Hydra's group of launchers, as in ``hydra/launcher=parallel_ray``.
LAUNCHER_GROUP = "hydra/launcher"
#: The Hydra plugin class the launcher options instantiate. Hydra only instantiates
#: plugins defined under the ``hydra_plugins`` package, so it cannot live in this one.
LAUNCHER_TARGET = "hydra_plugins.parallel_hydra_plugin.launcher.ParallelLauncher"


def _node(name: str, bases: Tuple[type, ...], target: str, doc: str) -> Type[ParallelConfig]:
    """A config group option: the engine's config dataclass plus a ``_target_``.

    An engine config with a ``cluster`` field (Dask) also gets ``_recursive_: false``:
    the cluster option has a ``_target_`` of its own (``dask_jobqueue.SLURMCluster``),
    which the backend builds when it starts; Hydra's ``instantiate`` must not.
    """
    fields: List[Tuple[str, type, Any]] = [("_target_", str, field(default=target))]
    if any("cluster" in getattr(base, "__dataclass_fields__", {}) for base in bases):
        fields.append(("_recursive_", bool, field(default=False)))
    node = make_dataclass(name, fields, bases=bases)
    node.__doc__ = doc
    node.__module__ = __name__
    return node


#: ``parallel=NAME``: the engine's config, whose ``_target_`` is its backend.
OPTIONS: Dict[str, Type[ParallelConfig]] = {
    engine.name: _node(
        f"{engine.backend_class.replace('ParallelBackend', '')}Node",
        (engine.config_class,),
        engine.target,
        f"``parallel={engine.name}``: {engine.summary}.",
    )
    for engine in ENGINES
}
JoblibNode, RayNode, DaskNode = OPTIONS["joblib"], OPTIONS["ray"], OPTIONS["dask"]


@dataclass
class LauncherOptions:
    """What a launcher option adds to its engine's fields (read by the launcher only).

    The engine's ``cancel_futures`` does not apply to a sweep: a sweep waits for its
    jobs, and only ``fail_fast`` or Ctrl-C stops them (policy ``ALL``).
    """

    # At most this many jobs run at once; null: as many as the engine has slots.
    max_concurrent_jobs: Optional[int] = None
    # The first failed job cancels the other jobs (policy ALL) and the sweep exits non-zero.
    fail_fast: bool = False


#: The keys of :class:`LauncherOptions`, which are not backend fields.
LAUNCHER_KEYS = ("max_concurrent_jobs", "fail_fast")


#: ``hydra/launcher=parallel_NAME``: the engine's config plus the launcher's fields;
#: Hydra instantiates the launcher plugin from it.
LAUNCHER_OPTIONS: Dict[str, Type[ParallelConfig]] = {
    f"parallel_{engine.name}": _node(
        f"{engine.backend_class.replace('ParallelBackend', '')}LauncherNode",
        (engine.config_class, LauncherOptions),
        LAUNCHER_TARGET,
        f"``hydra/launcher=parallel_{engine.name}``: each job of a sweep a task on {engine.summary}.",
    )
    for engine in ENGINES
}
JoblibLauncherNode = LAUNCHER_OPTIONS["parallel_joblib"]
RayLauncherNode = LAUNCHER_OPTIONS["parallel_ray"]
DaskLauncherNode = LAUNCHER_OPTIONS["parallel_dask"]


def register_configs() -> None:
    """Store the ``parallel`` group's and the launcher options in Hydra's ``ConfigStore``.

    Calling it again stores the same nodes again, which is harmless.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, node in OPTIONS.items():
        store.store(group=GROUP, name=name, node=node, provider="parallel_hydra")
    for name, node in LAUNCHER_OPTIONS.items():
        store.store(group=LAUNCHER_GROUP, name=name, node=node, provider="parallel_hydra")
    # Where the Dask option's workers run: the same options under both groups, so that
    # `+hydra/launcher/cluster=slurm` runs a sweep's jobs in batch jobs too.
    for name, cluster in CLUSTER_OPTIONS.items():
        for group in (CLUSTER_GROUP, f"{LAUNCHER_GROUP}/cluster"):
            store.store(group=group, name=name, node=open_node(cluster), provider="parallel_hydra")
