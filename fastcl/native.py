"""The loader of fastcl's compiled half: the C++ extension built from ``csrc/``.

The extension registers the CPU kernels of the operators ``torch.ops.fastcl.infonce_fwd``
and ``infonce_bwd`` (their schemas, CUDA and fake kernels live with the launchers, in
:mod:`fastcl.ops.operators`). Loading happens once, when fastcl is imported:

1. a library built by ``setup.py`` (``fastcl/_C*.so``, when torch was importable at
   install time, e.g. ``pip install --no-build-isolation -e .``), if its build record
   names the running torch and the current sources;
2. else a just-in-time build with ``torch.utils.cpp_extension.load`` (g++ and ninja),
   cached per torch version and source digest under ``$FASTCL_BUILD_DIR`` (default
   ``~/.cache/fastcl``): compiled once (15-40 s on 2 cores), loaded in milliseconds
   afterwards; ``FASTCL_NATIVE=jit`` takes this path even when a setup.py build exists.
   An extension built against another torch is never loaded: the record or the cache
   key differs, and a fresh build is made for the running torch;
3. else the pure-Python path (chunked PyTorch on CPU, Triton on CUDA), with one
   RuntimeWarning that says why. ``FASTCL_NATIVE=0`` skips 1 and 2 without a warning.

The compiler flags, the build record and the source digest come from
:mod:`fastcl.native_build`, which setup.py reads too.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .native_build import BUILD_RECORD, EXTRA_CFLAGS, EXTRA_LDFLAGS, SOURCE_DIR, source_digest, source_files

PACKAGE_DIR = Path(__file__).resolve().parent
JIT_NAME = "fastcl_native"

__all__ = ["BUILD_RECORD", "EXTRA_CFLAGS", "EXTRA_LDFLAGS", "SOURCE_DIR", "NativeStatus", "available", "build",
           "cache_dir", "main", "source_digest", "source_files", "status"]


@dataclass
class NativeStatus:
    """What the loader did: ``available`` and, either way, how (``source``) or why not."""

    available: bool
    source: str  # "setup.py build", "jit build", "jit cache", or "" when unavailable
    path: str | None
    reason: str | None  # why the extension is unavailable (None when available)


_status: NativeStatus | None = None


def status() -> NativeStatus:
    """How the native extension was loaded, or why it was not."""
    assert _status is not None, "fastcl.native was not initialized"
    return _status


def available() -> bool:
    """True when the native CPU kernel is registered in this process."""
    return status().available


def cache_dir() -> Path:
    """Where just-in-time builds go: one folder per torch version and source digest."""
    root = os.environ.get("FASTCL_BUILD_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastcl")
    tag = f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{source_digest()}"
    return Path(root) / tag.replace("+", "_")


def _prebuilt_library() -> tuple[str | None, str]:
    """(path, "") of a setup.py build made for this torch and these sources, else (None, why)."""
    candidates = sorted(glob.glob(str(PACKAGE_DIR / "_C*.so")))
    if not candidates:
        return None, "no setup.py build"
    record_path = PACKAGE_DIR / BUILD_RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None, f"{candidates[0]} has no readable build record {record_path.name}"
    if record.get("torch") != torch.__version__:
        return None, (f"{candidates[0]} was built for torch {record.get('torch')}, "
                      f"this is torch {torch.__version__}")
    digest = source_digest()
    if digest is not None and record.get("sources") != digest:
        return None, f"{candidates[0]} was built from older sources"
    return candidates[0], ""


def build(verbose: bool = False) -> Path:
    """Compile the extension for the running torch (or find it cached) and load it.

    Returns the library's path. Raises whatever the build raises (no compiler, no
    ninja, compile errors); :func:`_load` turns that into the fallback warning.
    """
    if not source_files():
        raise RuntimeError(f"the C++ sources are not in {SOURCE_DIR} (an installed wheel without them)")
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{JIT_NAME}.so"
    # A lock file means another process is building here: let torch's loader wait for it.
    if library.exists() and not (directory / "lock").exists():
        torch.ops.load_library(str(library))
        return library
    from torch.utils import cpp_extension  # imports setuptools: only when building

    print(f"fastcl: compiling the native CPU extension for torch {torch.__version__} into {directory} "
          "(once per torch version; under a minute)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    cpp_extension.load(name=JIT_NAME, sources=[str(p) for p in source_files() if p.suffix == ".cpp"],
                       extra_cflags=EXTRA_CFLAGS, extra_ldflags=EXTRA_LDFLAGS, build_directory=str(directory),
                       is_python_module=False, verbose=verbose)
    print(f"fastcl: native extension built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    # torch names a rebuild in the same folder fastcl_native_v1.so, and so on.
    built = sorted(directory.glob(f"{JIT_NAME}*.so"), key=lambda p: p.stat().st_mtime)
    return built[-1] if built else library


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[:3])[:400]


def _load() -> NativeStatus:
    mode = os.environ.get("FASTCL_NATIVE", "1")
    if mode == "0":
        return NativeStatus(False, "", None, "disabled by FASTCL_NATIVE=0")
    if mode == "jit":
        prebuilt, why_not = None, "FASTCL_NATIVE=jit skips setup.py builds"
    else:
        prebuilt, why_not = _prebuilt_library()
    if prebuilt is not None:
        try:
            torch.ops.load_library(prebuilt)
            return NativeStatus(True, "setup.py build", prebuilt, None)
        except OSError as error:  # a library that cannot be loaded here: rebuild below
            why_not = f"{prebuilt} does not load ({_short(error)})"
    cached = (cache_dir() / f"{JIT_NAME}.so").exists()
    try:
        path = build(verbose=os.environ.get("FASTCL_NATIVE_VERBOSE", "0") == "1")
    except Exception as error:  # noqa: BLE001 - any build failure means: use the Python path
        reason = f"{why_not}, and the just-in-time build failed: {_short(error)}"
        return NativeStatus(False, "", None, reason)
    return NativeStatus(True, "jit cache" if cached else "jit build", str(path), None)


def _initialize() -> None:
    global _status
    if _status is not None:
        return
    _status = _load()
    if not _status.available and _status.reason != "disabled by FASTCL_NATIVE=0":
        warnings.warn(f"fastcl: the native CPU extension is unavailable ({_status.reason}); CPU losses use the "
                      "chunked PyTorch path. See docs/building.md.", RuntimeWarning, stacklevel=3)


_initialize()


def main(require: bool = False) -> int:
    """Report how the extension was loaded (importing fastcl built it if needed); with
    ``require``, return 1 when it is unavailable. From a shell::

        python -c "import fastcl.native as n; raise SystemExit(n.main(require=True))"
    """
    state = status()
    if state.available:
        print(f"fastcl native extension: loaded ({state.source}) from {state.path}; torch {torch.__version__}")
    else:
        print(f"fastcl native extension: unavailable: {state.reason}")
    return 1 if require and not state.available else 0
