"""Checkpoint files: all or nothing.

A checkpoint is one file, ``OUT/checkpoint/state.pt``, holding everything a resumed run
needs (model, optimizer, schedule, scaler, MoCo state, every rank's random states, the
data position, the best score so far and the length of the log at that step). It is
written beside its final name, flushed to disk and renamed over the old one, so a run
killed at any instant leaves the previous checkpoint or the new one, never a mix; the
temporary file is removed on any error and left-overs of a killed run are removed at
the next start.

The best model follows the same rule: it is written to ``OUT/.best.pending``, then the
checkpoint that records it, then it is renamed to ``OUT/best``. A pending model whose
step the checkpoint does not name belongs to steps a resumed run will redo: dropped.

Files are read with ``torch.load(weights_only=True)``: a damaged or foreign file is a
clear :class:`CheckpointError`, never code run from a pickle.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from ..interrupts import deferred

#: 2: one file with every rank's random states and the log length.
FORMAT = 2
REQUIRED = ("step", "epoch", "index", "world", "model", "optimizer", "scheduler", "scaler", "gauss_gen", "best",
            "best_step", "before", "sentences_seen", "train_seconds", "config")
TMP_MARK = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


class WriteError(OSError):
    """Writing an output failed (disk full, permissions); what was there before is intact."""


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then os.replace: a reader
    (or a resume after a crash) sees the old file or the new one, never half of one. On
    any error, the temporary file is removed and the old file stays."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with deferred(), open(tmp, "wb") as f:  # a Ctrl-C inside torch.save would break the zip writer
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_directory(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        raise WriteError(f"could not write {path} ({_reason(e)}); the previous checkpoint is intact") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _reason(e: BaseException) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]


def remove_temporaries(directory: Path) -> list[Path]:
    """Remove the temporary files and folders a killed run left in ``directory``
    (hidden names with ``.tmp``); returns them."""
    gone = []
    if not directory.is_dir():
        return gone
    for entry in directory.iterdir():
        if entry.name.startswith(".") and TMP_MARK in entry.name:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            gone.append(entry)
    return gone


def replace_directory(src: Path, dst: Path) -> None:
    """Make ``src`` appear as ``dst`` (two renames; a crash in between leaves
    ``dst.old``, which :func:`recover_directory` puts back)."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_directory(dst.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_directory(dst: Path) -> None:
    old = dst.with_name(dst.name + ".old")
    if not dst.exists() and old.exists():
        os.replace(old, dst)
    elif old.exists():
        shutil.rmtree(old)


# ------------------------------------------------------------------ random states


def rng_state() -> dict:
    """This process's random states, in types ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ reading


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, checked to be whole; CheckpointError otherwise."""
    advice = "start again with --overwrite, or restore the file"
    if not path.is_file():
        raise CheckpointError(f"--resume: no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"--resume: {path} is empty; {advice}")
    try:
        with warnings.catch_warnings():  # a foreign file's pickle protocol: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and EOF errors all mean the same to the user
        raise CheckpointError(f"--resume: {path} is not a readable checkpoint (truncated or damaged: "
                              f"{type(e).__name__}: {_reason(e)[:200]}); {advice}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"--resume: {path} is not a fastcl checkpoint; {advice}")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"--resume: {path} is not a fastcl checkpoint (no {', '.join(missing)}); {advice}")
    return state
