"""Ctrl-C for fastcl's commands: delivered at safe points only.

Python runs a signal handler in the main thread between bytecodes, wherever it is: inside
``torch.save``'s pickling callbacks an exception raised by the handler becomes a
RuntimeError of the zip writer ("unexpected pos"), and an import interrupted in a class
body becomes another RuntimeError. Handlers here therefore hand their exception to
:func:`interrupt`, which raises it at once, or, inside :func:`deferred` (a file being
written), when that section ends: the file is whole, then the run stops.
"""

from __future__ import annotations

import contextlib
import signal
import sys

_depth = 0
_pending: BaseException | None = None


@contextlib.contextmanager
def deferred():
    """A section no interruption may cut: one that arrives inside is raised at its end
    (when the section ends normally)."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _pending is not None:
        exc, _pending = _pending, None
        raise exc


def interrupt(exc: BaseException) -> None:
    """Raise ``exc`` now, or at the end of the current :func:`deferred` section."""
    global _pending
    if _depth:
        if _pending is None:
            _pending = exc
        return
    raise exc


def run_command(main) -> None:
    """Exit with ``main()``'s status, for a command's process. The first Ctrl-C raises
    KeyboardInterrupt (code that installs its own handler, such as the training loop,
    puts this one back when done); any later one, and one that arrives once ``main`` has
    returned or during the interpreter's shutdown (which restores the default handler),
    is ignored, so a Ctrl-C pressed again while the command winds down cannot interrupt
    its exit with a traceback or kill it with another status."""
    state = {"raised": False, "done": False}

    def handler(signum, frame):
        if not state["raised"] and not state["done"]:
            state["raised"] = True
            interrupt(KeyboardInterrupt())

    signal.signal(signal.SIGINT, handler)
    try:
        code = main()
        state["done"] = True  # inside the try: a handler run before this line raises in here
    except KeyboardInterrupt:
        state["done"] = True
        code = 130
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    sys.exit(code)
