"""Every loss option, run once on small inputs and compared with the float64 oracle.

One entry of :data:`OPTIONS` per way of calling the loss that reaches a different kernel
variant (hard negatives with a weight, labels, extra and Gaussian negatives, a learnable
temperature, the symmetric direction, raw dot products, groups, NT-Xent, the guide mask). The GPU
runner's first stage launches each on the GPU (compiling every kernel), and the NaN
canary tests run each in Triton's interpreter; both call :func:`check` with a backend
and compare against ``backend="reference"`` on float64 copies of the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from harness import make_inputs, relative_error, tolerances


@dataclass(frozen=True)
class Option:
    name: str
    call: Callable  # (inputs: dict, backend: str) -> scalar loss
    uses: tuple[str, ...]  # the inputs that get a gradient


def _gaussian(t):
    return torch.Generator(device=t["a"].device).manual_seed(1)


OPTIONS = {o.name: o for o in [
    Option("plain", lambda t, b: _info_nce(t, b), ("a", "p")),
    Option("hard", lambda t, b: _info_nce(t, b, t["h"], hard_negative_weight=2.0), ("a", "p", "h")),
    Option("labels", lambda t, b: _info_nce(t, b, t["h"], labels=t["labels"]), ("a", "p", "h")),
    Option("extra+gaussian", lambda t, b: _info_nce(t, b, extra_negatives=t["x"], gaussian_negatives=5,
                                                    gaussian_weight=0.7, generator=_gaussian(t)), ("a", "p")),
    Option("symmetric+tau", lambda t, b: _info_nce(t, b, symmetric=True, temperature=t["tau"]), ("a", "p", "tau")),
    Option("raw", lambda t, b: _info_nce(t, b, t["h"], normalize=False, temperature=0.5), ("a", "p", "h")),
    Option("groups", lambda t, b: _info_nce(t, b, groups=t["groups"]), ("a", "p")),
    Option("groups+hard", lambda t, b: _info_nce(t, b, t["h"], groups=t["groups"]), ("a", "p", "h")),
    Option("nt_xent", lambda t, b: __import__("fastcl").nt_xent(t["a"], t["p"], backend=b), ("a", "p")),
    # The guide mask (GISTEmbed, DCLR): a second model's rows decide which entries drop.
    Option("guide+hard", lambda t, b: _info_nce(t, b, t["h"], guide_anchors=t["ga"], guide_candidates=t["gc"],
                                                guide_threshold=0.2), ("a", "p", "h")),
]}


def _info_nce(t, backend, hard=None, **options):
    import fastcl

    return fastcl.info_nce(t["a"], t["p"], hard, backend=backend, **options)


def make_case_inputs(n: int, d: int, dtype, device, seed: int = 0) -> dict:
    """Inputs of every option at one size: rows a, p, h (n x d), extra negatives x
    (about n / 3 rows), labels among the n + n columns of [p; h], ragged sorted groups,
    a temperature tensor and a guide's rows ga, gc (fp32, for a and for [p; h])."""
    a, p, h = make_inputs(n, d, dtype, device, hard=True, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(max(n // 3, 1), d, generator=gen) / d ** 0.5).to(dtype).to(device)
    labels = torch.randint(0, 2 * n, (n,), generator=gen).to(device)
    lengths = torch.randint(1, 13, (n,), generator=gen)
    groups = torch.repeat_interleave(torch.arange(n), lengths)[:n].to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tau = torch.tensor(0.07, dtype=acc, device=device, requires_grad=True)
    # A guide model's rows (width 24) for the anchors and for the columns [p; h].
    ga, gc = (torch.randn(rows, 24, generator=gen).to(device) for rows in (n, 2 * n))
    return {"a": a, "p": p, "h": h, "x": x, "labels": labels, "groups": groups, "tau": tau, "ga": ga, "gc": gc}


def _loss_and_grads(option: Option, inputs: dict, backend: str):
    loss = option.call(inputs, backend)
    grads = torch.autograd.grad(loss, [inputs[k] for k in option.uses])
    return loss.detach(), dict(zip(option.uses, grads))


def check(option: Option, n: int, d: int, dtype, device, backend: str = "triton", tf32: bool = False) -> dict:
    """One forward + backward of ``option`` against the float64 oracle on the same
    inputs: relative errors of the loss and of each gradient, and whether every one is
    finite and within the dtype's tolerance."""
    inputs = make_case_inputs(n, d, dtype, device)
    loss, grads = _loss_and_grads(option, inputs, backend)
    x64 = {k: (v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v)
           for k, v in inputs.items()}
    ref_loss, ref_grads = _loss_and_grads(option, x64, "reference")
    errors = {"loss": relative_error(loss.reshape(1), ref_loss.reshape(1))}
    errors.update({k: relative_error(grads[k], ref_grads[k]) for k in option.uses})
    tol = tolerances(str(dtype).removeprefix("torch."), tf32)
    ok = errors["loss"] <= tol["loss"] and all(errors[k] <= tol["grad"] for k in option.uses)
    return {"errors": errors, "tolerance": tol, "ok": ok}
