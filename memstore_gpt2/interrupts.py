"""Turn SIGINT / SIGTERM into a request to stop a training loop at the next step boundary.

Ctrl-C (SIGINT) or a scheduler's SIGTERM should not throw away the steps since the last checkpoint:
while :class:`StopRequests` is active, the first such signal only records itself, the loop saves a
checkpoint after the step in flight and ends the run with :class:`~memstore_gpt2.errors.RunInterrupted`.
The first signal also puts the previous handlers back, so a second Ctrl-C stops at once the usual way
(KeyboardInterrupt) -- safe, because a checkpoint survives a kill at any moment.

Signal handlers can only be installed from the main thread; elsewhere this is a no-op.

Broken pipes. A run piped through ``tee`` (or ``| head``) loses its reader when Ctrl-C reaches the
whole pipeline; the next progress line then hits a closed pipe. Were SIGPIPE at its default the
process would die on the spot (exit 141) and the interrupt checkpoint would never be written, so
while :class:`StopRequests` is active SIGPIPE is ignored, and the progress bar writes through
:class:`PipeSafeStream`, which drops output once its reader is gone instead of raising
``BrokenPipeError`` out of the training loop.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
from types import FrameType
from typing import TextIO

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Ignored while a run trains (see the module docstring); absent on Windows.
SIGPIPE = getattr(signal, "SIGPIPE", None)


class PipeSafeStream:
    """A text stream that forwards to ``stream`` until its reader goes away, then drops output.

    Progress is a courtesy: losing the terminal (or ``tee``) must never cost the run its
    checkpoint. ``broken`` says whether output was dropped."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self.broken = False

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def write(self, text: str) -> int:
        """Forward ``text`` and flush it (a bar writes about once a second; its last newline must
        not wait in a buffer behind what the command prints next)."""
        if not self.broken:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
                self.broken = True
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    raise
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                self.broken = True
            except OSError as exc:
                if exc.errno != errno.EPIPE:
                    raise
                self.broken = True

    def isatty(self) -> bool:
        try:
            return not self.broken and self.stream.isatty()
        except (OSError, ValueError):
            return False


def progress_bar(**options):
    """A tqdm bar on stderr (whatever ``--json`` says: stdout is the JSON's) that survives a
    broken pipe (:class:`PipeSafeStream`)."""
    from tqdm.auto import tqdm

    return tqdm(file=PipeSafeStream(), mininterval=1.0, **options)


class StopRequests:
    """Context manager; ``signum`` is the first stop signal received (None until one arrives)."""

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._pipe: object | None = None  # SIGPIPE's handler before the run

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
            if self.signals and SIGPIPE is not None:  # a closed pipe must not kill the run
                previous = signal.signal(SIGPIPE, signal.SIG_IGN)
                self._pipe = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
        if self._pipe is not None:
            signal.signal(SIGPIPE, self._pipe)
            self._pipe = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
