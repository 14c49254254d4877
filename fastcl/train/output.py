"""The output directory: checked before anything is loaded, never destroyed unasked.

- A directory that does not exist, or is empty, is used.
- A non-empty one is refused unless ``--resume`` (it must hold a checkpoint) or
  ``--overwrite`` (the files a fastcl run writes are removed when training starts; any
  other file is left alone).
- The directory of the model being trained from (or one inside it, or one holding it) is
  always refused: the run would write over its own source.
- Writability is tested with a real file before the model and data are loaded.
- One run at a time: a second run into the same directory is refused (an advisory lock).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..paths import unwritable_reason
from .checkpoint import TMP_MARK, fsync_directory

LOCK = ".fastcl.lock"
#: What a fastcl run writes besides the final model's own files.
RUN_ENTRIES = ("checkpoint", "best", "best.old", ".best.pending", "last", "log.jsonl", "results.json",
               "spectrum.png")


class OutputDirError(ValueError):
    """An output directory the run must not or cannot use; the message says why."""


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path.expanduser()))


def _listing(directory: Path) -> list[str]:
    """What the directory holds, besides the lock and the temporaries of a killed run."""
    return sorted(e.name for e in directory.iterdir()
                  if e.name != LOCK and not (e.name.startswith(".") and TMP_MARK in e.name))


def check_output_dir(out: Path, model: str | None, resume: bool, overwrite: bool) -> bool:
    """Refuse (OutputDirError) any use of ``out`` that could destroy what the user did not
    ask to destroy, or that would fail later; create it and test that it is writable.
    Returns whether it was created."""
    if resume and overwrite:
        raise OutputDirError("--resume continues the run in the output directory and --overwrite starts it again: "
                             "pass one of them")
    if out.is_symlink() and not out.exists():
        raise OutputDirError(f"output directory {out} is a symbolic link to {os.readlink(out)}, which does not exist")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output directory {out} is a file, not a directory")
    real = _real(out)
    if model is not None and Path(model).expanduser().exists():
        source = _real(Path(model))
        if real == source or source in real.parents or real in source.parents:
            relation = ("is" if real == source else "is inside" if source in real.parents else "holds")
            raise OutputDirError(f"output directory {out} {relation} the model being trained from ({model}): "
                                 "the run would write over its own source; choose another --output-dir")
    entries = _listing(out) if out.is_dir() else []
    checkpoint = out / "checkpoint" / "state.pt"
    if resume:
        if not checkpoint.is_file():
            hint = ("start a new run without --resume" if not entries else
                    "pass --overwrite to start again there (files of an earlier run are replaced)")
            raise OutputDirError(f"--resume: {out} holds no checkpoint ({checkpoint}); {hint}")
    elif entries and not overwrite:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        also = " or --resume to continue its checkpoint" if checkpoint.is_file() else ""
        raise OutputDirError(f"output directory {out} is not empty ({shown}): pass --overwrite to write over it "
                             f"(the files of a fastcl run are replaced, others kept){also}, or choose another "
                             "--output-dir")
    created = not out.exists()
    check_writable(out)
    return created


def remove_if_empty(out: Path) -> None:
    """Remove a directory this run created if nothing was written into it."""
    try:
        if out.is_dir() and not _listing(out):
            for entry in out.iterdir():
                entry.unlink()
            out.rmdir()
    except OSError:
        pass


def check_writable(out: Path) -> None:
    """Create ``out`` (and its parents) and write, flush and remove a file in it."""
    reason = unwritable_reason(out)
    if reason:
        raise OutputDirError(f"cannot write to output directory {out}: {reason}")


class DirectoryLock:
    """An exclusive advisory lock on ``OUT/.fastcl.lock`` for the life of a run."""

    def __init__(self, out: Path) -> None:
        self.path, self.fd = out / LOCK, None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputDirError(f"another training run is writing to {self.path.parent}; wait for it to end or "
                                 "choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()  # while still held: the directory is left as the run made it
            except OSError:
                pass
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def remove_earlier_run(out: Path, model_files: list[str]) -> list[str]:
    """For --overwrite: remove what an earlier fastcl run wrote (the run's files and the
    final model's files it recorded); anything else stays. Returns the removed names."""
    removed = []
    for name in list(RUN_ENTRIES) + [n for n in model_files if n and "/" not in n and n not in (".", "..")]:
        entry = out / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.exists() or entry.is_symlink():
            entry.unlink()
        else:
            continue
        removed.append(name)
    for entry in out.iterdir():
        if entry.name.startswith(".") and TMP_MARK in entry.name:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    fsync_directory(out)
    return removed
