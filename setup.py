"""Build script. Metadata lives in pyproject.toml; this file builds the compiled
extension from csrc/ (README, "Building the extension").

The extension links against the torch it is compiled with, so it is built here only when
torch is importable in the build environment, i.e. with ``pip install
--no-build-isolation -e .`` after torch is installed. pyproject.toml deliberately does not
list torch as a build requirement: pip would then fetch a torch into an isolated build
environment (a multi-GB CUDA wheel when unpinned, and with a pin, possibly another torch
than the one installed, whose extension would not load). With build isolation (plain
``pip install -e .``), nothing is compiled here and fastcl compiles the extension just in
time on first import, against the torch that is actually installed (fastcl/native.py).

A failed compilation never fails the install: the extension is optional, and fastcl
falls back to its pure-Python path with one warning that says why.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _build_constants():
    """fastcl/native_build.py, loaded by path: the flags, build record and source digest
    that fastcl/native.py uses too, without importing fastcl (or torch)."""
    spec = importlib.util.spec_from_file_location("fastcl_native_build", ROOT / "fastcl" / "native_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_constants()


def _extension_options() -> dict:
    if os.environ.get("FASTCL_NATIVE", "1") == "0":
        print("fastcl: FASTCL_NATIVE=0, not building the native extension", file=sys.stderr)
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("fastcl: torch is not importable in this build environment (pip's build isolation), so the "
              "native extension is not compiled now; fastcl compiles it on first import against the "
              "installed torch. To compile it here: pip install --no-build-isolation -e .", file=sys.stderr)
        return {}

    class BuildWithRecord(BuildExtension):
        """Records, next to the library, the torch and sources it was built from, so that
        fastcl never loads it into another torch (it rebuilds just in time instead)."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - no compiler, a compile error, ...
                # setuptools' optional=True covers only some failures (a missing compiler
                # fails earlier, in torch's compiler check): never fail the install.
                print(f"fastcl: WARNING: could not compile the native extension ({type(error).__name__}: "
                      f"{error}); installing without it. fastcl will try again just in time on import "
                      "and otherwise use its pure-Python path, with a warning.", file=sys.stderr)
                return
            for ext in self.extensions:
                library = Path(self.get_ext_fullpath(ext.name))
                if library.exists():
                    record = {"torch": torch.__version__, "sources": BUILD.source_digest()}
                    (library.parent / BUILD.BUILD_RECORD).write_text(json.dumps(record) + "\n")

    extension = CppExtension(
        "fastcl._C",
        sources=[str(p.relative_to(ROOT)) for p in BUILD.source_files() if p.suffix == ".cpp"],
        extra_compile_args=BUILD.EXTRA_CFLAGS,
        extra_link_args=BUILD.EXTRA_LDFLAGS,
        optional=True,  # a compile error is reported, and the install goes on without it
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildWithRecord}}


if __name__ == "__main__":
    setup(**_extension_options())
