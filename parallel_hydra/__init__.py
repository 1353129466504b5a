"""parallel_hydra: one interface over joblib, Ray and Dask, chosen through Hydra.

Importing this package imports no engine: Ray and Dask are loaded when their backend is
first used, and joblib when a CPU count or the joblib backend is needed.

Examples
--------
>>> from parallel_hydra import ParallelConfig, init_executor
>>> with init_executor(config=ParallelConfig(n_cpus=1)) as executor:
...     list(executor.map(str.upper, ["a", "b"]))
['A', 'B']
"""

from __future__ import annotations

import importlib
from typing import Any

from .backend import BaseParallelBackend, available_cpus, effective_n_jobs, init_executor, init_parallel_backend
from .engines import ENGINES
from .config import DaskConfig, DaskTaskOptions, JoblibConfig, ParallelConfig, RayConfig, RayTaskOptions
from .executor import ParallelExecutor, TaskRunner
from .map_reduce import MapReduceJob
from .policy import CancellationPolicy

__all__ = [
    "BaseParallelBackend",
    "CancellationPolicy",
    "DaskConfig",
    "DaskParallelBackend",
    "DaskTaskOptions",
    "JoblibConfig",
    "JoblibParallelBackend",
    "MapReduceJob",
    "ParallelConfig",
    "ParallelExecutor",
    "RayConfig",
    "RayParallelBackend",
    "RayTaskOptions",
    "TaskRunner",
    "available_cpus",
    "effective_n_jobs",
    "init_executor",
    "init_parallel_backend",
]

__version__ = "0.1.0"

#: The engine backends, loaded on first use so that `import parallel_hydra` stays cheap.
_LAZY = {engine.backend_class: engine.module for engine in ENGINES}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'parallel_hydra' has no attribute {name!r}")
