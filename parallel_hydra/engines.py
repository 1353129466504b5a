"""The engines that ship with the package: one table, read by everything that lists them.

The backend registry (which module to import for ``backend: ray``), the lazy attributes
of the package (``parallel_hydra.RayParallelBackend``), and both Hydra groups
(``parallel=ray``, ``hydra/launcher=parallel_ray``) are all made from :data:`ENGINES`,
so adding an engine is one row here plus its module under ``backends/``.

Nothing here imports an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple, Type

from .config import DaskConfig, JoblibConfig, ParallelConfig, RayConfig

__all__ = ["Engine", "ENGINES", "BY_NAME"]


@dataclass(frozen=True)
class Engine:
    """One engine: its name, where its backend lives, and the config that drives it."""

    #: The value of ``backend`` in a config, and the ``parallel`` group's option name.
    name: str
    #: The module of its backend, imported when the engine is first used.
    module: str
    #: The backend's class in that module.
    backend_class: str
    #: Its config dataclass (the Hydra schema of its options).
    config_class: Type[ParallelConfig]
    #: What its ``parallel`` option is, in a few words (the option's docstring).
    summary: str
    #: The third-party module it needs (its extra installs it).
    requires: str

    @property
    def target(self) -> str:
        """The dotted path Hydra's ``instantiate`` builds a backend from."""
        return f"{self.module}.{self.backend_class}"


ENGINES: Tuple[Engine, ...] = (
    Engine("joblib", "parallel_hydra.backends.joblib", "JoblibParallelBackend", JoblibConfig,
           "loky worker processes on this machine (the default)", "joblib"),
    Engine("ray", "parallel_hydra.backends.ray", "RayParallelBackend", RayConfig,
           "a local Ray runtime, or a Ray cluster by address", "ray"),
    Engine("dask", "parallel_hydra.backends.dask", "DaskParallelBackend", DaskConfig,
           "a Dask LocalCluster, or a Dask scheduler by address", "distributed"),
)

#: The engines by name.
BY_NAME: Dict[str, Engine] = {engine.name: engine for engine in ENGINES}
