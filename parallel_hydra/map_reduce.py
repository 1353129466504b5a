"""``MapReduceJob``: split the inputs, map over the chunks in parallel, reduce."""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future
from concurrent.futures import wait as futures_wait
from typing import Any, Callable, Dict, Generic, List, Optional, TypeVar, Union

from .backend import BaseParallelBackend, ConfigLike, check_n_jobs, init_parallel_backend
from .executor import NamedAfter
from .policy import CancellationPolicy
from .progress import ProgressBar

__all__ = ["MapReduceJob", "identity"]

T = TypeVar("T")
R = TypeVar("R")


def identity(x: Any, *args: Any, **kwargs: Any) -> Any:
    """The default reduce function: return the list of map results unchanged."""
    return x


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` can be called with the keyword argument ``name``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _is_splittable(inputs: Any) -> bool:
    if isinstance(inputs, (str, bytes, bytearray)):
        return False
    if isinstance(inputs, Sequence):
        return True
    return type(inputs).__name__ == "ndarray" and getattr(inputs, "ndim", 0) > 0


def _split(inputs: Any, n_chunks: int) -> List[Any]:
    """Cut a sequence into ``n_chunks`` contiguous chunks whose sizes differ by at most 1."""
    size, extra = divmod(len(inputs), n_chunks)
    chunks, start = [], 0
    for i in range(n_chunks):
        stop = start + size + (1 if i < extra else 0)
        chunks.append(inputs[start:stop])
        start = stop
    return chunks


def _name(fn: Any) -> Optional[str]:
    return getattr(fn, "__name__", None)


def _all_done_or_one_failed(futures: List[Future]) -> bool:
    """What ``wait(..., return_when=FIRST_EXCEPTION)`` waits for."""
    all_done = True
    for future in futures:
        if not future.done():
            all_done = False
        elif not future.cancelled() and future.exception() is not None:
            return True
    return all_done


def _seed_sequence(seed: Any) -> Any:
    """The ``SeedSequence`` whose children seed the jobs: ``seed`` itself, a
    ``Generator``'s own (its state is left as it is, as pyDVL does), or one made from an
    int (or whatever ``SeedSequence`` takes)."""
    from numpy.random import Generator, SeedSequence

    if isinstance(seed, SeedSequence):
        return seed
    if isinstance(seed, Generator):
        bits = seed.bit_generator
        return getattr(bits, "seed_seq", None) or getattr(bits, "_seed_seq")  # (numpy < 1.25: private)
    return SeedSequence(seed)


def _call_map(map_func: Callable[..., Any], chunk: Any, kwargs: Dict[str, Any]) -> Any:
    return map_func(chunk, **kwargs)


class MapReduceJob(Generic[T, R]):
    """Run ``map_func`` over chunks of ``inputs`` in parallel, then ``reduce_func``.

    A sequence (or numpy array) is cut into ``n_jobs`` contiguous chunks of near-equal
    size (fewer when there are fewer items); any other input is given whole to each of
    the ``n_jobs`` jobs, which suits Monte-Carlo work where each job draws its own samples.

    Calling the job with ``seed=`` gives each job its own child of a
    ``numpy.random.SeedSequence``: runs with one seed give the same result, runs with
    different seeds differ. The seed, and the job's index as ``job_id``, are passed only to
    a ``map_func`` that accepts them.

    One seed gives one result on any machine and engine: the chunks, and so the random
    streams, follow only the inputs, the seed and a positive ``n_jobs`` as written,
    never the CPUs at hand (at most that many jobs run at once; the others wait their
    turn). ``n_jobs=-1`` means one job per CPU of the backend, which ties the result to
    the CPU count: give a number when results must be reproducible elsewhere.

    Parameters
    ----------
    inputs
        What to split (a sequence) or repeat (anything else).
    map_func
        Called as ``map_func(chunk, **map_kwargs)`` on a worker.
    reduce_func
        Called as ``reduce_func(results, **reduce_kwargs)`` here, with the list of map
        results in the order of the chunks.
    config
        The backend's config (a backend is started for each call and shut down after),
        or a running backend to use as is.
    n_jobs
        How many jobs (chunks) to make; ``-1`` is one per CPU of the backend.
    timeout
        Seconds the whole job may take. At that deadline its tasks are stopped (the
        ``ALL`` policy) and ``TimeoutError`` is raised.
    progress
        Show a bar of the items done (of the jobs done, for inputs that are not cut),
        moving as each job ends; ``None``: the backend's ``progress`` setting. The bar
        never changes the chunks, so results are the same with it and without it: for
        a finer bar, give a larger ``n_jobs``.

    Examples
    --------
    >>> from parallel_hydra import ParallelConfig
    >>> job = MapReduceJob(list(range(10)), map_func=sum, reduce_func=sum,
    ...                    config=ParallelConfig(n_cpus=2), n_jobs=2)
    >>> job()
    45
    """

    def __init__(
        self,
        inputs: Union[Sequence[T], Any],
        map_func: Callable[..., Any],
        reduce_func: Callable[..., R] = identity,
        map_kwargs: Optional[Dict[str, Any]] = None,
        reduce_kwargs: Optional[Dict[str, Any]] = None,
        config: Optional[Union[ConfigLike, BaseParallelBackend]] = None,
        *,
        n_jobs: int = -1,
        timeout: Optional[float] = None,
        progress: Optional[bool] = None,
    ) -> None:
        check_n_jobs(n_jobs)
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds or None; got {timeout!r}")
        self.inputs = inputs
        self.map_func = map_func
        self.reduce_func = reduce_func
        self.map_kwargs = dict(map_kwargs or {})
        self.reduce_kwargs = dict(reduce_kwargs or {})
        self.config = config
        self.n_jobs = n_jobs
        self.timeout = timeout
        if progress is not None and not isinstance(progress, bool):
            raise ValueError(f"progress must be true, false or None; got {progress!r}")
        self.progress = progress

    def __call__(self, seed: Optional[Union[int, Any]] = None) -> R:
        """Run the job; ``seed`` (an int, a ``SeedSequence`` or a numpy ``Generator``)
        makes it reproducible."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        if isinstance(self.config, BaseParallelBackend):
            return self._run(self.config, seed, deadline)
        with init_parallel_backend(self.config) as backend:
            return self._run(backend, seed, deadline)

    def _run(self, backend: BaseParallelBackend, seed: Optional[Union[int, Any]], deadline: Optional[float]) -> R:
        n_jobs = self.n_jobs if self.n_jobs > 0 else backend.effective_n_jobs(self.n_jobs)
        splittable = _is_splittable(self.inputs)
        if splittable:
            chunks = _split(self.inputs, max(1, min(n_jobs, len(self.inputs))))
        else:
            chunks = [self.inputs] * n_jobs
        show = backend.config.progress if self.progress is None else self.progress
        bar = ProgressBar(len(self.inputs) if splittable else len(chunks), _name(self.map_func)) if show else None
        try:
            return self._run_chunks(backend, chunks, splittable, seed, deadline, bar)
        finally:
            if bar is not None:
                bar.close()

    def _run_chunks(
        self,
        backend: BaseParallelBackend,
        chunks: List[Any],
        splittable: bool,
        seed: Optional[Union[int, Any]],
        deadline: Optional[float],
        bar: Optional[ProgressBar],
    ) -> R:
        seeds: List[Any] = [None] * len(chunks)
        if seed is not None:
            seeds = _seed_sequence(seed).spawn(len(chunks))
        pass_seed = seed is not None and _accepts(self.map_func, "seed")
        pass_job_id = _accepts(self.map_func, "job_id")
        call = NamedAfter(_call_map, self.map_func)
        with backend.executor(max_workers=backend.effective_n_jobs(len(chunks))) as executor:
            futures = []
            for job_id, chunk in enumerate(chunks):
                kwargs = dict(self.map_kwargs)
                if pass_seed:
                    kwargs["seed"] = seeds[job_id]
                if pass_job_id:
                    kwargs["job_id"] = job_id
                futures.append(executor.submit(call, chunk, kwargs))
                if bar is not None:
                    bar.follow(futures[-1], len(chunk) if splittable else 1)
            # (Inside a Ray task, through Ray: see ParallelExecutor._wait_in_engine.)
            executor._wait_in_engine(lambda: _all_done_or_one_failed(futures), deadline)
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, not_done = futures_wait(futures, timeout=remaining, return_when=FIRST_EXCEPTION)
            if not_done and not any(f.exception() for f in done if not f.cancelled()):
                executor.shutdown(wait=True, cancel_futures=CancellationPolicy.ALL)
                raise TimeoutError(
                    f"MapReduceJob: {len(not_done)} of {len(futures)} job(s) not done within the timeout of "
                    f"{self.timeout} s; they were stopped"
                )
            results = [f.result() for f in futures]
        return self.reduce_func(results, **self.reduce_kwargs)
