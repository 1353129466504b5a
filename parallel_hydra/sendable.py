"""What travels to and from workers: exceptions made fit for the trip back, and the
part of a task that could not be sent named.

A task's exception travels pickled, and many exceptions do not survive that. One whose
``__init__`` takes other arguments than it passes to ``Exception.__init__`` (``def
__init__(self, path, code): super().__init__(f"{path}: {code}")``, a common pattern)
pickles, but fails to unpickle in the submitting process; one holding a lock or a file
does not pickle at all. The engines then report something else (Ray: its own
``UnserializableException``; Dask: a bare ``Exception`` with the repr), or, on loky, the
failed unpickling breaks the whole pool and fails every task in it.

So in the worker, before it leaves, an exception is tried: pickled and unpickled. One
that fails is sent as :class:`_Rebuilt`, which arrives as an instance of the *same
class*, made without calling its ``__init__``: its ``args`` (hence its message) and the
attributes that pickle, the others replaced by their ``repr``. ``except YourError``
still catches it. Only where even that cannot travel (its class cannot be pickled) does
a :class:`~parallel_hydra.errors.UnsendableExceptionError` come instead, with the
class's name, the message and the traceback as text.

Only for the failure path: nothing here runs for a task that returns.
"""

from __future__ import annotations

import traceback
import pickle
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import UnsendableExceptionError

__all__ = ["sendable_exception", "sendable_value", "unpicklable_part", "cloudpickle_dumps"]


def _pickler() -> Any:
    """The cloudpickle the engines use (a class defined in ``__main__`` travels by
    value): the package (joblib 1.5 and later require it), or the copy older joblibs
    carry, or else ``pickle``."""
    try:
        import cloudpickle
    except ImportError:
        try:
            from joblib.externals import cloudpickle  # type: ignore[no-redef]
        except ImportError:
            return pickle
    return cloudpickle


def cloudpickle_dumps(obj: Any, buffer_callback: Optional[Callable[[Any], Any]] = None) -> bytes:
    """``obj`` pickled as loky and the engines pickle it; with ``buffer_callback``,
    large buffers go to it out of band (pickle protocol 5)."""
    if buffer_callback is None:
        return _pickler().dumps(obj)  # type: ignore[no-any-return]
    return _pickler().dumps(obj, protocol=5, buffer_callback=buffer_callback)  # type: ignore[no-any-return]


def _travels(obj: Any) -> bool:
    """Whether ``obj`` survives pickling and unpickling here."""
    pickler = _pickler()
    try:
        pickler.loads(pickler.dumps(obj))
    except Exception:
        return False
    return True


def _rebuilt(cls: type, args: Tuple[Any, ...], state: Dict[str, Any], text: str) -> BaseException:
    """In the receiving process: an instance of ``cls`` without its ``__init__``.

    Never raises: a failure here would be the very failure this module prevents."""
    try:
        error = cls.__new__(cls, *args)
        error.args = args
        for name, value in state.items():
            try:
                setattr(error, name, value)
            except Exception:
                pass
        return error  # type: ignore[no-any-return]
    except Exception:
        return UnsendableExceptionError(text)


class _Rebuilt(Exception):
    """Raised in the worker in place of an exception that could not travel; arrives
    as that exception (see :func:`_rebuilt`)."""

    def __init__(self, cls: type, args: Tuple[Any, ...], state: Dict[str, Any], text: str) -> None:
        super().__init__(text)
        self.parts = (cls, args, state, text)

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        cls, args, state, text = self.parts
        # Attributes set on this stand-in after it was made (the task's log records)
        # go with the original's.
        extra = {name: value for name, value in self.__dict__.items() if name != "parts"}
        return _rebuilt, (cls, args, {**state, **extra}, text)


def _sendable_part(value: Any) -> Any:
    return value if _travels(value) else repr(value)


def sendable_exception(error: BaseException) -> BaseException:
    """``error`` itself if it survives pickling, else a stand-in that arrives as it
    (or, failing that, as an ``UnsendableExceptionError`` naming it)."""
    if _travels(error):
        return error
    cls = type(error)
    name = f"{cls.__module__}.{cls.__qualname__}"
    text = f"{name}: {error}"
    try:
        args = tuple(_sendable_part(arg) for arg in error.args)
        state = {key: _sendable_part(value) for key, value in getattr(error, "__dict__", {}).items()}
    except Exception:  # an exception whose args or attributes cannot even be read
        args, state = (str(error),), {}
    stand_in = _Rebuilt(cls, args, state, text)
    if _travels(stand_in):
        return stand_in
    lines = "".join(traceback.format_exception(cls, error, error.__traceback__))
    return UnsendableExceptionError(
        f"the task raised {text}, which could not be sent back (its class cannot be pickled here); "
        f"its traceback in the worker:\n{lines}"
    )


class _Shown:
    """A value that could not be sent back, as its ``repr``."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        return _Shown, (self.text,)


def sendable_value(value: Any) -> Any:
    """``value`` itself if it survives pickling, else an object whose ``repr`` is its
    ``repr`` (for a Hydra job's return value, which the app only shows)."""
    return value if _travels(value) else _Shown(repr(value))


def unpicklable_part(
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    error: BaseException,
    dumps: Callable[[Any], Any],
    to: str,
) -> Optional[pickle.PicklingError]:
    """The ``PicklingError`` that says which part of a task could not be pickled to be
    sent to ``to`` (the function, or which argument), with ``error`` (the engine's) as
    its cause; None if each part pickles on its own (``error`` was something else)."""
    name = str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))
    parts: List[Tuple[str, Any]] = [("the function", fn)]
    parts += [(f"positional argument {i}", value) for i, value in enumerate(args)]
    parts += [(f"keyword argument {key!r}", value) for key, value in kwargs.items()]
    for what, value in parts:
        try:
            dumps(value)
        except Exception as exc:
            failure = pickle.PicklingError(
                f"{what} of task {name} (a {type(value).__name__}) could not be pickled "
                f"to be sent to {to}: {type(exc).__name__}: {exc}"
            )
            failure.__cause__ = error
            return failure
    return None
