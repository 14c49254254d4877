"""Shared test helpers: cases of the loss's options, and comparison with the reference."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, replace

import pytest
import torch
import torch.distributed as dist

from fastcl import draw_gaussian_negatives, info_nce, info_nce_reference, native
from fastcl.ops.dispatch import kernels
from fastcl.backends import choose_backend, choose_strategy


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


#: The "native" backend as a pytest parameter: skipped when the C++ extension is not
#: built, except in CI (FASTCL_REQUIRE_NATIVE=1), where a missing extension must fail.
NATIVE = pytest.param("native", marks=pytest.mark.skipif(
    not native.available() and os.environ.get("FASTCL_REQUIRE_NATIVE") != "1",
    reason=f"native extension unavailable: {native.status().reason}"))


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
