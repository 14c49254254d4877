"""The one pass for reduced losses (backward strategy "one_pass": the dispatch entries
whose forward forms the gradients, ``torch.ops.fastcl.infonce_fwd_grad`` on CPU and the
Triton launcher of fastcl/ops/infonce_one_pass.py): the native operator and the Triton
kernels against the float64 reference for every option at ragged sizes, gradcheck, the
rule that picks the strategy (fastcl.backends), retain_graph and repeated backward, the
recomputing path where the one pass does not apply, memory, opcheck and torch.compile.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from fastcl import info_nce, nt_xent, nt_xent_reference
from fastcl.backends import choose_strategy, one_pass_applies
from fastcl.ops import function, operators
from fastcl.ops.configs import ONE_PASS_MIN_ROWS, ONE_PASS_STRIP_FLOOR, one_pass_cpu_blocks
from fastcl.ops.dispatch import GRADIENTS_IN_FORWARD, Kernels
from fastcl.ops.layout import ColumnLayout
from fastcl.plan import LossOptions, kernel_plan

from .helpers import (
    NATIVE, OPCHECK_VARIANTS, Case, assert_close, assert_deterministic_across_threads, cpu_tiles,
    gradcheck_info_nce, needs_native, opcheck_grid, operator_args, operator_inputs, relative_error, run_both,
)
from .test_memory import _peak_cpu_bytes

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="Triton's interpreter (on a GPU these run compiled in test_at_scale)")


@pytest.fixture
def count_paths(monkeypatch):
    """Counts the forwards of the dispatch entries that ran: "one_pass" for an entry that
    forms the gradients in its forward (``backward`` None), "recompute" for the others."""
    counts = {"one_pass": 0, "recompute": 0}
    lookup = function.kernels

    def counted(device_type, backend, strategy):
        entry = lookup(device_type, backend, strategy)
        name = "one_pass" if entry.backward is None else "recompute"
        assert (strategy in GRADIENTS_IN_FORWARD) == (name == "one_pass"), (device_type, backend, strategy)

        def forward(*args, **kwargs):
            counts[name] += 1
            return entry.forward(*args, **kwargs)

        return Kernels(forward, entry.backward)

    monkeypatch.setattr(function, "kernels", counted)
    return counts


# ---------------------------------------------------------------- against the reference

# Every option of the column layout on reduced losses, ragged against every block size.
CASES = {
    "plain": Case(n=37, d=24),
    "everything": Case(n=41, d=19, hard=True, hard_weight=2.0, n_extra=7, gaussian=5, gaussian_weight=0.5,
                       labels=True, learnable_tau=True),
    "symmetric_sum": Case(n=33, d=20, symmetric=True, hard=True, hard_weight=0.7, n_extra=3, learnable_tau=True,
                          reduction="sum"),
    "unnormalized": Case(n=31, d=9, normalize=False, temperature=3.0, hard=True, hard_weight=3.0, labels=True),
    "extra_only_tau": Case(n=29, d=16, n_extra=40, temperature=0.2, learnable_tau=True),
}


@needs_native
@pytest.mark.parametrize("tiles", [None, (5, 7), (16, 64)], ids=["default", "tiles5x7", "tiles16x64"])
@pytest.mark.parametrize("name", list(CASES))
def test_native_matches_reference(name, tiles, monkeypatch, count_paths):
    cpu_tiles(monkeypatch, tiles)
    ours, ref = run_both(CASES[name], "native", "cpu")
    assert_close(ours, ref, 1e-10, name)
    assert count_paths["one_pass"] > 0 and count_paths["recompute"] == 0


@needs_native
@pytest.mark.parametrize("products", ["aten", "onednn"])
def test_native_real_size_fp32_matches_reference(products):
    # fp32 at a size with many chunks and tiles, with each library's block products
    # (the choice is made once per process: a fresh process per library).
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from tests.helpers import Case, run_both, relative_error\n"
        "ours, ref = run_both(Case(n=1500, d=200, hard=True, hard_weight=1.5, n_extra=77, labels=True,"
        " learnable_tau=True), 'native', 'cpu', dtype=torch.float32)\n"
        "print(max(relative_error(ours[k], ref[k]) for k in ref))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FASTCL_CPU_PRODUCTS=products, PYTHONPATH=root)
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[-1]) < 1e-5


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_native_half_inputs(dtype):
    case = CASES["everything"].but(n=200, d=40)
    ours, ref = run_both(case, "native", "cpu", dtype=dtype)
    assert_close(ours, ref, 2e-2, str(dtype))
    for name in ("anchors", "positives", "hard_negatives"):
        assert ours[name].dtype == dtype, "gradients keep the input dtype"
    assert ours["loss"].dtype == torch.float32


@needs_interpreter
@pytest.mark.parametrize("workspace_rows", [0, 8], ids=["one_chunk", "chunks_of_8"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name, workspace_rows, monkeypatch, count_paths):
    case = CASES[name]
    if workspace_rows:  # several chunks: W and dS of 8 rows (fp64: 16 bytes a logit)
        monkeypatch.setenv("FASTCL_WORKSPACE_BYTES", str(workspace_rows * 16 * (case.n_cols + case.gaussian)))
    ours, ref = run_both(case, "triton", "cpu")
    assert_close(ours, ref, 1e-10, name)
    assert count_paths["one_pass"] > 0 and count_paths["recompute"] == 0


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_other_dtypes(dtype, count_paths):
    ours, ref = run_both(CASES["everything"], "triton", "cpu", dtype=dtype)
    assert_close(ours, ref, 1e-5 if dtype == torch.float32 else 2e-2, str(dtype))
    assert ours["anchors"].dtype == dtype
    # "auto" takes the one pass for both at this size (bf16 up to 2^28 logits: see
    # test_rule_takes_the_one_pass_for_reduced_losses_with_gradients).
    assert count_paths["one_pass"] > 0 and count_paths["recompute"] == 0


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["everything", "plain"])
def test_triton_one_pass_in_16_bits(name, dtype, count_paths, monkeypatch):
    # Asked for, the one pass takes 16-bit inputs (bf16: its dS holds every factor;
    # fp16: dq's and dk's operands apart, scaled into range) and is as accurate as the
    # recomputing backwards on the same inputs.
    monkeypatch.setenv("FASTCL_BACKWARD", "one_pass")
    ours, ref = run_both(CASES[name], "triton", "cpu", dtype=dtype)
    assert count_paths["one_pass"] > 0 and count_paths["recompute"] == 0
    assert_close(ours, ref, 2e-2, name)
    assert ours["anchors"].dtype == dtype


@pytest.mark.parametrize("backend", [NATIVE, pytest.param("triton", marks=needs_interpreter)])
def test_rows_below_eps_take_eps_exactly_in_float64(backend, count_paths):
    # Rows whose norm eps clamps are scaled by 1 / eps: eps = 0.1 has no float32 value,
    # so a kernel that took it as a 32-bit scalar would be off by 1.5e-8.
    g = torch.Generator().manual_seed(4)
    a, p, h = (torch.randn(21, 7, dtype=torch.float64, generator=g) for _ in range(3))
    a[3] *= 0.01
    a[5] = 0.0
    p[2] *= 0.003
    h[7] *= 0.02
    options = dict(eps=0.1, hard_negative_weight=1.5, temperature=0.3)
    ours = _loss_and_grads(lambda *x: info_nce(*x, backend=backend, **options), [a, p, h])
    ref = _loss_and_grads(lambda *x: info_nce(*x, backend="reference", **options), [a, p, h])
    for o, r in zip(ours, ref):
        assert relative_error(o, r) < 1e-12
    assert count_paths == {"one_pass": 1, "recompute": 0}


def _loss_and_grads(fn, leaves):
    leaves = [x.clone().requires_grad_() for x in leaves]
    loss = fn(*leaves)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves))


BACKENDS = [NATIVE, pytest.param("triton", marks=needs_interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_and_nt_xent(backend, monkeypatch, count_paths):
    # Masked columns: other groups' keys (blocks without a common group skipped) and
    # NT-Xent's self column. On Triton the rule keeps groups on the slab path; forced here.
    if backend == "native":
        cpu_tiles(monkeypatch, (16, 16))
    g = torch.Generator().manual_seed(5)
    n, d = 67, 12
    a, p, h = (torch.randn(n, d, dtype=torch.float64, generator=g) for _ in range(3))
    queue = torch.randn(9, d, dtype=torch.float64, generator=g)
    groups = torch.repeat_interleave(torch.arange(n), torch.randint(1, 9, (n,), generator=g))[:n]
    options = dict(hard_negative_weight=2.0, temperature=0.1, groups=groups, symmetric=True)
    ours = _loss_and_grads(lambda *x: info_nce(*x, queue, backend=backend, backward_strategy="one_pass", **options),
                           [a, p, h])
    ref = _loss_and_grads(lambda *x: info_nce(*x, queue, backend="reference", **options), [a, p, h])
    for o, r in zip(ours, ref):
        assert relative_error(o, r) < 1e-10
    ours = _loss_and_grads(lambda x, y: nt_xent(x, y, temperature=0.2, backend=backend, backward_strategy="one_pass"),
                           [a, p])
    ref = _loss_and_grads(lambda x, y: nt_xent_reference(x, y, temperature=0.2), [a, p])
    for o, r in zip(ours, ref):
        assert relative_error(o, r) < 1e-10
    assert count_paths["one_pass"] == 3 and count_paths["recompute"] == 0


@needs_native
def test_native_skips_blocks_without_a_common_group(monkeypatch, count_paths):
    # Sorted groups of 8 rows, 8 x 8 blocks: only the diagonal blocks hold candidates. A
    # planted NaN in a row of another group must not reach a skipped block's gradient
    # (a masked block multiplied out would give 0 * NaN = NaN).
    cpu_tiles(monkeypatch, (8, 8))
    n, d = 64, 6
    a, p = (torch.randn(n, d, dtype=torch.float64) for _ in range(2))
    groups = torch.arange(n) // 8
    ours = _loss_and_grads(lambda x, y: info_nce(x, y, groups=groups, backend="native"), [a, p])
    ref = _loss_and_grads(lambda x, y: info_nce(x, y, groups=groups, backend="reference"), [a, p])
    for o, r in zip(ours, ref):
        assert relative_error(o, r) < 1e-12
    assert count_paths == {"one_pass": 1, "recompute": 0}
    poisoned = p.clone()
    poisoned[8] = float("nan")  # group 1
    loss, da, dp = _loss_and_grads(lambda x, y: info_nce(x, y, groups=groups, backend="native", check_finite=False),
                                   [a, poisoned])
    assert count_paths == {"one_pass": 2, "recompute": 0}
    assert loss.isnan()
    others = groups != 1
    assert torch.isnan(da[~others]).all() and torch.isnan(dp[8]).all()
    assert relative_error(da[others], ref[1][others]) < 1e-12 and relative_error(dp[others], ref[2][others]) < 1e-12


# ------------------------------------------------------------------------ gradcheck

GRAD_N, GRAD_D = 13, 3


GRAD_CASES = {
    "hard_tau_gauss": dict(hard_negative_weight=2.0, gaussian_negatives=3, gaussian_weight=0.5, hard=True,
                           learnable_tau=True),
    "symmetric_sum": dict(symmetric=True, reduction="sum", learnable_tau=True),
    "clamped_norms": dict(eps=1.5, hard_negative_weight=0.5, hard=True),
}


@needs_native
@pytest.mark.parametrize("tiles", [None, (4, 5)], ids=["one_block", "many_blocks"])
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_native(name, tiles, monkeypatch):
    cpu_tiles(monkeypatch, tiles)
    gradcheck_info_nce("native", GRAD_N, GRAD_D, temperature=0.4, n_extra=4, **GRAD_CASES[name])


@needs_interpreter
@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_triton(name):
    gradcheck_info_nce("triton", 6, GRAD_D, temperature=0.4, n_extra=4, **GRAD_CASES[name])  # interpreted: seconds


# ------------------------------------------------------------------------- the rule

BIG = dict(n_rows=4096, n_cols=4096, n_grad_cols=4096, dim=768)


def _x(n_rows, dim, dtype=torch.float32, device="cpu"):
    """Queries of a shape without their memory (the rule reads shape, dtype and device)."""
    if device == "cuda":  # no CUDA tensor without a GPU: what the rule reads of one
        return SimpleNamespace(shape=(n_rows, dim), dtype=dtype, device=torch.device("cuda"))
    return torch.empty((), dtype=dtype).expand(n_rows, dim)


def _applies(backend="cpp", n_rows=4096, n_cols=4096, n_grad_cols=4096, dim=768, dtype=torch.float32, device="cpu",
             grouped=False, needs_grad=True):
    return one_pass_applies(backend, _x(n_rows, dim, dtype, device), grouped, needs_grad, n_cols, n_grad_cols)


def _strategy(strategy="auto", backend="cpp", n_rows=4096, n_cols=4096, n_grad_cols=4096, dim=768,
              dtype=torch.float32, device="cpu", grouped=False, reduced=True, needs_grad=True):
    return choose_strategy(strategy, backend, _x(n_rows, dim, dtype, device), grouped, reduced, needs_grad, n_cols,
                           n_grad_cols)


def _kernel_plan(needs_grad=True, **options):
    options.setdefault("backend", "cpp")  # "auto" takes Triton's interpreter under TRITON_INTERPRET=1
    layout = ColumnLayout(n_cols=4096, n_grad_cols=4096)
    return kernel_plan(LossOptions(**options).checked(), layout, _x(4096, 768), 4096 * 4096, needs_grad=needs_grad)


@pytest.fixture
def two_threads(monkeypatch):
    """The rule as on two threads (it sizes the native blocks by the thread count)."""
    for name in ("FASTCL_BACKWARD", "FASTCL_CPU_TILE_ROWS", "FASTCL_CPU_TILE_COLS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)


@needs_native
def test_rule_takes_the_one_pass_for_reduced_losses_with_gradients(monkeypatch, two_threads):
    assert _applies() and one_pass_cpu_blocks(4096, 4096, 4096, 768, 2, False) == (256, 512)
    assert _kernel_plan().backward == "one_pass" and _kernel_plan().backend == "cpp"
    assert _kernel_plan(backend="auto").backward == "one_pass"
    assert _kernel_plan(reduction="sum").backward == "one_pass"
    assert _kernel_plan(backend="native").backward == "one_pass"
    assert _strategy(backend="triton") == "one_pass"  # on CPU tensors: the interpreter
    assert _strategy(backend="triton", device="cuda", dtype=torch.float64) == "one_pass"
    # Where it does not apply: per-row losses, no gradient, the chunked and dense paths.
    assert _kernel_plan(reduction="none").backward == "workspace"
    assert _kernel_plan(needs_grad=False).backward == "workspace"
    assert not _applies(needs_grad=False)
    assert _kernel_plan(backend="torch").backward == "workspace"
    assert _kernel_plan(backend="chunked").backward == "workspace"
    assert _kernel_plan(backend="reference") is None and _kernel_plan(backend="dense") is None
    # On Triton: groups stay on the slab backward; fp16 on a recomputing backward, bf16
    # too above 2^28 logits (where the GPU measured it slower), unless forced.
    assert _strategy(backend="triton", device="cuda", grouped=True) == "slab"
    assert _strategy("one_pass", backend="triton", device="cuda", grouped=True) == "one_pass"
    assert _strategy(backend="triton", dtype=torch.float16) != "one_pass"
    assert _strategy(backend="triton", device="cuda", dtype=torch.bfloat16, n_rows=16384, n_cols=16384) == "one_pass"
    assert _strategy(backend="triton", device="cuda", dtype=torch.bfloat16, n_rows=16384, n_cols=32768) != "one_pass"
    for dtype in (torch.float16, torch.bfloat16):
        assert _strategy("one_pass", backend="triton", dtype=dtype, n_rows=65536, n_cols=65536) == "one_pass"
    # Forcing never applies it where it cannot: per-row losses, the chunked path.
    with pytest.raises(ValueError, match="reduction='none'"):
        _strategy("one_pass", reduced=False)
    with pytest.raises(ValueError, match="not offered"):
        _kernel_plan(backend="chunked", backward_strategy="one_pass")
    with pytest.raises(ValueError, match="reduction"):
        info_nce(torch.randn(4, 3), torch.randn(4, 3), reduction="none", backward_strategy="one_pass")
    # The environment: FASTCL_BACKWARD=one_pass forces it where "auto" would not (groups
    # on Triton, too few rows per native chunk), never where it cannot; a recomputing
    # strategy's name keeps every backend off it.
    monkeypatch.setenv("FASTCL_BACKWARD", "one_pass")
    assert _strategy(backend="triton", device="cuda", grouped=True) == "one_pass"
    assert _strategy(n_cols=1 << 24, n_grad_cols=4096, dim=16) == "one_pass"
    assert _strategy(reduced=False) == "workspace"
    assert _strategy(needs_grad=False) == "workspace"
    assert _strategy(backend="triton", dtype=torch.bfloat16) == "one_pass"
    assert _strategy(backend="triton", dtype=torch.float16) == "one_pass"
    monkeypatch.setenv("FASTCL_BACKWARD", "slab")
    assert not _applies() and _strategy() == "workspace"
    monkeypatch.setenv("FASTCL_BACKWARD", "workspace")
    assert not _applies(backend="triton") and _strategy(backend="triton") == "workspace"


def test_rule_bounds_the_strips_by_the_gradients(monkeypatch, two_threads):
    # At least one chunk per thread, at most 256 rows.
    assert one_pass_cpu_blocks(300, 300, 300, 768, 2, False) == (150, 512)
    assert one_pass_cpu_blocks(4096, 4096, 4096, 768, 1, False) == (256, 512)
    for n, m, d, threads in [(2048, 2048, 16, 2), (8192, 8192, 16, 2), (4096, 12288, 64, 4), (1000, 1000, 128, 1),
                             (65536, 65536, 768, 2)]:
        rows, _ = one_pass_cpu_blocks(n, m, n, d, threads, False)
        strips = threads * rows * (m + d)
        assert strips <= max(threads * ONE_PASS_STRIP_FLOOR, (n + n) * d), (n, m, d, threads, rows)
    # Groups: small blocks, strips of the visited tiles only.
    assert one_pass_cpu_blocks(10000, 10000, 10000, 64, 2, True) == (64, 64)
    # Too few rows within the budget: the recomputing path.
    assert one_pass_cpu_blocks(4096, 1 << 24, 4096, 16, 2, False)[0] < ONE_PASS_MIN_ROWS
    assert not _applies(n_cols=1 << 24, dim=16)
    assert _strategy(n_cols=1 << 24, dim=16) == "workspace"
    cpu_tiles(monkeypatch, (7, 9))
    assert one_pass_cpu_blocks(4096, 4096, 4096, 768, 2, False) == (7, 9)
    assert _applies(n_cols=1 << 24, dim=16)  # blocks set by hand: taken as given
    monkeypatch.setenv("FASTCL_CPU_TILE_ROWS", "zero")
    with pytest.raises(ValueError, match="FASTCL_CPU_TILE_ROWS"):
        one_pass_cpu_blocks(4096, 4096, 4096, 768, 2, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_without_a_reduced_gradient_take_the_recomputing_path(backend, count_paths):
    a, p = (torch.randn(40, 8, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        no_grad = info_nce(a.requires_grad_(), p, backend=backend)
    assert count_paths == {"one_pass": 0, "recompute": 1}
    constants = info_nce(a.detach(), p, backend=backend)
    assert count_paths == {"one_pass": 0, "recompute": 2}
    rows = info_nce(a, p, backend=backend, reduction="none")
    assert count_paths == {"one_pass": 0, "recompute": 3}
    reduced = info_nce(a, p, backend=backend)
    assert count_paths == {"one_pass": 1, "recompute": 3}
    for value in (no_grad, constants, rows.mean()):
        assert relative_error(value, reduced.detach()) < 1e-12


# ---------------------------------------------------- backward: scaling, retain_graph


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_scales_and_keeps_saved_gradients_for_retained_graphs(backend):
    g = torch.Generator().manual_seed(2)
    a, p, h = (torch.randn(45, 10, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    leaves = [a, p, h, tau]
    ref = torch.autograd.grad(info_nce(a, p, h, temperature=tau, backend="reference"), leaves)

    # An incoming gradient other than 1 scales every gradient, temperature included.
    loss = info_nce(a, p, h, temperature=tau, backend=backend)
    for got, want in zip(torch.autograd.grad(loss * 3.0, leaves), ref):
        assert relative_error(got, 3.0 * want) < 1e-12

    # Retained: every backward sees the same saved gradients, even when a caller changes
    # what an earlier backward returned.
    loss = info_nce(a, p, h, temperature=tau, backend=backend)
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    for x in first:
        x.mul_(-7.0)
    second = torch.autograd.grad(loss, leaves, retain_graph=True)
    third = torch.autograd.grad(loss * 0.5, leaves)
    for got2, got3, want in zip(second, third, ref):
        assert relative_error(got2, want) < 1e-12 and relative_error(got3, 0.5 * want) < 1e-12

    # .backward() twice accumulates into .grad.
    loss = info_nce(a, p, h, temperature=tau, backend=backend)
    loss.backward(retain_graph=True)
    loss.backward()
    for x, want in zip(leaves, ref):
        assert relative_error(x.grad, 2 * want) < 1e-12
    with pytest.raises(RuntimeError):  # the graph is freed: as for any autograd graph
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_gradients_asked_for(backend):
    a = torch.randn(30, 6, dtype=torch.float64, requires_grad=True)
    p = torch.randn(30, 6, dtype=torch.float64)
    ref = torch.autograd.grad(info_nce(a, p, backend="reference"), [a])[0]
    (got,) = torch.autograd.grad(info_nce(a, p, backend=backend), [a])
    assert relative_error(got, ref) < 1e-12
    b = torch.randn(30, 6, dtype=torch.float64)
    q = p.clone().requires_grad_()
    ref = torch.autograd.grad(info_nce(b, q, backend="reference", symmetric=True), [q])[0]
    (got,) = torch.autograd.grad(info_nce(b, q, backend=backend, symmetric=True), [q])
    assert relative_error(got, ref) < 1e-12
    # No second-order gradients: an error, as for the recomputing path.
    loss = info_nce(a, p, backend=backend)
    (g,) = torch.autograd.grad(loss, [a], create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        g.sum().backward()


@needs_native
def test_native_is_deterministic_across_runs_and_thread_counts(monkeypatch):
    assert_deterministic_across_threads(monkeypatch, 600, 48, (32, 96), "one_pass")


# --------------------------------------------------------------------------- memory


@needs_native
@pytest.mark.parametrize("n, d", [(2048, 16), (1024, 128), (512, 768)])
def test_native_memory_stays_within_twice_the_recomputing_path(n, d, monkeypatch, count_paths):
    monkeypatch.delenv("FASTCL_CPU_TILE_ROWS", raising=False)
    monkeypatch.delenv("FASTCL_CPU_TILE_COLS", raising=False)
    a, p, h = (torch.randn(n, d, requires_grad=True) for _ in range(3))

    def step(strategy):
        def run():
            info_nce(a, p, h, backend="native", backward_strategy=strategy).backward()
            for x in (a, p, h):
                x.grad = None

        return run

    ours = _peak_cpu_bytes(step("one_pass"))
    assert count_paths == {"one_pass": 2, "recompute": 0}
    recompute = _peak_cpu_bytes(step("workspace"))
    assert count_paths == {"one_pass": 2, "recompute": 2}
    gradients = 3 * n * d * 4
    assert ours <= 2 * recompute, f"one pass {ours} bytes, recomputing path {recompute}"
    logits = n * 2 * n * 4
    assert ours < max(logits // 4, 4 * gradients), f"one pass {ours} bytes next to N x M = {logits}"


@needs_interpreter
def test_triton_workspace_stays_within_its_cap(monkeypatch):
    from fastcl.ops.infonce_one_pass import one_pass_rows

    monkeypatch.setenv("FASTCL_WORKSPACE_BYTES", str(1 << 20))
    rows = one_pass_rows(65536, 65536, 2, 4)
    assert rows * 65536 * 6 <= 1 << 20 and rows >= 1
    assert one_pass_rows(100, 50, 4, 4) == 100
    assert one_pass_rows(100, 50, 4, 4, chunk_rows=7) == 7


# ------------------------------------------------------------ the operator: opcheck


def _op_args(q, k, params, tgt, layout, groups, need_dq=True, need_dk=True, weight=0.25, blocks=(0, 0)):
    return operator_args(q, k, params, tgt, layout, groups, weight, need_dq, need_dk, *blocks)


@opcheck_grid
def test_opcheck(variant, need_dq, need_dk, normalize_eps):
    inputs = operator_inputs(*OPCHECK_VARIANTS[variant])
    torch.library.opcheck(torch.ops.fastcl.infonce_fwd_grad.default,
                          (*_op_args(*inputs, need_dq, need_dk, blocks=(7, 9)), normalize_eps))


@needs_native
@pytest.mark.parametrize("normalize_eps", [None, 0.5])
@pytest.mark.parametrize("variant", list(OPCHECK_VARIANTS))
def test_operator_equals_forward_then_backward(variant, normalize_eps):
    # The one-pass operator returns what the two recomputing operators return for
    # grad_rows = row_weight: the per-row losses, dq, dk and the temperature's row sums.
    q, k, params, tgt, layout, groups = operator_inputs(*OPCHECK_VARIANTS[variant], n=57)
    loss_rows, dq, dk, row_dot = torch.ops.fastcl.infonce_fwd_grad(
        *_op_args(q, k, params, tgt, layout, groups, blocks=(8, 11)), normalize_eps)
    lse, target_logit = operators.operator_forward(q, k, params, tgt, layout, groups=groups,
                                                   normalize_eps=normalize_eps)
    grad_rows = torch.full_like(lse, 0.25)
    dq_ref, dk_ref, row_dot_ref = operators.operator_backward(q, k, params, tgt, layout, lse, grad_rows,
                                                              groups=groups, normalize_eps=normalize_eps)
    acc = lse.dtype
    assert loss_rows.dtype == dq.dtype == dk.dtype == row_dot.dtype == acc
    tol = 1e-12 if acc == torch.float64 else 1e-5
    assert relative_error(loss_rows, lse - target_logit) < tol
    for got, want in ((dq, dq_ref), (dk, dk_ref), (row_dot, row_dot_ref)):
        assert relative_error(got, want.to(acc)) < (tol if q.dtype in (torch.float32, torch.float64) else 1e-2)


@needs_native
@pytest.mark.parametrize("mutation, message", [
    (dict(weight=float("inf")), "row_weight must be finite"),
    (dict(blocks=(-1, 0)), "block_rows and block_cols must be >= 0"),
])
def test_operator_rejects_bad_arguments(mutation, message):
    inputs = operator_inputs(torch.float32, False, False, False)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastcl.infonce_fwd_grad(*_op_args(*inputs, **mutation))


@needs_native
def test_operators_accept_an_empty_hard_segment_past_the_columns():
    # fastcl.distributed's gathered loss on rank 1 without hard negatives: hard_start =
    # N_global + offset lies past the N_global columns, and n_hard is 0. The operators
    # rejected it ("hard-negative columns [24, 24) fall outside the 16 columns").
    q, _, params, _, _, _ = operator_inputs(torch.float64, False, False, False, n=8)
    k = torch.randn(16, q.shape[1], dtype=torch.float64)
    layout = ColumnLayout(n_cols=16, n_grad_cols=16, hard_start=24, n_hard=0, gauss_start=16)
    targets = torch.arange(8, 16)
    lse, target_logit = operators.operator_forward(q, k, params, targets, layout)
    loss_rows, dq, dk, _ = torch.ops.fastcl.infonce_fwd_grad(*_op_args(q, k, params, targets, layout, None, weight=0.5))
    assert relative_error(loss_rows, lse - target_logit) < 1e-12
    dq_ref, dk_ref, _ = operators.operator_backward(q, k, params, targets, layout, lse, torch.full_like(lse, 0.5))
    assert relative_error(dq, dq_ref) < 1e-12 and relative_error(dk, dk_ref) < 1e-12
    # The dispatch entry's wrapper: row gradients of 1, its blocks from the rule.
    loss_rows, dq, dk, _ = operators.operator_forward_grad(q, k, params, targets, layout)
    dq_ref, dk_ref, _ = operators.operator_backward(q, k, params, targets, layout, lse, torch.ones_like(lse))
    assert relative_error(dq, dq_ref) < 1e-12 and relative_error(dk, dk_ref) < 1e-12


@needs_interpreter
@needs_native
def test_cuda_kernel_of_the_operator_matches_the_cpu_kernel():
    # On CUDA tensors the operator runs the Triton launcher; the interpreter runs that
    # same function on CPU tensors, checked here against the native kernel.
    from fastcl.ops.infonce_one_pass import infonce_forward_grad

    q, k, params, tgt, layout, groups = operator_inputs(torch.float64, True, True, True, n=29)
    cpu = torch.ops.fastcl.infonce_fwd_grad(*_op_args(q, k, params, tgt, layout, None, weight=0.5), 0.375)
    tri = infonce_forward_grad(q, k, params, tgt, layout, 0.5, normalize_eps=0.375, chunk_rows=10)
    for got, want in zip(tri, cpu):
        assert relative_error(got, want) < 1e-12


# ---------------------------------------------------------------------- torch.compile


@needs_native
def test_compiled_step_takes_the_one_pass_and_matches_eager(trace_backward):
    import re

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, y, h = (torch.randn(300, 24, dtype=torch.float64, generator=g) for _ in range(3))
    tau = torch.nn.Parameter(torch.tensor(0.07, dtype=torch.float64))

    def make():
        torch.manual_seed(0)
        return torch.nn.Linear(24, 24, dtype=torch.float64)

    def step(encoder):
        def run(x, y, h):
            loss = info_nce(encoder(x), encoder(y), encoder(h), temperature=tau, hard_negative_weight=2.0,
                            symmetric=True, backend="auto")
            loss.backward()
            return loss.detach()

        return run

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager_model, compiled_model = make(), make()
    eager_loss = step(eager_model)(x, y, h)
    eager_grads = [p.grad.clone() for p in eager_model.parameters()] + [tau.grad.clone()]
    tau.grad = None
    compiled_loss = torch.compile(step(compiled_model), fullgraph=True, backend=capture)(x, y, h)
    compiled_grads = [p.grad for p in compiled_model.parameters()] + [tau.grad]
    assert relative_error(compiled_loss, eager_loss) < 1e-12
    for got, want in zip(compiled_grads, eager_grads):
        assert relative_error(got, want) < 1e-12
    code = "\n".join(m.code for gm in graphs for m in gm.modules() if hasattr(m, "code"))
    assert set(re.findall(r"torch\.ops\.fastcl\.(\w+)", code)) == {"infonce_fwd_grad"}


# ------------------------------------------------------------------ compiled for sm_90a


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="Triton's bundled ptxas is a Linux binary")
def test_one_pass_kernels_compile_for_sm90_without_spills():
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from fastcl.ops.compile_report import ONE_PASS_KERNELS, compile_one, _config\n"
        "for kernel in ONE_PASS_KERNELS:\n"
        "    for dtype, precision in [(torch.bfloat16, 'ieee'), (torch.float32, 'tf32'), (torch.float64, 'ieee')]:\n"
        "        for features in ('plain', 'all'):\n"
        "            r = compile_one(kernel, dtype, precision, features, _config(kernel, dtype, 768, features))\n"
        "            print(kernel, r.variant, r.registers, r.spill_bytes, len(r.problems()))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert len(lines) == 18, result.stdout
    for kernel, variant, regs, spills, problems in lines:
        assert int(spills) == 0 and int(problems) == 0, f"{kernel} {variant}: {regs} registers, {spills} spilled"
        if kernel == "one_pass_grads" and variant.endswith("plain"):
            assert int(regs) <= 96, f"{kernel} {variant}: {regs} registers for a bandwidth-bound pass"
