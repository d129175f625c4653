"""A context manager that calls ``poll()`` on a background thread at a fixed interval."""

from __future__ import annotations

import threading
from typing import Self


class Poller:
    """Subclasses define ``poll()``; ``with`` starts polling every ``interval_s`` seconds on a
    daemon thread and stops it (after the poll in progress) on exit."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def poll(self) -> None:
        """One observation; runs on the background thread."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
