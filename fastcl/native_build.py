"""What both builds of the native extension share: compiler flags, the build record's
name and the digest of the C++ sources.

setup.py loads this file by its path (it never imports fastcl or torch), and
fastcl/native.py imports it; so the two builds cannot drift apart. Standard library only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

#: The C++ sources: csrc/ next to the package (a checkout or an editable install).
SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
#: Compiler and linker flags. -fopenmp matters: at::parallel_for is a header template
#: that runs its body serially unless the extension itself is compiled with OpenMP
#: (torch's own build uses it).
EXTRA_CFLAGS = ["-O3", "-fopenmp"]
EXTRA_LDFLAGS = ["-fopenmp"]
#: Written by setup.py next to the library: the torch and the sources it was built from.
BUILD_RECORD = "_C.build.json"


def source_files(source_dir: Path = SOURCE_DIR) -> list[Path]:
    return sorted(p for p in source_dir.glob("*") if p.suffix in (".cpp", ".h"))


def source_digest(source_dir: Path = SOURCE_DIR) -> str | None:
    """sha256 of the C++ sources and flags (None when the sources are not shipped)."""
    files = source_files(source_dir)
    if not files:
        return None
    digest = hashlib.sha256(" ".join(EXTRA_CFLAGS + EXTRA_LDFLAGS).encode())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
