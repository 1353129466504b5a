"""Shared fixtures: one backend per engine for the whole session, and CI's guards.

The engine-specific fixtures live in ``ray_support.py`` and ``dask_support.py`` beside
this file; they are imported here so that every test module sees them.
"""

from __future__ import annotations

import os

# Ray reads this when it is imported: it keeps single-node runtimes on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

from parallel_hydra import BaseParallelBackend, JoblibParallelBackend  # noqa: E402

from dask_support import *  # noqa: E402,F401,F403
from ray_support import *  # noqa: E402,F401,F403

from parallel_hydra.engines import BY_NAME, ENGINES as _ENGINE_TABLE  # noqa: E402

ENGINES = [engine.name for engine in _ENGINE_TABLE]


@pytest.fixture(scope="session")
def joblib_backend() -> Iterator[BaseParallelBackend]:
    with JoblibParallelBackend(n_cpus=2) as backend:
        yield backend


@pytest.fixture(params=ENGINES)
def backend(request: pytest.FixtureRequest) -> BaseParallelBackend:
    """Each engine's session backend in turn, for the conformance suite.

    On a developer's machine without Ray or Dask installed, that engine's tests are
    skipped, saying so; in CI a skip fails the run (see ``pytest_sessionfinish``).
    """
    pytest.importorskip(BY_NAME[request.param].requires, reason=f"the {request.param} engine is not installed")
    return request.getfixturevalue(f"{request.param}_backend")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test means an engine did not really run: fail the run."""
    if not os.environ.get("CI"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(f"CI: {len(skipped)} test(s) were skipped; every engine must run in CI", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
