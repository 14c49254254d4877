"""Whether a folder can be written, asked before the work whose results go there."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable_reason(directory: Path) -> str | None:
    """Create ``directory`` (and its parents) and write, flush and remove a file in it.
    None if that worked, else why not, in words."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test.tmp{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"fastcl")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        for ancestor in [directory, *directory.parents]:
            if ancestor.exists() or ancestor.is_symlink():
                if not ancestor.is_dir():
                    what = "a broken symbolic link" if not ancestor.exists() else "a file"
                    return f"{ancestor} is {what}, not a folder"
                break
        return e.strerror or str(e)
    return None


def interrupt_once() -> None:
    """For a command's process: the first Ctrl-C raises KeyboardInterrupt, later ones are
    ignored, so a Ctrl-C pressed again while the command winds down cannot interrupt its
    clean exit with a traceback. (Code that installs its own handler, such as the
    training loop, puts this one back when it is done.)"""
    import signal

    raised = []

    def handler(signum, frame):
        if not raised:
            raised.append(signum)
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def run_command(main) -> None:
    """Exit with ``main()``'s status; a Ctrl-C as it returns gives 130, and one during the
    interpreter's shutdown (which restores the default handler) is held back, so a
    finished command never dies of it."""
    import signal
    import sys

    interrupt_once()
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    sys.exit(code)
