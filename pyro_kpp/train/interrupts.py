"""Graceful interruption: SIGINT / SIGTERM ask the training loop to stop after the current step.

The loop then saves a checkpoint (everything needed to resume exactly) and the process exits
with status 128 + signal number and a message, instead of dying mid-write. A second signal
of the same kind while stopping falls back to the default behaviour (e.g. Ctrl-C twice).
"""
from __future__ import annotations

import signal
import threading


class StopRequests:
    """Context manager: installs the handlers on entry and restores the old ones on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame):
        if self.signum is not None:              # second signal: stop now, the default way
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
        self.signum = signum

    def __enter__(self) -> "StopRequests":
        # Signal handlers can only be installed from the main thread (e.g. not in a notebook worker).
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
