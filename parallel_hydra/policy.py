"""The cancellation policy an executor applies when it shuts down."""

from __future__ import annotations

from enum import Flag
from typing import Union

__all__ = ["CancellationPolicy", "as_policy"]


class CancellationPolicy(Flag):
    """What an executor cancels when it shuts down (and so when its ``with`` block ends).

    The members combine like flags: ``ALL`` is ``PENDING | RUNNING``.

    - ``NONE``: cancel nothing; shutdown waits for every task.
    - ``PENDING``: cancel the tasks no worker has been handed yet. Their futures report
      ``cancelled()``. Tasks already handed to the engine finish normally.
    - ``RUNNING``: stop the tasks that the engine is running, for real (the worker is
      killed or the task interrupted, depending on the engine). Pending tasks still run.
    - ``ALL``: both of the above; shutdown returns promptly.

    Examples
    --------
    >>> CancellationPolicy.ALL == CancellationPolicy.PENDING | CancellationPolicy.RUNNING
    True
    >>> CancellationPolicy.PENDING in CancellationPolicy.ALL
    True
    """

    NONE = 0
    PENDING = 1
    RUNNING = 2
    ALL = PENDING | RUNNING


PolicyLike = Union[CancellationPolicy, str, bool, int]


def as_policy(value: PolicyLike, key: str = "cancel_futures") -> CancellationPolicy:
    """Read a policy given as a member, its name, a bool or its integer value.

    ``True`` means ``PENDING`` and ``False`` means ``NONE``, which is what
    ``concurrent.futures.Executor.shutdown(cancel_futures=...)`` means by them.

    Examples
    --------
    >>> as_policy("all")
    <CancellationPolicy.ALL: 3>
    >>> as_policy(True)
    <CancellationPolicy.PENDING: 1>
    """
    allowed = ", ".join(CancellationPolicy.__members__)
    if isinstance(value, CancellationPolicy):
        return value
    if isinstance(value, bool):
        return CancellationPolicy.PENDING if value else CancellationPolicy.NONE
    if isinstance(value, int) and 0 <= value <= CancellationPolicy.ALL.value:
        return CancellationPolicy(value)
    if isinstance(value, str):
        try:
            return CancellationPolicy[value.strip().upper()]
        except KeyError:
            pass
    raise ValueError(f"{key} must be one of {allowed}; got {value!r}")
