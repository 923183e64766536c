"""Turn SIGINT / SIGTERM into a request to stop a training loop at the next step boundary.

Ctrl-C (SIGINT) or a scheduler's SIGTERM should not throw away the steps since the last checkpoint:
while :class:`StopRequests` is active, the first such signal only records itself, the loop saves a
checkpoint after the step in flight and ends the run with :class:`~memstore_gpt2.errors.RunInterrupted`.
The first signal also puts the previous handlers back, so a second Ctrl-C stops at once the usual way
(KeyboardInterrupt) -- safe, because a checkpoint survives a kill at any moment.

Signal handlers can only be installed from the main thread; elsewhere this is a no-op.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Context manager; ``signum`` is the first stop signal received (None until one arrives)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
