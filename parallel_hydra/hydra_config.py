"""The Hydra config group ``parallel``: one option per engine, each a structured config.

Each option is its engine's config dataclass plus a ``_target_``, so
``hydra.utils.instantiate(cfg.parallel)`` returns a started backend. The group is put in
Hydra's ``ConfigStore`` by :func:`register_configs`, which the package's Hydra plugin
(``hydra_plugins.parallel_hydra_plugin``) calls whenever any Hydra app starts: a user's
``defaults: [{parallel: joblib}]`` then works with no YAML copied from us.

Nothing here imports an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Type

from .config import DaskConfig, JoblibConfig, ParallelConfig, RayConfig

__all__ = ["JoblibNode", "RayNode", "DaskNode", "GROUP", "register_configs"]

#: The name of the config group, as in ``parallel=ray`` on the command line.
GROUP = "parallel"


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


def register_configs() -> None:
    """Store the ``parallel`` group's options in Hydra's ``ConfigStore``.

    Calling it again stores the same nodes again, which is harmless.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, node in OPTIONS.items():
        store.store(group=GROUP, name=name, node=node, provider="parallel_hydra")
