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
