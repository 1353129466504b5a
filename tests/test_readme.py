"""Every snippet of the README runs as written.

Python snippets run as scripts; the Hydra snippet runs as a user's app, with the YAML
snippet before it as its config, and then with the command lines shown after it. The
example app's command lines run from the repository. Only the set-up commands (which CI
itself runs) and the two scripts meant to be run by hand for minutes (the benchmark, the
soak script) are run with smaller arguments.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

from apps import leftovers, run_app
from ray_support import REPO_ROOT, app_env

README = REPO_ROOT / "README.md"


def snippets(language: str) -> List[Tuple[int, str]]:
    """``(line number, code)`` of each fenced block of ``language`` in the README."""
    found = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.S | re.M):
        if match.group(1) == language:
            found.append((README.read_text()[: match.start()].count("\n") + 1, match.group(2)))
    return found


def command_lines(code: str) -> List[str]:
    return [line.split("  #")[0].strip() for line in code.splitlines() if line.strip() and not line.startswith("#")]


def run_line(line: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    words = shlex.split(line)
    assert words[0] in ("python", "python3"), line
    return subprocess.run([sys.executable, *words[1:]], cwd=cwd, env=app_env(HYDRA_FULL_ERROR="1"),
                          capture_output=True, text=True, timeout=timeout)


def test_the_readme_has_the_snippets_this_file_runs() -> None:
    assert len(snippets("python")) == 4 and any("@hydra.main" in code for _, code in snippets("python"))
    assert len(snippets("yaml")) == 1


@pytest.mark.parametrize("line, code", [s for s in snippets("python") if "@hydra.main" not in s[1]])
def test_a_python_snippet_runs(line: int, code: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(code)
    run = run_app(script, [], cwd=tmp_path, env=app_env(), timeout=300)
    assert run.returncode == 0, f"README line {line}:\n{run.output[-3000:]}"
    assert "bootstrapping phase" not in run.output
    assert leftovers(run.marker) == []


def test_the_hydra_snippet_runs_in_a_users_repo_with_the_commands_shown(tmp_path: Path, dask_cluster_address: str) -> None:
    (_, config), = snippets("yaml")
    (_, app), = [s for s in snippets("python") if "@hydra.main" in s[1]]
    assert config.startswith("# conf/config.yaml")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(config)
    (tmp_path / "train.py").write_text(app)
    # The HPC commands need a SLURM: test_slurm.py runs them.
    shown = [code for _, code in snippets("bash") if "python train.py" in code and "cluster=slurm" not in code]
    lines = ["python train.py"] + [line for code in shown for line in command_lines(code)]
    for line in lines:
        # The README names the usual local scheduler port; the test's cluster has its own.
        run = run_line(line.replace("tcp://127.0.0.1:8786", dask_cluster_address), tmp_path)
        assert run.returncode == 0, f"{line}\n{run.stdout[-2000:]}{run.stderr[-3000:]}"
        if "hydra/launcher=" not in line:
            assert re.search(r"^10000$", run.stdout, flags=re.M), f"{line} printed {run.stdout!r}"
            continue
        # Jobs print on the engine's workers; the sweep's own record says how they ended.
        newest = max((tmp_path / "multirun").glob("*/*/results.jsonl"), key=lambda p: p.stat().st_mtime)
        statuses = [json.loads(row)["status"] for row in newest.read_text().splitlines()]
        assert statuses and set(statuses) == {"COMPLETED"}, f"{line}: {statuses}"


def test_the_example_commands_run_from_the_repository(dask_cluster_address: str) -> None:
    (code,) = [code for _, code in snippets("bash") if "examples/train.py" in code and "venv" not in code]
    lines = command_lines(code)
    assert len(lines) == 4
    for line in lines:
        # The README names the usual local scheduler port; the test's cluster has its own.
        line = line.replace("tcp://127.0.0.1:8786", dask_cluster_address)
        run = run_line(line + " bootstrap.n_resamples=40", REPO_ROOT)
        assert run.returncode == 0, f"{line}\n{run.stdout[-2000:]}{run.stderr[-3000:]}"
        assert "bootstrap_r2_95%_ci=" in run.stdout


@pytest.mark.parametrize("script, small", [("benchmarks/bench.py", "--tasks 50 --rounds 1 --map-items 2000"),
                                           ("benchmarks/launcher_bench.py", "--jobs 2 --seconds 0 --launchers basic,parallel_joblib"),
                                           ("tests/soak_dask_kills.py", "--rounds 2")])
def test_the_scripts_run_by_hand_run(script: str, small: str, dask_cluster_address: str) -> None:
    lines = [line for _, code in snippets("bash") for line in command_lines(code) if script in line]
    assert lines
    for line in lines:
        # The README names the usual local scheduler port; the test's cluster has its own.
        words = shlex.split(line.replace("tcp://127.0.0.1:8786", dask_cluster_address))
        assert words[:2] == ["python", script]
        joined = ["--engines", "", "--dask-address", words[words.index("--dask-address") + 1]] if "--dask-address" in words else []
        run = subprocess.run([sys.executable, script, *small.split(), *joined], cwd=REPO_ROOT, env=app_env(),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        if joined:
            assert "joined  claims    on" in run.stdout, run.stdout[-2000:]
