"""fastcl's compiled half: the C++ extension built from ``csrc/`` and the operators.

Three dispatcher operators carry the fused loss, one per backend function (the same
arguments and outputs as :func:`fastcl.ops.infonce_fwd.infonce_forward` and
:func:`fastcl.ops.infonce_bwd.infonce_backward`, the layout flattened into its nine
fields, the optional ``groups`` pair into two optional tensors)::

    torch.ops.fastcl.infonce_fwd(q, k, params, targets, *layout, row_groups, key_groups,
                                 normalize_eps=None) -> (lse, target_logit)
    torch.ops.fastcl.infonce_bwd(q, k, params, targets, *layout, row_groups, key_groups,
                                 lse, grad_rows, need_dq, need_dk, normalize_eps=None)
        -> (dq, dk, row_dot)
    torch.ops.fastcl.infonce_fwd_grad(q, k, params, targets, *layout, row_groups, key_groups,
                                      row_weight, need_dq, need_dk, block_rows, block_cols,
                                      normalize_eps=None) -> (loss_rows, dq, dk, row_dot)

The third is the one-pass form for a reduced loss (fastcl/ops/one_pass.py): the per-row
losses together with the gradients for every row's incoming gradient ``row_weight``, in
the accumulator dtype. ``normalize_eps`` (when not None) makes the operators take raw rows and score their
cosines, as if every row of q and k had gone through ``F.normalize(x, dim=-1,
eps=normalize_eps)``; the backward then returns the gradients with respect to the raw
rows. Both the CPU kernel and the Triton kernels fuse this: one scale per row from its
norm, no normalized copies (fastcl/ops/normalize.py).

On CPU tensors they run the native C++ kernel (csrc/infonce_cpu.cpp: tiled, BLAS block
products, softmax fused per block, ATen's thread pool); on CUDA tensors the Triton
kernels; under torch.compile / torch.export the fake kernels below give output shapes,
so a compiled graph holds each as one opaque call. A gradient the backward is not asked
for comes back as an empty tensor (a schema cannot return None); the wrappers
:func:`operator_forward` / :func:`operator_backward` turn those into None.

Loading happens once, when fastcl is imported:

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

Without the extension this module defines the same schemas itself, so the CUDA
(Triton) and fake kernels, and therefore torch.compile on GPUs, work either way; only
the CPU kernel is missing then.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .ops.layout import ColumnLayout
from .ops.utils import accumulator_dtype

#: The operators' schemas; csrc/registration.cpp defines the same strings (a test checks).
SCHEMAS = {
    "infonce_fwd": (
        "infonce_fwd(Tensor q, Tensor k, Tensor params, Tensor? targets, int n_cols, int n_grad_cols, "
        "int hard_start, int n_hard, int gauss_start, float log_hard_weight, float log_gauss_weight, "
        "int self_start, int n_self, Tensor? row_groups, Tensor? key_groups, float? normalize_eps=None) "
        "-> (Tensor lse, Tensor target_logit)"),
    "infonce_bwd": (
        "infonce_bwd(Tensor q, Tensor k, Tensor params, Tensor? targets, int n_cols, int n_grad_cols, "
        "int hard_start, int n_hard, int gauss_start, float log_hard_weight, float log_gauss_weight, "
        "int self_start, int n_self, Tensor? row_groups, Tensor? key_groups, "
        "Tensor lse, Tensor grad_rows, bool need_dq, bool need_dk, float? normalize_eps=None) "
        "-> (Tensor dq, Tensor dk, Tensor row_dot)"),
    "infonce_fwd_grad": (
        "infonce_fwd_grad(Tensor q, Tensor k, Tensor params, Tensor? targets, int n_cols, int n_grad_cols, "
        "int hard_start, int n_hard, int gauss_start, float log_hard_weight, float log_gauss_weight, "
        "int self_start, int n_self, Tensor? row_groups, Tensor? key_groups, "
        "float row_weight, bool need_dq, bool need_dk, int block_rows, int block_cols, float? normalize_eps=None) "
        "-> (Tensor loss_rows, Tensor dq, Tensor dk, Tensor row_dot)"),
}

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR.parent / "csrc"
#: Compiler flags of both builds (setup.py keeps its own copy; a test checks they agree).
#: -fopenmp matters: at::parallel_for is a header template that runs its body serially
#: unless the extension itself is compiled with OpenMP (torch's own build uses it).
EXTRA_CFLAGS = ["-O3", "-fopenmp"]
EXTRA_LDFLAGS = ["-fopenmp"]
JIT_NAME = "fastcl_native"
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


# ---------------------------------------------------------------------- operators


N_LAYOUT_FIELDS = len(ColumnLayout._fields)


def _forward_args(rest):
    """(layout, groups, normalize_eps) from the arguments after ``targets``."""
    layout = ColumnLayout(*rest[:N_LAYOUT_FIELDS])
    row_groups, key_groups, *tail = rest[N_LAYOUT_FIELDS:]
    return layout, _groups_pair(row_groups, key_groups), (tail[0] if tail else None)


def _backward_args(rest):
    """(layout, groups, lse, grad_rows, need_dq, need_dk, normalize_eps) likewise."""
    layout = ColumnLayout(*rest[:N_LAYOUT_FIELDS])
    row_groups, key_groups, lse, grad_rows, need_dq, need_dk, *tail = rest[N_LAYOUT_FIELDS:]
    return (layout, _groups_pair(row_groups, key_groups), lse, grad_rows, need_dq, need_dk,
            (tail[0] if tail else None))


def _fake_forward(q, k, params, targets, *rest):
    acc = accumulator_dtype(q.dtype)
    return q.new_empty(q.shape[0], dtype=acc), q.new_empty(q.shape[0], dtype=acc)


def _fake_backward(q, k, params, targets, *rest):
    layout, _, _, _, need_dq, need_dk, _ = _backward_args(rest)
    n_grad_cols = layout.n_grad_cols
    n_rows, dim = q.shape
    acc = accumulator_dtype(q.dtype)
    dq = q.new_empty((n_rows if need_dq else 0, dim))
    dk = q.new_empty((n_grad_cols if need_dk and n_grad_cols > 0 else 0, dim))
    return dq, dk, q.new_empty(n_rows if need_dq else 0, dtype=acc)


def _one_pass_args(rest):
    """(layout, groups, row_weight, need_dq, need_dk, block_rows, block_cols, normalize_eps)."""
    layout = ColumnLayout(*rest[:N_LAYOUT_FIELDS])
    row_groups, key_groups, row_weight, need_dq, need_dk, block_rows, block_cols, *tail = rest[N_LAYOUT_FIELDS:]
    return (layout, _groups_pair(row_groups, key_groups), row_weight, need_dq, need_dk, block_rows, block_cols,
            (tail[0] if tail else None))


def _fake_forward_grad(q, k, params, targets, *rest):
    layout, _, _, need_dq, need_dk, _, _, _ = _one_pass_args(rest)
    n_rows, dim = q.shape
    acc = accumulator_dtype(q.dtype)
    n_grad = layout.n_grad_cols if need_dk else 0
    return (q.new_empty(n_rows, dtype=acc), q.new_empty((n_rows if need_dq else 0, dim), dtype=acc),
            q.new_empty((n_grad, dim), dtype=acc), q.new_empty(n_rows if need_dq else 0, dtype=acc))


def _cuda_forward_grad(q, k, params, targets, *rest):
    from .ops.infonce_one_pass import infonce_forward_grad

    layout, groups, row_weight, need_dq, need_dk, block_rows, _, eps = _one_pass_args(rest)
    return infonce_forward_grad(q.contiguous(), k.contiguous(), params, targets, layout, row_weight, need_dq, need_dk,
                                groups=groups, normalize_eps=eps, chunk_rows=block_rows)


def _groups_pair(row_groups, key_groups):
    return None if row_groups is None else (row_groups, key_groups)


def _cuda_forward(q, k, params, targets, *rest):
    from .ops.infonce_fwd import infonce_forward

    layout, groups, eps = _forward_args(rest)
    return infonce_forward(q.contiguous(), k.contiguous(), params, targets, layout, groups=groups,
                           normalize_eps=eps)


def _cuda_backward(q, k, params, targets, *rest):
    from .ops.infonce_bwd import infonce_backward

    layout, groups, lse, grad_rows, need_dq, need_dk, eps = _backward_args(rest)
    dq, dk, row_dot = infonce_backward(q.contiguous(), k.contiguous(), params, targets, layout, lse, grad_rows,
                                       need_dq=need_dq, need_dk=need_dk, groups=groups, normalize_eps=eps)
    dim = q.shape[1]
    return (dq if dq is not None else q.new_empty((0, dim)),
            dk if dk is not None else q.new_empty((0, dim)),
            row_dot if row_dot is not None else q.new_empty(0, dtype=accumulator_dtype(q.dtype)))


_python_library = None  # the schemas' owner when the C++ library is not loaded


def _register_operators(native_loaded: bool) -> None:
    global _python_library
    if not native_loaded:
        _python_library = torch.library.Library("fastcl", "DEF")
        for schema in SCHEMAS.values():
            _python_library.define(schema)
    torch.library.register_fake("fastcl::infonce_fwd")(_fake_forward)
    torch.library.register_fake("fastcl::infonce_bwd")(_fake_backward)
    torch.library.register_kernel("fastcl::infonce_fwd", "cuda")(_cuda_forward)
    torch.library.register_kernel("fastcl::infonce_bwd", "cuda")(_cuda_backward)
    torch.library.register_fake("fastcl::infonce_fwd_grad")(_fake_forward_grad)
    torch.library.register_kernel("fastcl::infonce_fwd_grad", "cuda")(_cuda_forward_grad)


def _require_kernel(q: torch.Tensor) -> None:
    if q.device.type == "cpu" and not status().available:
        raise RuntimeError("backend='native' needs fastcl's compiled CPU extension, which is unavailable: "
                           f"{status().reason}. See README, 'Building the extension'.")


def operator_forward(q, k, params, targets, layout: ColumnLayout, groups=None, normalize_eps=None):
    """``(lse, target_logit)`` from ``torch.ops.fastcl.infonce_fwd`` (any device);
    ``groups`` is None or ``(row_groups, key_groups)``, as for the Triton launcher;
    ``normalize_eps`` (None: rows scored as given) normalizes the rows on the fly."""
    _require_kernel(q)
    row_groups, key_groups = groups if groups is not None else (None, None)
    return torch.ops.fastcl.infonce_fwd(q, k, params, targets, *layout, row_groups, key_groups, normalize_eps)


def operator_backward(q, k, params, targets, layout: ColumnLayout, lse, grad_rows,
                      need_dq: bool = True, need_dk: bool = True, groups=None, normalize_eps=None):
    """``(dq, dk, row_dot)`` from ``torch.ops.fastcl.infonce_bwd``, None where not asked for."""
    _require_kernel(q)
    row_groups, key_groups = groups if groups is not None else (None, None)
    dq, dk, row_dot = torch.ops.fastcl.infonce_bwd(q, k, params, targets, *layout, row_groups, key_groups,
                                                   lse, grad_rows, need_dq, need_dk, normalize_eps)
    return ((dq if need_dq else None), (dk if need_dk and layout.n_grad_cols > 0 else None),
            (row_dot if need_dq else None))


def operator_forward_grad(q, k, params, targets, layout: ColumnLayout, row_weight: float, need_dq: bool = True,
                          need_dk: bool = True, groups=None, normalize_eps=None, block_rows: int = 0,
                          block_cols: int = 0):
    """``(loss_rows, dq, dk, row_dot)`` from ``torch.ops.fastcl.infonce_fwd_grad`` (one pass
    for a reduced loss, every row's gradient ``row_weight``), None where not asked for."""
    _require_kernel(q)
    row_groups, key_groups = groups if groups is not None else (None, None)
    loss_rows, dq, dk, row_dot = torch.ops.fastcl.infonce_fwd_grad(
        q, k, params, targets, *layout, row_groups, key_groups, float(row_weight), need_dq, need_dk, block_rows,
        block_cols, normalize_eps)
    return (loss_rows, (dq if need_dq else None), (dk if need_dk and layout.n_grad_cols > 0 else None),
            (row_dot if need_dq else None))


def _initialize() -> None:
    global _status
    if _status is not None:
        return
    _status = _load()
    _register_operators(_status.available)
    if not _status.available and _status.reason != "disabled by FASTCL_NATIVE=0":
        warnings.warn(f"fastcl: the native CPU extension is unavailable ({_status.reason}); CPU losses use the "
                      "chunked PyTorch path. See README, 'Building the extension'.", RuntimeWarning, stacklevel=3)


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
