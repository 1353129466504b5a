"""The Hydra launcher plugin behind ``hydra/launcher=parallel_joblib|parallel_ray|parallel_dask``.

Hydra instantiates launchers only from classes defined under ``hydra_plugins``, so the
class lives here; it only keeps what Hydra gives it and hands each ``launch`` to
:mod:`parallel_hydra.launcher`. Hydra imports this module in every app on the machine,
so it imports no engine: the work (and the engine) is loaded inside ``launch``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class ParallelLauncher(Launcher):
    """Runs each job of a sweep as one task on a parallel_hydra backend.

    ``settings`` are the launcher option's fields: the engine's config (as in the
    ``parallel`` group) plus ``max_concurrent_jobs`` and ``fail_fast``.
    """

    def __init__(self, **settings: Any) -> None:
        self.settings: Dict[str, Any] = settings
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from parallel_hydra.launcher import launch

        assert self.config is not None and self.task_function is not None and self.hydra_context is not None
        return launch(
            settings=self.settings,
            config=self.config,
            task_function=self.task_function,
            hydra_context=self.hydra_context,
            job_overrides=job_overrides,
            initial_job_idx=initial_job_idx,
        )
