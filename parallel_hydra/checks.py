"""One check for the integers users give (``n_cpus``, ``max_workers``, ``n_jobs``...).

Every message has one shape, ``KEY must be WHAT; got VALUE``, so a bad value is refused
the same way whether it came from a Hydra override or a Python call.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["require_integer"]


def require_integer(
    key: str,
    value: Any,
    *,
    minimum: Optional[int] = None,
    maximum: Optional[int] = None,
    nonzero: bool = False,
    none: Optional[str] = None,
    hint: str = "",
    prefix: str = "",
) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer (not a bool) in range.

    ``none`` allows ``None`` and names it in the message (``"null"`` in a config,
    ``"None"`` in Python); ``hint`` follows the allowed values in parentheses; ``prefix``
    opens the message (``"parallel config: "``).

    Examples
    --------
    >>> require_integer("n_cpus", 2, minimum=1)
    >>> require_integer("n_cpus", 0, minimum=1, none="null")
    Traceback (most recent call last):
    ...
    ValueError: n_cpus must be an integer >= 1 or null; got 0
    """
    if value is None and none is not None:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    ok = ok and not (nonzero and value == 0)
    if ok:
        return
    if minimum is not None and maximum is not None:
        allowed = f"an integer between {minimum} and {maximum}"
    elif minimum is not None:
        allowed = f"an integer >= {minimum}"
    elif nonzero:
        allowed = "a non-zero integer"
    else:
        allowed = "an integer"
    if hint:
        allowed += f" ({hint})"
    if none is not None:
        allowed += f" or {none}"
    raise ValueError(f"{prefix}{key} must be {allowed}; got {value!r}")
