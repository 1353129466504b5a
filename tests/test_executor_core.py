"""The shared executor core, driven step by step through an in-process fake engine.

The fake's tasks start, finish, crash or are given back exactly when a test says so,
which makes the races of the real engines repeatable: a report from an earlier hand-over,
a start that returns after the RUNNING policy stopped its task, submits racing shutdown.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from typing import Any, Callable, List, Mapping, Optional, Tuple

import pytest

from parallel_hydra import CancellationPolicy, ParallelExecutor, TaskRunner
from parallel_hydra.errors import EngineLostError


class Started:
    """One hand-over of one task to the fake engine."""

    def __init__(self, fn: Callable[..., Any], args: Tuple[Any, ...], on_done: Callable[[bool, Any], None]) -> None:
        self.fn, self.args, self.on_done = fn, args, on_done

    def finish(self, value: Any = None) -> None:
        self.on_done(True, self.fn(*self.args) if value is None else value)

    def fail(self, error: BaseException) -> None:
        self.on_done(False, error)


class FakeEngine(TaskRunner):
    def __init__(self, bounds: bool = False, own_queue: bool = False, start_gate: Optional[threading.Event] = None):
        self.bounds, self.own_queue, self.start_gate = bounds, own_queue, start_gate
        self.lock = threading.Lock()
        self.started: List[Started] = []
        self.stopped: List[Started] = []
        self.withdrawn: List[Started] = []
        self.unstarted: List[Started] = []  # what withdraw() can give back
        self.closed = 0

    def start(self, fn, args, kwargs, options: Mapping[str, Any], on_done) -> Started:
        if self.start_gate is not None:
            self.start_gate.wait(10)
        token = Started(fn, args, on_done)
        with self.lock:
            self.started.append(token)
        return token

    def stop(self, tokens: List[Any]) -> None:
        self.stopped.extend(tokens)

    def close(self) -> None:
        self.closed += 1

    def enforces_bound(self, max_workers: int) -> bool:
        return self.bounds

    def keeps_own_queue(self, max_workers: int) -> bool:
        return self.own_queue

    def can_withdraw(self, max_workers: int) -> bool:
        return True

    def withdraw(self, tokens: List[Any]) -> List[bool]:
        taken = [token in self.unstarted for token in tokens]
        self.withdrawn.extend(token for token, ok in zip(tokens, taken) if ok)
        for token in self.withdrawn:
            if token in self.unstarted:
                self.unstarted.remove(token)
        return taken


@pytest.fixture(autouse=True)
def no_executor_left_open():
    """Fake tasks never end by themselves: an executor left open would make the
    interpreter wait for them at exit."""
    from parallel_hydra import executor as module

    yield
    for executor in list(module._open_executors):
        executor.shutdown(wait=False, cancel_futures=CancellationPolicy.ALL)


def add(a: int, b: int = 0) -> int:
    return a + b


def test_at_most_max_workers_are_handed_over_without_an_engine_bound() -> None:
    engine = FakeEngine()
    executor = ParallelExecutor(engine, max_workers=2)
    futures = [executor.submit(add, i) for i in range(5)]
    assert len(engine.started) == 2
    engine.started[0].finish()
    assert len(engine.started) == 3
    assert futures[0].result(timeout=0) == 0
    assert [f.running() for f in futures] == [False, True, True, False, False]
    for step in range(4):
        engine.started[step + 1].finish()
    executor.shutdown()
    assert [f.result(timeout=0) for f in futures] == list(range(5))
    assert engine.closed == 1


def test_an_engine_that_bounds_itself_gets_max_workers_ahead() -> None:
    engine = FakeEngine(bounds=True)
    executor = ParallelExecutor(engine, max_workers=2)
    [executor.submit(add, i) for i in range(6)]
    assert len(engine.started) == 4
    executor.shutdown(wait=False, cancel_futures=CancellationPolicy.ALL)


@pytest.mark.parametrize("policy", [CancellationPolicy.NONE, CancellationPolicy.RUNNING])
def test_an_engine_that_bounds_itself_gets_everything_when_the_policy_cancels_no_pending_task(policy) -> None:
    engine = FakeEngine(bounds=True)
    executor = ParallelExecutor(engine, max_workers=2, cancel_futures=policy)
    futures = [executor.submit(add, i) for i in range(6)]
    assert len(engine.started) == 6  # nothing is held back: the engine queues them
    engine.unstarted = engine.started[4:]  # what the engine can still give back
    assert futures[5].cancel() and futures[5].cancelled()
    # PENDING given at shutdown cancels what the engine gives back; the rest run.
    executor.shutdown(wait=False, cancel_futures=CancellationPolicy.PENDING)
    assert futures[4].cancelled()
    assert [f.running() for f in futures[:4]] == [True] * 4
    for started in engine.started[:4]:
        started.finish()
    assert [f.result(timeout=5) for f in futures[:4]] == list(range(4))


def test_a_report_from_an_earlier_hand_over_is_ignored() -> None:
    engine = FakeEngine(bounds=True)
    executor = ParallelExecutor(engine, max_workers=1)
    running = executor.submit(add, 1)
    waiting = executor.submit(add, 2)  # handed ahead: in the engine, not yet started
    first, ahead = engine.started
    engine.unstarted = [ahead]  # the engine gives back what it has not started
    executor.shutdown(wait=False, cancel_futures=CancellationPolicy.RUNNING)
    # RUNNING stopped the running task; the one the engine gave back went over again.
    assert running.cancelled()
    assert len(engine.started) == 3 and engine.started[2].args == (2,)
    ahead.finish(value=-1)  # a late report of the first hand-over: ignored
    assert not waiting.done()
    engine.started[2].finish()
    assert waiting.result(timeout=1) == 2
    first.finish()  # the stopped task reports late: ignored too
    assert running.cancelled()


def test_a_start_that_returns_after_running_stopped_its_task_is_stopped_then() -> None:
    gate = threading.Event()
    engine = FakeEngine(start_gate=gate)
    executor = ParallelExecutor(engine, max_workers=1)
    submitting = threading.Thread(target=lambda: executor.submit(add, 1))
    submitting.start()
    assert _eventually(lambda: bool(executor._in_flight))
    executor.shutdown(wait=False, cancel_futures=CancellationPolicy.RUNNING)
    assert engine.stopped == []  # no token yet to stop
    gate.set()
    submitting.join(10)
    assert len(engine.started) == 1 and engine.stopped == engine.started


def test_start_raising_fails_that_task_and_the_next_one_goes() -> None:
    class Refusing(FakeEngine):
        def start(self, fn, args, kwargs, options, on_done):
            if args == (13,):
                raise ValueError("engine refused 13")
            return super().start(fn, args, kwargs, options, on_done)

    engine = Refusing()
    executor = ParallelExecutor(engine, max_workers=1)
    refused = executor.submit(add, 13)
    accepted = executor.submit(add, 1)
    with pytest.raises(ValueError, match="refused 13"):
        refused.result(timeout=0)
    engine.started[0].finish()
    assert accepted.result(timeout=1) == 1
    executor.shutdown()


def test_losing_the_engine_fails_every_unfinished_task_and_refuses_more() -> None:
    engine = FakeEngine()
    executor = ParallelExecutor(engine, max_workers=2)
    futures = [executor.submit(add, i) for i in range(6)]
    engine.started[0].finish()
    engine.started[1].fail(EngineLostError("lost the scheduler at tcp://127.0.0.1:1"))
    assert futures[0].result(timeout=0) == 0
    for future in futures[1:]:
        assert isinstance(future.exception(timeout=1), EngineLostError)
    with pytest.raises(EngineLostError, match="127.0.0.1:1"):
        executor.submit(add, 1)
    started = time.monotonic()
    executor.shutdown(wait=True)
    assert time.monotonic() - started < 1
    engine.started[2].finish()  # a straggler's report changes nothing
    assert isinstance(futures[2].exception(timeout=0), EngineLostError)


def test_a_future_cancelled_in_the_queue_is_done_for_waiters_at_once() -> None:
    engine = FakeEngine()
    executor = ParallelExecutor(engine, max_workers=1)
    futures = [executor.submit(add, i) for i in range(3)]
    assert futures[2].cancel()
    done, not_done = cf.wait(futures[1:], timeout=0.1, return_when=cf.FIRST_COMPLETED)
    assert done == {futures[2]}
    executor.shutdown(wait=False, cancel_futures=CancellationPolicy.PENDING)
    assert cf.wait(futures[1:], timeout=0.1).not_done == set()
    engine.started[0].finish()
    assert futures[0].result(timeout=1) == 0


def test_cancel_of_a_task_the_engine_still_holds_gives_it_back() -> None:
    engine = FakeEngine(own_queue=True)
    executor = ParallelExecutor(engine, max_workers=1)
    futures = [executor.submit(add, i) for i in range(3)]
    assert len(engine.started) == 3  # an engine with its own queue gets everything
    assert futures[2].running()
    engine.unstarted = [engine.started[2]]
    assert futures[2].cancel()
    assert futures[2].cancelled() and engine.withdrawn == [engine.started[2]]
    assert not futures[0].cancel()  # a running task the engine will not give back


def test_submits_racing_shutdown_all_settle() -> None:
    engine = FakeEngine(bounds=True)
    executor = ParallelExecutor(engine, max_workers=2, cancel_futures="PENDING")
    futures: List[cf.Future] = []
    refused: List[int] = []
    lock = threading.Lock()
    go = threading.Event()

    def submitter() -> None:
        go.wait()
        for i in range(200):
            try:
                future = executor.submit(add, i)
            except RuntimeError:
                with lock:
                    refused.append(i)
                return
            with lock:
                futures.append(future)

    def finisher(stop: threading.Event) -> None:
        done = 0
        while not stop.is_set() or done < len(engine.started):
            with engine.lock:
                batch = engine.started[done:]
            for started in batch:
                started.finish()
            done += len(batch)
            time.sleep(0.001)

    threads = [threading.Thread(target=submitter) for _ in range(4)]
    stop = threading.Event()
    engine_thread = threading.Thread(target=finisher, args=(stop,))
    for thread in threads + [engine_thread]:
        thread.start()
    go.set()
    time.sleep(0.005)
    executor.shutdown(wait=True)
    stop.set()
    for thread in threads + [engine_thread]:
        thread.join(10)
    assert all(f.done() for f in futures), "a future returned by submit never settled"
    assert all(f.cancelled() or f.result() >= 0 for f in futures)
    assert engine.closed == 1


def test_an_open_executor_is_shut_down_with_its_policy_at_exit() -> None:
    from parallel_hydra import executor as module

    engine = FakeEngine()
    executor = ParallelExecutor(engine, max_workers=1, cancel_futures="PENDING")
    running = executor.submit(add, 1)
    queued = executor.submit(add, 2)
    finishing = threading.Timer(0.2, lambda: engine.started[0].finish())
    finishing.start()
    module._shut_down_open_executors()
    assert running.result(timeout=0) == 1 and queued.cancelled() and engine.closed == 1
    assert executor not in module._open_executors


def _eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.001)
    return False




def test_map_raises_a_tasks_own_timeout_error_at_its_item() -> None:
    engine = FakeEngine()
    executor = ParallelExecutor(engine, max_workers=2)
    results = executor.map(add, [1, 2], chunksize=1, timeout=30)
    engine.started[0].fail(TimeoutError("the task's own"))
    engine.started[1].finish()
    with pytest.raises(TimeoutError, match="the task's own"):
        next(results)


def test_futures_wake_every_kind_of_waiter() -> None:
    """TaskFuture builds its condition itself (see _FutureCondition): result() with and
    without a timeout, wait() and as_completed() from other threads must all still wake
    when the task ends, and a time-out must still fire."""
    engine = FakeEngine(bounds=True)
    executor = ParallelExecutor(engine, max_workers=2, cancel_futures="NONE")
    futures = [executor.submit(add, i, 1) for i in range(3)]
    with pytest.raises(cf.TimeoutError):
        futures[0].result(timeout=0.05)
    seen: List[Any] = []
    waiters = [
        threading.Thread(target=lambda: seen.append(futures[0].result())),
        threading.Thread(target=lambda: seen.append(futures[0].result(timeout=30))),
        threading.Thread(target=lambda: seen.append(len(cf.wait(futures, timeout=30).done))),
        threading.Thread(target=lambda: seen.append(sorted(f.result() for f in cf.as_completed(futures, timeout=30)))),
    ]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.1)  # every waiter is waiting now
    for token in list(engine.started):
        token.finish()
    for waiter in waiters:
        waiter.join(30)
    assert not any(waiter.is_alive() for waiter in waiters)
    assert sorted(map(str, seen)) == sorted(map(str, [1, 1, 3, [1, 2, 3]]))
    assert futures[0]._condition.acquire(timeout=1)  # the lock is free again, and re-entrant
    assert futures[0]._condition.acquire(timeout=1)
    futures[0]._condition.release()
    futures[0]._condition.release()
    executor.shutdown()
