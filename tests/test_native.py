"""The compiled CPU extension: torch.ops.fastcl.* against the float64 reference at real
sizes, gradcheck through the operators, torch.library.opcheck, and the loader.

Without the extension these tests are skipped, except in CI, where .ci/run sets
FASTCL_REQUIRE_NATIVE=1 so that a broken build fails instead of skipping.
"""

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

from fastcl import info_nce, info_nce_reference, native
from fastcl.backends import choose_backend as _choose_backend
from fastcl.ops import operators

from .helpers import (
    NATIVE_REQUIRED, OPCHECK_VARIANTS, Case, assert_close, assert_deterministic_across_threads, check_groups_stay_apart,
    cpu_tiles, gradcheck_info_nce, needs_native, opcheck_grid, operator_args, operator_inputs, relative_error, run_both,
)
from .test_kernels import CASES as SMALL_CASES
from .test_kernels import DTYPE_TOLERANCE

REPO = Path(__file__).resolve().parent.parent


def test_extension_is_loaded_when_required():
    if not NATIVE_REQUIRED:
        pytest.skip("FASTCL_REQUIRE_NATIVE is not set (CI sets it)")
    assert native.available(), native.status().reason
    for op in ("infonce_fwd", "infonce_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcl::{op}", "CPU")


@needs_native
def test_cpp_schemas_match_python_schemas():
    # registration.cpp and operators.SCHEMAS must describe the same operators: without the
    # extension the Python strings define them, and the CUDA / fake kernels assume them.
    for name, schema in operators.SCHEMAS.items():
        loaded = getattr(torch.ops.fastcl, name).default._schema
        assert str(loaded) == str(torch._C.parse_schema(f"fastcl::{schema}"))


def test_setup_py_reads_the_loaders_build_constants():
    # setup.py loads fastcl/native_build.py by its path and never imports fastcl: one set
    # of flags, one build record name and one source digest for both builds.
    spec = importlib.util.spec_from_file_location("fastcl_setup", REPO / "setup.py")
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)  # setup() itself only runs as __main__
    assert Path(setup_module.BUILD.__file__).resolve() == (REPO / "fastcl" / "native_build.py").resolve()
    assert setup_module.BUILD.EXTRA_CFLAGS == native.EXTRA_CFLAGS
    assert setup_module.BUILD.source_digest() == native.source_digest() is not None
    imported = {alias.name for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    imported |= {node.module for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not any(name.split(".")[0] == "fastcl" for name in imported), imported


# ------------------------------------------------------------- against the reference

# Real sizes, ragged against the 256-row x 512-column blocks, every option; each option
# is covered in fp64 (at 1e-10) and in fp32 (at 1e-5). The float64 dense reference is
# the cost here (about a minute for all of them on 2 cores).
REAL_CASES = {
    "n4096_d768_fp32": (Case(n=4096, d=768), torch.float32),
    "n4096_everything_fp64": (Case(n=4096, d=96, hard=True, hard_weight=2.0, n_extra=1000, gaussian=64,
                                   gaussian_weight=0.5, labels=True, learnable_tau=True, reduction="none"),
                              torch.float64),
    "n3001_symmetric_all_fp32": (Case(n=3001, d=129, symmetric=True, hard=True, hard_weight=0.7, n_extra=77,
                                      gaussian=5, gaussian_weight=1.5, learnable_tau=True, reduction="sum"),
                                 torch.float32),
    "n2050_everything_fp32": (Case(n=2050, d=200, hard=True, hard_weight=0.4, n_extra=333, gaussian=16,
                                   gaussian_weight=2.0, labels=True, learnable_tau=True, reduction="none"),
                              torch.float32),
    "n1531_symmetric_fp64": (Case(n=1531, d=72, symmetric=True, hard=True, hard_weight=1.3, n_extra=9,
                                  gaussian=3, learnable_tau=True), torch.float64),
    "n1531_unnormalized_fp64": (Case(n=1531, d=40, normalize=False, temperature=3.0, hard=True, hard_weight=3.0,
                                     n_extra=13, labels=True), torch.float64),
}


@needs_native
@pytest.mark.parametrize("name", list(REAL_CASES))
def test_real_sizes_match_reference(name):
    case, dtype = REAL_CASES[name]
    ours, ref = run_both(case, "native", "cpu", dtype=dtype)
    assert_close(ours, ref, 1e-10 if dtype == torch.float64 else 1e-5, name)


def _loss_and_grads(fn, leaves):
    leaves = [x.clone().requires_grad_() for x in leaves]
    loss = fn(*leaves)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves))


@needs_native
def test_nt_xent_and_groups_at_real_size():
    # Masked columns at scale: NT-Xent's self column, and token-level groups (a row sees
    # only its own group's positives and hard negatives, plus the shared queue).
    from fastcl import nt_xent, nt_xent_reference

    g = torch.Generator().manual_seed(5)
    z1, z2 = (torch.randn(1500, 64, dtype=torch.float64, generator=g) for _ in range(2))
    ours = _loss_and_grads(lambda a, b: nt_xent(a, b, temperature=0.2, backend="native"), [z1, z2])
    ref = _loss_and_grads(lambda a, b: nt_xent_reference(a, b, temperature=0.2), [z1, z2])
    for o, r in zip(ours, ref):
        assert relative_error(o, r) < 1e-10

    a, p, h = (torch.randn(2500, 48, dtype=torch.float64, generator=g) for _ in range(3))
    queue = torch.randn(300, 48, dtype=torch.float64, generator=g)
    groups = torch.randint(0, 40, (2500,), generator=g)
    options = dict(hard_negative_weight=2.0, temperature=0.1, groups=groups)
    ours = _loss_and_grads(lambda *x: info_nce(*x, queue, backend="native", **options), [a, p, h])
    ref = _loss_and_grads(lambda *x: info_nce_reference(*x, queue, **options), [a, p, h])
    for o, r in zip(ours, ref):
        assert relative_error(o, r) < 1e-10


@needs_native
@pytest.mark.parametrize("tiles", [None, (16, 16), (5, 7)], ids=["default_tiles", "tiles16", "tiles5x7"])
def test_sorted_groups_skip_blocks_and_match_reference(tiles, monkeypatch):
    # Rows sorted by group (sequences of uneven length, as token_info_nce lays them out),
    # hard negatives (a second sorted run of groups among the columns), a shared queue,
    # fused normalization: the blocks the kernel skips must be exactly those that hold no
    # candidate. Bit-identical on 1 and 2 threads: a dk tile's turn passes over the
    # chunks that skip it.
    cpu_tiles(monkeypatch, tiles)
    g = torch.Generator().manual_seed(8)
    lengths = torch.randint(1, 40, (60,), generator=g)
    groups = torch.repeat_interleave(torch.arange(60), lengths)
    n = groups.numel()
    a, p, h = (torch.randn(n, 24, dtype=torch.float64, generator=g) for _ in range(3))
    queue = torch.randn(37, 24, dtype=torch.float64, generator=g)
    options = dict(hard_negative_weight=1.5, temperature=0.1, groups=groups, symmetric=True)
    ref = _loss_and_grads(lambda *x: info_nce_reference(*x, queue, **options), [a, p, h])
    previous = torch.get_num_threads()
    try:
        runs = []
        for threads in (2, 1):
            torch.set_num_threads(threads)
            runs.append(_loss_and_grads(lambda *x: info_nce(*x, queue, backend="native", **options), [a, p, h]))
    finally:
        torch.set_num_threads(previous)
    for o, r in zip(runs[0], ref):
        assert relative_error(o, r) < 1e-10
    for x, y in zip(*runs):
        assert torch.equal(x, y)


@needs_native
def test_native_skips_blocks_without_a_common_group(monkeypatch):
    # As the Triton kernels' test (test_groups.py): 16 x 16 blocks, groups of 16 aligned
    # with them. A NaN candidate in group 1 would turn group 0's gradients to NaN
    # (0 * NaN in the gradient product) if group 0's rows visited its block.
    cpu_tiles(monkeypatch, (16, 16))
    check_groups_stay_apart("native", dtype=torch.float32)


@needs_native
@pytest.mark.parametrize("tiles", [None, (4, 8), (7, 5)], ids=["default_tiles", "tiles4x8", "tiles7x5"])
@pytest.mark.parametrize("name", list(SMALL_CASES))
def test_small_cases_match_reference(name, tiles, monkeypatch):
    # Tiny blocks make the small ragged cases span many row chunks and column tiles, so
    # the tile walk, its staggered start and the shared dk tiles are all exercised.
    cpu_tiles(monkeypatch, tiles)
    ours, ref = run_both(SMALL_CASES[name], "native", "cpu")
    assert_close(ours, ref, 1e-10, name)


@needs_native
@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCE), ids=str)
@pytest.mark.parametrize("name", ["plain", "everything", "symmetric_all"])
def test_low_precision_matches_reference(name, dtype):
    case = SMALL_CASES[name].but(n=300)
    ours, ref = run_both(case, "native", "cpu", dtype=dtype)
    assert_close(ours, ref, DTYPE_TOLERANCE[dtype], f"{name}/{dtype}")
    for grad_name in ("anchors", "positives", "hard_negatives"):
        if grad_name in ours:
            assert ours[grad_name].dtype == dtype, "gradients keep the input dtype"


@needs_native
def test_backward_is_deterministic_across_runs_and_thread_counts(monkeypatch):
    # The recomputing backward: 16 row chunks x 8 column tiles, dk tiles receive many
    # chunks' blocks, in chunk order whatever the scheduling.
    assert_deterministic_across_threads(monkeypatch, 1000, 64, (64, 128), "workspace")


# ------------------------------------------------------------------- gradcheck

GRAD_N, GRAD_D = 17, 3
GRAD_CASES = {
    "plain": dict(),
    "hard_negatives": dict(hard=True, hard_negative_weight=2.0),
    "extra_gaussian_labels": dict(n_extra=6, gaussian_negatives=4, gaussian_weight=0.5, labels=True),
    "symmetric": dict(symmetric=True, reduction="none"),
    "learnable_temperature": dict(learnable_tau=True, hard=True, hard_negative_weight=0.5),
    # Raw dot products of unit-variance rows: a larger temperature keeps the logits in the
    # range where finite differences resolve atol 1e-8 (at 0.3 the reference fails too).
    "unnormalized_sum": dict(normalize=False, reduction="sum", hard=True, temperature=3.0),
}


@needs_native
@pytest.mark.parametrize("tiles", [None, (5, 6)], ids=["one_tile", "many_tiles"])
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_through_native_operator(name, tiles, monkeypatch):
    cpu_tiles(monkeypatch, tiles)
    gradcheck_info_nce("native", GRAD_N, GRAD_D, **GRAD_CASES[name])


@needs_native
def test_fused_normalization_at_clamped_and_tiny_norms():
    # The native kernel normalizes on the fly. Rows whose norm eps clamps take
    # F.normalize's other branch (no projection in the backward); rows of every scale,
    # zero rows included, must match the reference that normalizes first.
    g = torch.Generator().manual_seed(3)
    n, d, eps = 700, 33, 0.5
    scale = torch.logspace(-4, 2, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    a = torch.randn(n, d, dtype=torch.float64, generator=g) * scale[:, None] / d ** 0.5
    p = torch.randn(n, d, dtype=torch.float64, generator=g) * scale.flip(0)[:, None] / d ** 0.5
    h = torch.randn(n, d, dtype=torch.float64, generator=g)
    a[5], p[9], h[11] = 0.0, 0.0, 0.0
    assert (a.norm(dim=1) < eps).sum() > 100 and (a.norm(dim=1) > eps).sum() > 100
    queue = torch.randn(50, d, dtype=torch.float64, generator=g) * 1e-3
    options = dict(temperature=0.1, eps=eps, symmetric=True, gaussian_negatives=8, gaussian_weight=0.5)
    ours = _loss_and_grads(lambda *x: info_nce(*x, queue, backend="native", generator=torch.Generator().manual_seed(0),
                                               **options), [a, p, h])
    ref = _loss_and_grads(lambda *x: info_nce(*x, queue, backend="reference",
                                              generator=torch.Generator().manual_seed(0), **options), [a, p, h])
    for o, r in zip(ours, ref):
        assert relative_error(o, r) < 1e-10

    small = [x[:13, :4].clone().requires_grad_() for x in (a, p, h)]
    assert gradcheck(lambda *x: info_nce(*x, temperature=0.5, eps=eps, backend="native", reduction="none"),
                     small, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=False)


@needs_native
def test_cuda_dispatch_normalization_matches_the_fused_cpu_kernel():
    # On CUDA tensors the operators' normalize_eps runs as normalized copies through the
    # Triton kernels plus F.normalize's backward in Python. Under the interpreter those
    # same functions run on CPU tensors, so they are checked here against the fused CPU
    # kernel (normalization's backward included), raw rows of mixed norms in, with
    # clamped rows and groups.
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not native_interpreter_available():
        pytest.skip("needs a GPU or Triton's interpreter")
    q, k, params, targets, layout, groups = _operator_inputs(torch.float64, True, True, False, n=29, d=12,
                                                            grouped=True)
    g = torch.Generator().manual_seed(2)
    q = q * torch.rand(q.shape[0], 1, dtype=q.dtype, generator=g) * 3
    k = k * torch.rand(k.shape[0], 1, dtype=k.dtype, generator=g) * 3
    eps = 0.375  # exact in every float dtype: both sides clamp at the same value
    args = operator_args(q, k, params, targets, layout, groups)
    lse, target_logit = torch.ops.fastcl.infonce_fwd(*args, normalize_eps=eps)
    grad_rows = torch.randn(q.shape[0], dtype=torch.float64, generator=g)
    ours = torch.ops.fastcl.infonce_bwd(*args, lse, grad_rows, True, True, normalize_eps=eps)
    if on_gpu:  # through the dispatcher's CUDA kernel
        def cuda(x):
            return x.cuda() if isinstance(x, torch.Tensor) else x

        cuda_args = [cuda(x) for x in args]
        lse_t, target_logit_t = torch.ops.fastcl.infonce_fwd(*cuda_args, normalize_eps=eps)
        theirs = torch.ops.fastcl.infonce_bwd(*cuda_args, lse.cuda(), grad_rows.cuda(), True, True,
                                              normalize_eps=eps)
        lse_t, target_logit_t, theirs = lse_t.cpu(), target_logit_t.cpu(), [t.cpu() for t in theirs]
    else:  # the same Python kernel functions, run by the interpreter on CPU tensors
        lse_t, target_logit_t = operators._cuda_forward(*args, eps)
        theirs = operators._cuda_backward(*args, lse, grad_rows, True, True, eps)
    assert relative_error(lse_t, lse) < 1e-12 and relative_error(target_logit_t, target_logit) < 1e-12
    for name, o, t in zip(("dq", "dk", "row_dot"), ours, theirs):
        assert relative_error(t, o) < 1e-10, name
    # And both equal autograd through F.normalize around the unnormalized operator.
    leaves = [x.clone().requires_grad_() for x in (q, k)]
    units = [torch.nn.functional.normalize(x, dim=-1, eps=eps) for x in leaves]
    dq_unit, dk_unit, _ = torch.ops.fastcl.infonce_bwd(*operator_args(*units, params, targets, layout, groups),
                                                       lse, grad_rows, True, True)
    dk_full = torch.cat([dk_unit, torch.zeros(k.shape[0] - dk_unit.shape[0], k.shape[1], dtype=k.dtype)])
    dq_raw, dk_raw = torch.autograd.grad(units, leaves, [dq_unit, dk_full])
    assert relative_error(ours[0], dq_raw) < 1e-10
    assert relative_error(ours[1], dk_raw[:dk_unit.shape[0]]) < 1e-10


def native_interpreter_available() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


# --------------------------------------------------------------------- opcheck


def _operator_inputs(*variant, **changes):
    """:func:`operator_inputs` at 37 x 24, unit rows, 1 / tau = 12.5."""
    return operator_inputs(*variant, **{"n": 37, "d": 24, "scale": 12.5, "unit": True, **changes})


@needs_native
@pytest.mark.parametrize("normalize_eps", [None, 1e-12], ids=["prenormalized", "fused_normalize"])
@pytest.mark.parametrize("variant", list(OPCHECK_VARIANTS))
def test_opcheck_forward(variant, normalize_eps):
    inputs = _operator_inputs(*OPCHECK_VARIANTS[variant])
    torch.library.opcheck(torch.ops.fastcl.infonce_fwd.default, (*operator_args(*inputs), normalize_eps))


@opcheck_grid
def test_opcheck_backward(variant, need_dq, need_dk, normalize_eps):
    inputs = _operator_inputs(*OPCHECK_VARIANTS[variant])
    lse, _ = torch.ops.fastcl.infonce_fwd(*operator_args(*inputs), normalize_eps)
    grad_rows = torch.randn(inputs[0].shape[0], dtype=lse.dtype)
    torch.library.opcheck(torch.ops.fastcl.infonce_bwd.default,
                          (*operator_args(*inputs), lse, grad_rows, need_dq, need_dk, normalize_eps))


@needs_native
def test_operator_outputs_follow_the_backend_contract():
    q, k, params, targets, layout, _ = _operator_inputs(torch.bfloat16, True, True, True)
    lse, target_logit = operators.operator_forward(q, k, params, targets, layout)
    assert lse.dtype == target_logit.dtype == torch.float32 and lse.shape == (q.shape[0],)
    grad_rows = torch.ones(q.shape[0])
    dq, dk, row_dot = operators.operator_backward(q, k, params, targets, layout, lse, grad_rows, True, True)
    assert dq.shape == q.shape and dq.dtype == torch.bfloat16
    assert dk.shape == (layout.n_grad_cols, q.shape[1]) and dk.dtype == torch.bfloat16
    assert row_dot.shape == (q.shape[0],) and row_dot.dtype == torch.float32
    dq, dk, row_dot = operators.operator_backward(q, k, params, targets, layout, lse, grad_rows, False, True)
    assert dq is None and row_dot is None and dk is not None


@needs_native
@pytest.mark.parametrize("mutation, message", [
    (lambda a: a.__setitem__(2, a[2].double()), "params must be"),
    (lambda a: a.__setitem__(3, torch.full_like(a[3], 10**6)), "outside"),
    (lambda a: a.__setitem__(4, a[4] + 1), "n_cols"),
    (lambda a: a.__setitem__(1, a[1][:, :5]), "embedding dim"),
    (lambda a: a.__setitem__(1, a[1].double()), "one dtype"),
    (lambda a: a.__setitem__(6, a[4] + 1), "hard-negative columns"),
    (lambda a: a.__setitem__(3, torch.full_like(a[3], -2)), "outside"),
    (lambda a: a.__setitem__(13, torch.zeros(37, dtype=torch.int64)), "go together"),
    (lambda a: (a.__setitem__(13, torch.zeros(36, dtype=torch.int64)),
                a.__setitem__(14, torch.zeros(74, dtype=torch.int64))), "row_groups must be"),
    (lambda a: (a.__setitem__(12, 37), a.__setitem__(11, a[4])), "self columns"),
], ids=["params_dtype", "target_range", "n_cols", "dim", "dtype", "hard_range", "target_below_minus_one",
        "half_groups", "group_length", "self_range"])
def test_operator_rejects_bad_arguments(mutation, message):
    args = list(operator_args(*_operator_inputs(torch.float32, True, False, True)))
    mutation(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastcl.infonce_fwd(*args)


# ----------------------------------------------------------------------- loader


def test_auto_backend_takes_native_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    big = 1 << 20
    expected = "cpp" if native.available() else "chunked"
    assert _choose_backend("auto", torch.device("cpu"), big) == expected
    monkeypatch.setattr(native, "_status", native.NativeStatus(False, "", None, "pretend"))
    assert _choose_backend("auto", torch.device("cpu"), big) == "chunked"
    with pytest.raises(RuntimeError, match="pretend"):
        info_nce(torch.randn(300, 8), torch.randn(300, 8), backend="native")


def _fake_prebuilt(tmp_path, monkeypatch, record):
    (tmp_path / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (tmp_path / native.BUILD_RECORD).write_text(json.dumps(record))
    monkeypatch.setattr(native, "PACKAGE_DIR", tmp_path)


def test_prebuilt_library_for_another_torch_is_not_loaded(tmp_path, monkeypatch):
    _fake_prebuilt(tmp_path, monkeypatch, {"torch": "2.11.0+cu130", "sources": native.source_digest()})
    path, reason = native._prebuilt_library()
    assert path is None and "2.11.0+cu130" in reason and torch.__version__ in reason


def test_prebuilt_library_from_older_sources_is_not_loaded(tmp_path, monkeypatch):
    _fake_prebuilt(tmp_path, monkeypatch, {"torch": torch.__version__, "sources": "0123456789abcdef"})
    path, reason = native._prebuilt_library()
    assert path is None and "older sources" in reason


def test_prebuilt_library_for_this_torch_is_chosen(tmp_path, monkeypatch):
    _fake_prebuilt(tmp_path, monkeypatch, {"torch": torch.__version__, "sources": native.source_digest()})
    path, reason = native._prebuilt_library()
    assert path is not None and path.endswith(".so") and reason == ""


_PROBE = """
import torch, fastcl
from fastcl import info_nce, info_nce_reference, native
from fastcl.ops import operators
from fastcl.backends import choose_backend as _choose_backend
s = native.status()
print("STATUS", s.available, s.source, s.reason)
print("AUTO", _choose_backend("auto", torch.device("cpu"), 1 << 20))
a, p = torch.randn(300, 16, dtype=torch.float64), torch.randn(300, 16, dtype=torch.float64)
ref = info_nce(a, p, backend="reference")
print("ERR", abs(info_nce(a, p).item() - ref.item()))
# Without the extension the schemas come from Python: the operators exist either way.
print("SCHEMAS", all(str(getattr(torch.ops.fastcl, name).default._schema)
                     == str(torch._C.parse_schema("fastcl::" + schema)) for name, schema in operators.SCHEMAS.items()))
if not s.available:
    try:
        info_nce(a, p, backend="native")
    except RuntimeError as e:
        print("NATIVE_REFUSED", "unavailable" in str(e))
"""


def _probe(tmp_path, **env):
    full_env = {**os.environ, "TRITON_INTERPRET": "0", "FASTCL_BUILD_DIR": str(tmp_path / "cache"),
                "PYTHONPATH": str(REPO), **env}
    full_env.pop("FASTCL_REQUIRE_NATIVE", None)
    done = subprocess.run([sys.executable, "-W", "always", "-c", _PROBE], env=full_env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    return lines, done.stderr


def test_failed_build_falls_back_with_exactly_one_warning(tmp_path):
    # FASTCL_NATIVE=jit ignores any setup.py build; a compiler that does not exist makes
    # the just-in-time build fail the way a machine without g++ does.
    lines, stderr = _probe(tmp_path, FASTCL_NATIVE="jit", CXX=str(tmp_path / "no-such-compiler"))
    assert lines["STATUS"].startswith("False")
    assert stderr.count("the native CPU extension is unavailable") == 1, stderr[-3000:]
    assert lines["AUTO"] == "chunked"
    assert float(lines["ERR"]) < 1e-12
    assert lines["NATIVE_REFUSED"] == "True"
    assert lines["SCHEMAS"] == "True"


@needs_native
def test_just_in_time_build_then_cache(tmp_path):
    # The path of a plain `pip install -e .` (no compiled extension at install time):
    # compiled on first import against this torch, loaded from the cache afterwards.
    lines, stderr = _probe(tmp_path, FASTCL_NATIVE="jit")
    assert lines["STATUS"].startswith("True jit build"), stderr[-3000:]
    assert "the native CPU extension is unavailable" not in stderr
    assert lines["AUTO"] == "cpp" and float(lines["ERR"]) < 1e-12 and lines["SCHEMAS"] == "True"
    lines, _ = _probe(tmp_path, FASTCL_NATIVE="jit")
    assert lines["STATUS"].startswith("True jit cache")


def test_disabled_native_gives_no_warning(tmp_path):
    lines, stderr = _probe(tmp_path, FASTCL_NATIVE="0")
    assert lines["STATUS"].startswith("False") and "FASTCL_NATIVE=0" in lines["STATUS"]
    assert "the native CPU extension is unavailable" not in stderr
    assert lines["AUTO"] == "chunked" and float(lines["ERR"]) < 1e-12
