"""Graceful interruption: SIGINT / SIGTERM ask the training loop to stop after the current step.

The loop then saves a checkpoint (everything needed to resume exactly) and the process exits
with status 128 + signal number and a message, instead of dying mid-write. A second signal
of the same kind while stopping falls back to the default behaviour (e.g. Ctrl-C twice): a
``KeyboardInterrupt`` that the CLIs report in one line (:func:`quiet_cli_interrupts`), as they
do a Ctrl-C during their imports.
"""
from __future__ import annotations

import signal
import sys
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


def _cli_module(argv: list[str]) -> str | None:
    """The module of ``python [options] -m MODULE ...`` in the interpreter's own arguments, or None
    (a script, ``-c``, an interactive session)."""
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-X", "-W"):                  # options that take a value
            next(args, None)
        elif arg.startswith("-m"):
            return arg[2:] or next(args, None)
        elif arg == "-c" or not arg.startswith("-"):
            return None
    return None


def quiet_cli_interrupts() -> None:
    """In a ``python -m pyro_kpp.<tool>`` process, report a ``KeyboardInterrupt`` that nothing
    handled (a Ctrl-C during the imports, or a second Ctrl-C while a run stops) in one line
    instead of a traceback. Python then still exits by SIGINT, status 130 in a shell. Called on
    ``import pyro_kpp``, before the heavy imports; programs that merely import pyro_kpp keep
    Python's own behaviour."""
    module = _cli_module(getattr(sys, "orig_argv", []))
    if module is None or module.split(".")[0] != __name__.split(".")[0]:
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print(f"{module}: interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        else:
            previous(kind, value, traceback)

    sys.excepthook = hook
