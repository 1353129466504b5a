"""Bootstrap confidence interval of a ridge regression's R^2, on any engine.

    python examples/train.py                                  # joblib, all CPUs
    python examples/train.py parallel=ray parallel.n_cpus=2   # a local Ray runtime
    python examples/train.py parallel=dask parallel.address=tcp://127.0.0.1:8786
    python examples/train.py -m parallel=joblib,ray,dask      # one run per engine

The job is real research work in miniature: fit a model on cross-validation folds
(through the backend's executor, with the data sent once through its object store),
then resample the data set many times (through ``MapReduceJob``, seeded so the interval
is reproducible) and report the percentile interval of the score.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Tuple

import hydra
import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig


def make_data(n_samples: int, n_features: int, noise: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """A linear problem with known coefficients and Gaussian noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_samples, n_features))
    coef = rng.normal(size=n_features)
    y = x @ coef + rng.normal(scale=noise, size=n_samples)
    return x, y


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Closed-form ridge regression coefficients."""
    return np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)


def r2(y: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination."""
    return float(1.0 - np.sum((y - predicted) ** 2) / np.sum((y - y.mean()) ** 2))


def fold_score(data: Tuple[np.ndarray, np.ndarray], fold: int, n_folds: int, alpha: float) -> float:
    """Out-of-fold R^2 of one cross-validation fold."""
    x, y = data
    test = np.arange(len(y)) % n_folds == fold
    coef = ridge_fit(x[~test], y[~test], alpha)
    return r2(y[test], x[test] @ coef)


def bootstrap_scores(resamples: np.ndarray, x: np.ndarray, y: np.ndarray, alpha: float, seed: Any = None) -> List[float]:
    """Out-of-bag R^2 of ``len(resamples)`` bootstrap resamples, drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    scores = []
    for _ in resamples:
        rows = rng.integers(0, len(y), size=len(y))
        out_of_bag = np.setdiff1d(np.arange(len(y)), rows)
        coef = ridge_fit(x[rows], y[rows], alpha)
        scores.append(r2(y[out_of_bag], x[out_of_bag] @ coef))
    return scores


def concatenate(parts: List[List[float]]) -> np.ndarray:
    return np.concatenate([np.asarray(p) for p in parts])


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> Dict[str, float]:
    from parallel_hydra import MapReduceJob

    x, y = make_data(**cfg.data)
    started = time.perf_counter()
    with instantiate(cfg.parallel) as backend:
        n_folds = 5
        data = backend.put((x, y))
        with backend.executor() as executor:
            futures = [executor.submit(fold_score, data, k, n_folds, cfg.bootstrap.alpha) for k in range(n_folds)]
            cv = float(np.mean([f.result() for f in futures]))
        job = MapReduceJob(
            np.arange(cfg.bootstrap.n_resamples),
            map_func=bootstrap_scores,
            reduce_func=concatenate,
            map_kwargs={"x": x, "y": y, "alpha": cfg.bootstrap.alpha},
            config=backend,
            n_jobs=cfg.bootstrap.n_jobs,
        )
        scores = job(seed=cfg.bootstrap.seed)
        workers = backend.effective_n_jobs(-1)
        name = backend.name
    tail = (1.0 - cfg.bootstrap.confidence) / 2 * 100
    low, high = np.percentile(scores, [tail, 100 - tail])
    elapsed = time.perf_counter() - started
    print(
        f"backend={name} workers={workers} cv_r2={cv:.4f} "
        f"bootstrap_r2_{cfg.bootstrap.confidence:.0%}_ci=[{low:.4f}, {high:.4f}] "
        f"resamples={len(scores)} seconds={elapsed:.2f}"
    )
    return {"cv_r2": cv, "low": float(low), "high": float(high)}


def flags_first(argv: List[str]) -> List[str]:
    """Move ``-m``/``--multirun`` before the overrides.

    Hydra's argument parser stops collecting overrides at the first flag, so
    ``train.py parallel.n_cpus=1 -m parallel=joblib,ray`` would be refused; users write
    it that way, so the example accepts it.
    """
    flags = [a for a in argv[1:] if a in ("-m", "--multirun")]
    return argv[:1] + flags + [a for a in argv[1:] if a not in flags]


if __name__ == "__main__":
    sys.argv = flags_first(sys.argv)
    main()
