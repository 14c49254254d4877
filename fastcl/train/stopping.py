"""Ctrl-C and SIGTERM while training: the first stops the run after its step (with a
checkpoint), the second aborts at once and writes nothing, so the last checkpoint stays
the one a resumed run starts from."""

from __future__ import annotations

import signal

from ..interrupts import interrupt


class AbortRun(BaseException):
    """A second Ctrl-C: stop at once and write nothing (a BaseException, so no
    ``except Exception`` on the way swallows it)."""


class StopSignals:
    """Between :meth:`install` and :meth:`restore`, SIGINT and SIGTERM set
    :attr:`requested` (the loop finishes its step, saves a checkpoint and exits); a second
    one raises :class:`AbortRun`, at once or when the file being written is whole
    (:func:`fastcl.interrupts.interrupt`)."""

    def __init__(self, log) -> None:
        self.requested = False
        self._aborting = False
        self._log = log
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self._aborting:
            return  # already on its way out
        if self.requested:  # the second one: stop where we are, write nothing (or finish the file being written)
            self._aborting = True
            interrupt(AbortRun())
            return
        self.requested = True
        self._log(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then exiting "
                  "(again to abort at once, keeping the last checkpoint)")

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def restore(self) -> None:
        """Put back the handlers :meth:`install` replaced."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
