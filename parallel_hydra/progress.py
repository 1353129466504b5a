"""A progress bar that advances as tasks finish, from whichever thread they finish on.

``executor.map(..., progress=True)``, ``MapReduceJob(..., progress=True)`` and the
``progress`` config field show one. The total is known when the bar is made (every item
is submitted before the first result is read), and a chunk of items moves it by its
size when the chunk's task ends, not when it is handed to a worker.

tqdm is imported only when a bar is shown (``tqdm.auto``: a widget in notebooks, text in
a terminal).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, Optional

__all__ = ["ProgressBar"]


class ProgressBar:
    """A tqdm bar of ``total`` items, safe to advance from engine callback threads."""

    def __init__(self, total: int, description: Optional[str] = None) -> None:
        from tqdm.auto import tqdm

        self._lock = threading.Lock()
        self._closed = False
        self._bar: Any = tqdm(total=total, desc=description, unit="item", dynamic_ncols=True)

    def follow(self, future: Future, items: int) -> None:
        """Advance by ``items`` when ``future`` completes with a result or an error."""
        future.add_done_callback(lambda f: None if f.cancelled() else self.advance(items))

    def advance(self, items: int) -> None:
        with self._lock:
            if not self._closed:
                self._bar.update(items)

    def close(self) -> None:
        """Stop the bar where it is (at its total when every task finished)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._bar.close()
