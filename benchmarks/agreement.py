"""Agreement with float64: the reference of one size, and one call's errors against it.

The reference is the family's dense form in float64 where a few of its logit matrices
fit in memory (``--ref-dense-max-gib``), else fastcl's chunked PyTorch backend in
float64, and none above ``--ref-max-flops`` of work (the case is then "unchecked"). It
is computed once per size, on first use, and kept on the host.
"""

from __future__ import annotations

import math
import os
import time

from harness import first_line, is_oom, relative_error, tolerances
from internals import CHUNK_ENV, environment


class Reference:
    """The float64 loss and gradients of one size's inputs."""

    def __init__(self, run, spec, inputs):
        self.run, self.spec, self.inputs = run, spec, inputs
        self.done = False
        self.loss = self.grads = self.name = self.skip_reason = None
        self.seconds = 0.0

    def get(self):
        if not self.done:
            self.done = True
            self._compute()
        return self

    def _compute(self):
        import torch

        run, spec, dev = self.run, self.spec, self.run.dev
        dense_bytes = 4 * run.family.dense_logits(spec) * 8  # a few fp64 logit matrices
        if run.args.ref_dense_max_gib is not None:
            budget = int(run.args.ref_dense_max_gib * 2**30)
        else:
            budget = (torch.cuda.mem_get_info(spec.device)[0] // 3) if dev.cuda else 2 * 2**30
        dense = dense_bytes <= budget
        work = (run.family.reference_flops or (lambda s, _: run.family.flops(s)))(spec, dense)
        if work > run.args.ref_max_flops:
            self.skip_reason = (f"no reference: its work {work:.2e} FLOPs is over --ref-max-flops "
                                f"{run.args.ref_max_flops:.1e}")
            return
        x64 = tuple(t.detach().to(torch.float64).requires_grad_() for t in self.inputs)
        t0 = time.perf_counter()
        # on CUDA, larger chunks than fastcl's default: fewer, larger fp64 products
        chunk = str(min(1 << 27, max(1 << 22, budget // 32))) if dev.cuda else os.environ.get(CHUNK_ENV)
        try:
            with environment(**{CHUNK_ENV: chunk}):
                result = None
                if dense:
                    try:
                        result = self._run(x64, True)
                    except Exception as exc:
                        if not is_oom(exc):
                            raise
                        dev.cleanup()
                self.name, self.loss, self.grads = result or self._run(x64, False)
            dev.sync()
        except Exception as exc:  # an OOM here must not end the run
            self.skip_reason = f"reference failed: {first_line(exc)}"
            self.loss = self.grads = None
        finally:
            del x64
            dev.cleanup()
        self.seconds = time.perf_counter() - t0

    def _run(self, x64, dense: bool):
        import torch

        name, loss = self.run.family.reference(self.spec, x64, dense)
        grads = torch.autograd.grad(loss, x64)
        return name, float(loss.detach()), [g.detach().cpu() for g in grads]


def agreement(loss, grads, reference: Reference, dtype_name: str, tf32: bool, names) -> dict:
    """Relative errors of one call's loss and gradients (named ``names``) against the
    reference, and whether they are within the dtype's tolerance."""
    ref = reference.get()
    if ref.loss is None:
        return {"checked": False, "reason": ref.skip_reason}
    tol = tolerances(dtype_name, tf32)
    value = float(loss.detach())
    loss_err = abs(value - ref.loss) / max(abs(ref.loss), 1e-30) if math.isfinite(value) else math.inf
    grad_err = {name: relative_error(g, r) for name, g, r in zip(names, grads, ref.grads)}
    worst = max(grad_err.values())
    ok = loss_err <= tol["loss"] and worst <= tol["grad"]
    bad = ([f"loss {loss_err:.2e} > {tol['loss']:.0e}"] if not loss_err <= tol["loss"] else []) + \
          [f"d{name} {err:.2e} > {tol['grad']:.0e}" for name, err in grad_err.items() if not err <= tol["grad"]]
    return {"checked": True, "reference": ref.name, "reference_loss": ref.loss, "reference_s": round(ref.seconds, 3),
            "loss": value, "loss_rel_err": loss_err, "grad_rel_err": grad_err, "max_grad_rel_err": worst,
            "tolerance": tol, "ok": ok, "summary": None if ok else "disagrees with the reference: " + ", ".join(bad)}
