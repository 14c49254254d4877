#!/usr/bin/env bash
# Download the peers' wheels for the GPU machine, which has no network.
#
#   bash benchmarks/peer_wheels.sh        # here, where pip reaches PyPI
#
# Fetches memeff 0.3.1, inf-cl 1.2.1 and cut-cross-entropy 25.1.1 as wheels for
# CPython 3.12 on manylinux x86_64 (the H100 image: Python 3.12, torch 2.11, triton 3.6)
# into .whl/ at the repository root (git-ignored; never commit it), then lists what each
# one requires and fetches any requirement the GPU image does not already have.
# benchmarks/gpu_bench.sh installs them there with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
# and the device call carries the folder: run(..., carry=[".whl"]).
#
# All three are pure-Python wheels (py3-none-any; their Triton kernels compile at run
# time) whose only requirements are torch, triton and numpy, which the image has, so
# nothing else is fetched today. A requirement missing from the image is fetched too;
# one with no wheel (source only) stops the script with a message, since the GPU
# machine cannot build it from source without its build dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS=(memeff==0.3.1 inf-cl==1.2.1 cut-cross-entropy==25.1.1)
# Distributions the GPU image already holds (from the device notes' package list):
# requirements on these are satisfied there and must not travel (two versions of one
# package stop the install, and torch is far over the 64 MiB a call may carry).
ON_IMAGE="torch triton numpy nvidia-* setuptools typing-extensions filelock sympy networkx jinja2 fsspec"
PY=${PYTHON:-python3}
DEST=.whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p "$DEST"
grep -qx '/.whl/' .gitignore 2>/dev/null || echo "warning: /.whl/ is not in .gitignore; do not commit $DEST" >&2

fetch() {  # fetch NAME==VERSION (or NAME) as a binary wheel for the GPU machine
    local spec=$1 name=${1%%[=<>]*}
    # keep one version of each package: an older wheel of the same name would travel too
    local stem
    stem=$(echo "$name" | tr '[:upper:]-' '[:lower:]_')
    find "$DEST" -maxdepth 1 -iname "${stem}-*.whl" ! -iname "${stem}-${spec#*==}-*" -print -delete \
        | sed 's/^/removed older wheel: /'
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$spec"; then
        echo "error: no wheel of $spec for CPython 3.12 manylinux x86_64." >&2
        echo "  If it is source-only, build it here (pip wheel --no-deps $spec) only if it is" >&2
        echo "  pure Python; one with compiled parts must be built on the GPU machine's image." >&2
        return 1
    fi
}

requirements() {  # requirements of a wheel, without extras and environment-excluded ones
    "$PY" - "$1" <<'EOF'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:"):
            req = line.split(":", 1)[1].strip()
            marker = req.split(";", 1)[1] if ";" in req else ""
            if "extra ==" in marker:
                continue
            if "platform_system" in marker and "Linux" not in marker:
                continue
            print(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-"))
EOF
}

on_image() {
    local pkg=$1 pattern
    for pattern in $ON_IMAGE; do
        # shellcheck disable=SC2053
        [[ $pkg == $pattern ]] && return 0
    done
    return 1
}

for spec in "${PEERS[@]}"; do
    fetch "$spec"
done

echo "wheels in $DEST:"
missing=()
for whl in "$DEST"/*.whl; do
    reqs=$(requirements "$whl" | sort -u | tr '\n' ' ')
    echo "  $(basename "$whl")  ($(du -k "$whl" | cut -f1) KiB)  requires: ${reqs:-nothing}"
    case $(basename "$whl") in
        *-none-any.whl) ;;
        *) echo "    note: a binary wheel; it must match the GPU machine (CPython 3.12, x86_64)";;
    esac
    for req in $reqs; do
        on_image "$req" || missing+=("$req")
    done
done
if ((${#missing[@]})); then
    echo "fetching requirements the GPU image lacks: ${missing[*]}"
    for req in $(printf '%s\n' "${missing[@]}" | sort -u); do
        fetch "$req"
    done
else
    echo "every requirement is already on the GPU image (torch, triton, numpy)"
fi
du -sh "$DEST" | awk '{print "total: " $1 " (a device call carries at most 64 MiB)"}'
