"""Shared test helpers: cases of the loss's options, and comparison with the reference."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist
from torch.autograd import gradcheck

from fastcl import draw_gaussian_negatives, info_nce, info_nce_reference, native
from fastcl.backends import choose_backend, choose_strategy
from fastcl.ops import operators
from fastcl.ops.dispatch import kernels
from fastcl.ops.layout import ColumnLayout


@dataclass(frozen=True)
class Case:
    """One combination of the loss's options, at one size."""

    n: int = 37
    d: int = 24
    hard: bool = False
    hard_weight: float = 1.0
    n_extra: int = 0
    gaussian: int = 0
    gaussian_weight: float = 1.0
    labels: bool = False
    symmetric: bool = False
    reduction: str = "mean"
    learnable_tau: bool = False
    normalize: bool = True
    temperature: float = 0.05

    def but(self, **changes) -> "Case":
        return replace(self, **changes)

    @property
    def n_cols(self) -> int:
        return self.n * (2 if self.hard else 1) + self.n_extra


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf (NaN never passes)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    scale = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / scale if scale > 0 else diff


def assert_close(ours: dict, ref: dict, tol: float, what: str = "") -> None:
    """``ours`` and ``ref`` (name -> tensor, as :func:`run_both` returns them) hold the
    same names, each within relative error ``tol``."""
    assert ours.keys() == ref.keys()
    for name in ref:
        err = relative_error(ours[name], ref[name])
        assert err <= tol, f"{what} {name}: relative error {err:.3g} > {tol:g}"


def make_inputs(case: Case, device, seed: int = 0) -> dict:
    """float64 inputs of a case (the reference's precision); cast for other dtypes."""
    g = torch.Generator().manual_seed(seed)

    def rand(rows):
        # Unit-scale rows with a spread of norms, so normalization matters.
        x = torch.randn(rows, case.d, generator=g, dtype=torch.float64)
        return (x * (0.5 + torch.rand(rows, 1, generator=g, dtype=torch.float64))).to(device)

    inputs = {"anchors": rand(case.n), "positives": rand(case.n)}
    inputs["hard_negatives"] = rand(case.n) if case.hard else None
    inputs["extra_negatives"] = rand(case.n_extra) if case.n_extra else None
    inputs["labels"] = (torch.randint(0, case.n_cols, (case.n,), generator=g).to(device)
                        if case.labels else None)
    return inputs


def run_both(case: Case, backend: str, device, dtype=torch.float64, seed: int = 0):
    """Loss and gradients of fastcl (``dtype``, ``backend``) and of the float64 reference
    on the same inputs. Returns two dicts name -> tensor ("loss", "anchors", ...)."""
    inputs = make_inputs(case, device, seed)
    weights = torch.randn(case.n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)

    def run(fn, cast, gaussian_arg):
        leaves = {k: v.to(cast).requires_grad_() for k, v in inputs.items()
                  if k in ("anchors", "positives", "hard_negatives") and v is not None}
        tau = (torch.tensor(case.temperature, dtype=torch.float64, device=device).requires_grad_()
               if case.learnable_tau else case.temperature)
        extra = inputs["extra_negatives"].to(cast) if inputs["extra_negatives"] is not None else None
        loss = fn(leaves["anchors"], leaves["positives"], leaves.get("hard_negatives"), extra,
                  temperature=tau, hard_negative_weight=case.hard_weight, gaussian_weight=case.gaussian_weight,
                  labels=inputs["labels"], symmetric=case.symmetric, reduction=case.reduction,
                  normalize=case.normalize, **gaussian_arg)
        objective = (loss.double() * weights).sum() if case.reduction == "none" else loss.double()
        wrt = list(leaves.values()) + ([tau] if case.learnable_tau else [])
        grads = torch.autograd.grad(objective, wrt)
        result = {"loss": loss.detach()}
        result.update({name: grad for name, grad in zip(list(leaves) + ["temperature"], grads)})
        return result

    gen = lambda: torch.Generator(device=device).manual_seed(seed + 2)  # noqa: E731
    ours = run(lambda *a, **k: info_nce(*a, backend=backend, **k), dtype,
               {"gaussian_negatives": case.gaussian, "generator": gen()} if case.gaussian else {})
    # Drawn exactly as fastcl draws them for this dtype, then compared in float64.
    gaussian = (draw_gaussian_negatives(case.gaussian, case.d, dtype, device, gen()).double()
                if case.gaussian else None)
    ref = run(lambda a, p, h, e, **k: info_nce_reference(a, p, h, e, gaussian, **k), torch.float64, {})
    return ours, ref


#: Whether the C++ extension must be there (CI sets FASTCL_REQUIRE_NATIVE=1): tests that
#: need it then fail without it instead of being skipped.
NATIVE_REQUIRED = os.environ.get("FASTCL_REQUIRE_NATIVE") == "1"
#: Marks a test that needs the C++ extension (see NATIVE_REQUIRED).
needs_native = pytest.mark.skipif(not native.available() and not NATIVE_REQUIRED,
                                  reason=f"native extension unavailable: {native.status().reason}")
#: The "native" backend as a pytest parameter, under needs_native.
NATIVE = pytest.param("native", marks=needs_native)


def kernel_pair(backend: str, device: torch.device = torch.device("cpu"), dtype=torch.float64, dim: int = 8):
    """The (forward, backward) kernels that ``backend`` (any name info_nce takes, "auto"
    strategy) runs on ``device`` for per-row losses, as the dispatch table holds them
    (a strategy that forms the gradients in the forward has no backward of its own)."""
    name = choose_backend(backend, device, 1 << 30)
    strategy = choose_strategy("auto", name, torch.empty(0, dim, dtype=dtype, device=device), reduced=False)
    return kernels(device.type, name, strategy)


def check_groups_stay_apart(backend: str, device=torch.device("cpu"), dtype=torch.float64) -> None:
    """48 rows in groups of 16 (aligned with 16-row tiles or chunks), a NaN candidate in
    group 1 and a NaN anchor in group 2, values unchecked: group 0's losses and gradients
    stay finite only if its rows never visit a block of another group (0 * NaN in a
    gradient product), and group 1's losses are NaN (its candidate is)."""
    groups = (torch.arange(48) // 16).to(device)
    a, p = (torch.randn(48, 8, dtype=dtype, device=device).requires_grad_() for _ in range(2))
    with torch.no_grad():
        p[20] = float("nan")   # a positive (candidate) of group 1
        a[40] = float("nan")   # an anchor (query) of group 2
    out = info_nce(a, p, groups=groups, backend=backend, reduction="none", check_finite=False)
    out.sum().backward()
    assert torch.isfinite(out[:16]).all() and torch.isnan(out[16:32]).all()
    assert torch.isfinite(a.grad[:16]).all(), "the dq pass visited a block of another group"
    assert torch.isfinite(p.grad[:16]).all(), "the dk pass visited a block of another group"


def cpu_tiles(monkeypatch, tiles: tuple[int, int] | None) -> None:
    """The native CPU kernels' blocks, ``tiles`` = (rows, columns), for this test (None:
    the kernels' own choice)."""
    if tiles is not None:
        monkeypatch.setenv("FASTCL_CPU_TILE_ROWS", str(tiles[0]))
        monkeypatch.setenv("FASTCL_CPU_TILE_COLS", str(tiles[1]))


def assert_deterministic_across_threads(monkeypatch, n: int, d: int, tiles: tuple[int, int],
                                        backward_strategy: str) -> None:
    """The native backend's gradients (``n`` x ``d`` rows with weighted hard negatives,
    CPU tiles of ``tiles`` rows x columns) agree bit for bit over repeated runs and over
    1 and 2 threads: the kernels add every tile's blocks in a fixed order, whatever the
    scheduling."""
    cpu_tiles(monkeypatch, tiles)
    a, p, h = (torch.randn(n, d) for _ in range(3))

    def grads():
        leaves = [x.clone().requires_grad_() for x in (a, p, h)]
        info_nce(*leaves, hard_negative_weight=2.0, backend="native", backward_strategy=backward_strategy).backward()
        return [x.grad for x in leaves]

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first, second = grads(), grads()
        torch.set_num_threads(1)
        single = grads()
    finally:
        torch.set_num_threads(previous)
    for x, y, z in zip(first, second, single):
        assert torch.equal(x, y) and torch.equal(x, z)


def gradcheck_info_nce(backend: str, n: int, d: int, *, hard: bool = False, learnable_tau: bool = False,
                       temperature: float = 0.3, n_extra: int = 0, labels: bool = False, **options) -> None:
    """torch.autograd.gradcheck of :func:`fastcl.info_nce` on ``backend``, float64 rows
    ``n`` x ``d``, with respect to the anchors, the positives, the hard negatives
    (``hard``) and the temperature (``learnable_tau``); ``n_extra`` extra negatives,
    random ``labels``, the same Gaussian draws at every call, ``options`` as given."""
    g = torch.Generator().manual_seed(0)

    def leaf(rows):
        return torch.randn(rows, d, dtype=torch.float64, generator=g).requires_grad_()

    inputs = [leaf(n), leaf(n)] + ([leaf(n)] if hard else [])
    if learnable_tau:
        inputs.append(torch.tensor(temperature, dtype=torch.float64, requires_grad=True))
    queue = torch.randn(n_extra, d, dtype=torch.float64, generator=g) if n_extra else None
    targets = torch.randint(0, n * (2 if hard else 1) + n_extra, (n,), generator=g) if labels else None

    def loss(*args):
        h = args[2] if hard else None
        tau = args[-1] if learnable_tau else temperature
        generator = torch.Generator().manual_seed(0)  # the same Gaussian draws every call
        return info_nce(args[0], args[1], h, queue, temperature=tau, generator=generator, labels=targets,
                        backend=backend, **options)

    assert gradcheck(loss, inputs, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=False)


# ------------------------------------------------------------------ the operators' arguments


def operator_inputs(dtype, hard: bool, gaussian: bool, with_targets: bool, exclude_self: bool = False,
                    grouped: bool = False, *, n: int = 23, d: int = 10, scale: float = 2.5, unit: bool = False):
    """``(q, k, params, targets, layout, groups)`` for the operators ``torch.ops.fastcl.*``:
    ``n`` queries against ``[n positives; n hard negatives if hard; 5 extra; 4 Gaussian if
    gaussian]``, in ``dtype``, with the temperature's inverse ``scale`` (``unit``: rows of
    norm 1). ``with_targets``: random targets (outside the masked self columns); without
    them a row whose own column is masked (``exclude_self``) targets the next row's, and
    with ``grouped`` (three random groups) every row targets its own positive."""
    g = torch.Generator().manual_seed(1)
    n_hard, n_extra, n_gauss = (n if hard else 0), 5, (4 if gaussian else 0)
    n_cols = n + n_hard + n_extra + n_gauss
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    k = torch.randn(n_cols, d, generator=g, dtype=torch.float64)
    if unit:
        q, k = torch.nn.functional.normalize(q), torch.nn.functional.normalize(k)
    q, k = q.to(dtype), k.to(dtype)
    layout = ColumnLayout(n_cols=n_cols, n_grad_cols=n + n_hard, hard_start=n, n_hard=n_hard,
                          gauss_start=n + n_hard + n_extra, log_hard_weight=0.4 if hard else 0.0,
                          log_gauss_weight=-0.2 if gaussian else 0.0, n_self=n if exclude_self else 0)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    params = torch.tensor([scale, layout.log_hard_weight, layout.log_gauss_weight], dtype=acc)
    targets = torch.randint(n if exclude_self else -1, n_cols, (n,), generator=g) if with_targets else None
    if exclude_self and targets is None:  # a row's own column is masked: target the next row
        targets = (torch.arange(n) + 1) % n
    groups = None
    if grouped:
        row_groups = torch.randint(0, 3, (n,), generator=g)
        groups = (row_groups, torch.cat([row_groups, row_groups]) if hard else row_groups)
        if targets is None:  # each row's own positive is in its own group
            targets = torch.arange(n)
    return q, k, params, targets, layout, groups


#: Arguments of :func:`operator_inputs` that torch.library.opcheck runs the operators on.
OPCHECK_VARIANTS = {
    "plain_fp32": (torch.float32, False, False, False),
    "everything_fp64": (torch.float64, True, True, True),
    "hard_targets_bf16": (torch.bfloat16, True, False, True),
    "gauss_fp16": (torch.float16, False, True, False),
    "self_excluded_fp64": (torch.float64, False, False, False, True),
    "groups_hard_fp32": (torch.float32, True, True, False, False, True),
}


def opcheck_grid(test):
    """Runs ``test(variant, need_dq, need_dk, normalize_eps)`` (a gradient operator's
    torch.library.opcheck) on every :data:`OPCHECK_VARIANTS` entry, each pair of gradients
    asked for, with the rows as given and normalized in the kernel; needs the extension."""
    for mark in (pytest.mark.parametrize("normalize_eps", [None, 1e-12], ids=["raw", "fused_normalize"]),
                 pytest.mark.parametrize("need_dq, need_dk", [(True, True), (True, False), (False, True)]),
                 pytest.mark.parametrize("variant", list(OPCHECK_VARIANTS)), needs_native):
        test = mark(test)
    return test


def operator_args(q, k, params, targets, layout: ColumnLayout, groups, *own) -> tuple:
    """The positional arguments of an operator: the schema takes the layout's first
    fields and the groups pair as two optional tensors, then the operator's ``own``."""
    return (q, k, params, targets, *layout[:operators.N_LAYOUT_FIELDS],
            *(groups if groups is not None else (None, None)), *own)


# ------------------------------------------------------------------ process groups


def free_port() -> int:
    """A TCP port on localhost that is free now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """Inside the block, this process is rank ``rank`` of a gloo process group of
    ``world`` processes on localhost (the workers that ``mp.spawn`` starts)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
