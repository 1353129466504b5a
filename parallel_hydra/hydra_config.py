"""The Hydra config groups ``parallel`` and ``hydra/launcher``: one option per engine.

Each ``parallel`` option is its engine's config dataclass plus a ``_target_``, so
``hydra.utils.instantiate(cfg.parallel)`` returns a started backend. Each launcher option
(``hydra/launcher=parallel_ray``, ...) is the same dataclass plus the launcher's own
fields, so a sweep runs on the same engines, clusters and fields as the jobs themselves.
Both groups are put in Hydra's ``ConfigStore`` by :func:`register_configs`, which the
package's Hydra plugin (``hydra_plugins.parallel_hydra_plugin``) calls whenever any Hydra
app starts: a user's ``defaults: [{parallel: joblib}]`` or ``-m
hydra/launcher=parallel_joblib`` then works with no YAML copied from us.

Nothing here imports an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Type

from .config import DaskConfig, JoblibConfig, ParallelConfig, RayConfig

__all__ = [
    "JoblibNode",
    "RayNode",
    "DaskNode",
    "LauncherOptions",
    "JoblibLauncherNode",
    "RayLauncherNode",
    "DaskLauncherNode",
    "GROUP",
    "LAUNCHER_GROUP",
    "LAUNCHER_KEYS",
    "register_configs",
]

#: The name of the config group, as in ``parallel=ray`` on the command line.
GROUP = "parallel"
#: Hydra's group of launchers, as in ``hydra/launcher=parallel_ray``.
LAUNCHER_GROUP = "hydra/launcher"
#: The Hydra plugin class the launcher options instantiate. Hydra only instantiates
#: plugins defined under the ``hydra_plugins`` package, so it cannot live in this one.
LAUNCHER_TARGET = "hydra_plugins.parallel_hydra_plugin.launcher.ParallelLauncher"


@dataclass
class JoblibNode(JoblibConfig):
    """``parallel=joblib``: loky worker processes on this machine (the default)."""

    # What Hydra's instantiate builds from this node.
    _target_: str = "parallel_hydra.backends.joblib.JoblibParallelBackend"


@dataclass
class RayNode(RayConfig):
    """``parallel=ray``: a local Ray runtime, or a Ray cluster by ``address``."""

    # What Hydra's instantiate builds from this node.
    _target_: str = "parallel_hydra.backends.ray.RayParallelBackend"


@dataclass
class DaskNode(DaskConfig):
    """``parallel=dask``: a Dask LocalCluster, or a Dask scheduler by ``address``."""

    # What Hydra's instantiate builds from this node.
    _target_: str = "parallel_hydra.backends.dask.DaskParallelBackend"


OPTIONS: Dict[str, Type[ParallelConfig]] = {"joblib": JoblibNode, "ray": RayNode, "dask": DaskNode}


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


@dataclass
class JoblibLauncherNode(JoblibConfig, LauncherOptions):
    """``hydra/launcher=parallel_joblib``: each job a task in a loky worker process."""

    # What Hydra instantiates from this node: the launcher plugin.
    _target_: str = LAUNCHER_TARGET


@dataclass
class RayLauncherNode(RayConfig, LauncherOptions):
    """``hydra/launcher=parallel_ray``: each job a Ray task, on a local runtime or a cluster."""

    # What Hydra instantiates from this node: the launcher plugin.
    _target_: str = LAUNCHER_TARGET


@dataclass
class DaskLauncherNode(DaskConfig, LauncherOptions):
    """``hydra/launcher=parallel_dask``: each job a Dask task, on a local cluster or a scheduler."""

    # What Hydra instantiates from this node: the launcher plugin.
    _target_: str = LAUNCHER_TARGET


LAUNCHER_OPTIONS: Dict[str, Type[ParallelConfig]] = {
    "parallel_joblib": JoblibLauncherNode,
    "parallel_ray": RayLauncherNode,
    "parallel_dask": DaskLauncherNode,
}


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
