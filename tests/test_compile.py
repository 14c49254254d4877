"""torch.compile(fullgraph=True) over a training step that calls InfoNCELoss, and
torch.export of a module that calls it, on CPU: no graph break, and the same loss and
gradients as eager.

On CPU the compiled graph holds the native operators (torch.ops.fastcl.*) as opaque
calls, so these tests need the extension; like tests/test_native.py they are skipped
without it, except in CI (FASTCL_REQUIRE_NATIVE=1). fullgraph=True turns any graph break
into an error, so a pass means one graph.
"""

import os
import re

import pytest
import torch
from torch import nn

from fastcl import InfoNCELoss, native

from .helpers import relative_error

pytestmark = pytest.mark.skipif(not native.available() and os.environ.get("FASTCL_REQUIRE_NATIVE") != "1",
                                reason=f"native extension unavailable: {native.status().reason}")

N, D, Q = 300, 24, 17  # 300 x 600+ logits: above the dense-reference threshold of "auto"

OPTION_SETS = {
    # Supervised SimCSE with every extra: weighted hard negatives, a queue, seeded
    # Gaussian negatives (weighted), and a learnable temperature.
    "everything": dict(hard_negative_weight=2.0, gaussian_negatives=8, gaussian_weight=0.5, seed=3,
                       learnable_tau=True, hard=True, queue=True),
    "symmetric": dict(symmetric=True, learnable_tau=True),
    "labels_none": dict(labels=True, reduction="none", hard=True, queue=True),
    "global_rng_gaussian": dict(gaussian_negatives=5, hard=True),
    # The per-entry rules the native kernels compute: the hardness penalty and the
    # false-negative margin, whose thresholds reach the operators as a tensor argument.
    "hardness_margin": dict(hardness_mode="in_batch_negatives", hardness_strength=2.0, false_negative_margin=0.1,
                            learnable_tau=True, hard=True, queue=True),
}


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y, h = (torch.randn(N, D, dtype=torch.float64, generator=g) for _ in range(3))
    queue = torch.randn(Q, D, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 2 * N + Q, (N,), generator=g)
    weights = torch.rand(N, dtype=torch.float64, generator=g)
    return x, y, h, queue, labels, weights


class Trainer(nn.Module):
    """An encoder and the loss, as a training script holds them."""

    def __init__(self, options: dict, backend: str):
        super().__init__()
        options = dict(options)
        self.hard, self.queue = options.pop("hard", False), options.pop("queue", False)
        self.labels = options.pop("labels", False)
        torch.manual_seed(0)
        self.encoder = nn.Linear(D, D, dtype=torch.float64)
        tau = nn.Parameter(torch.tensor(0.07, dtype=torch.float64)) if options.pop("learnable_tau", False) else 0.07
        self.loss_fn = InfoNCELoss(tau, backend=backend, **options)

    def forward(self, x, y, h, queue, labels, weights):
        loss = self.loss_fn(self.encoder(x), self.encoder(y), self.encoder(h) if self.hard else None,
                            queue if self.queue else None, labels if self.labels else None)
        return (loss * weights).sum() if loss.dim() else loss


def _training_step(model: Trainer):
    def step(*inputs):
        loss = model(*inputs)
        loss.backward()
        return loss.detach()

    return step


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _run_steps(step, model, n_steps=2):
    results = []
    for i in range(n_steps):
        model.zero_grad(set_to_none=True)
        loss = step(*_inputs(seed=i))
        results.append((loss, _grads(model)))
    return results


def _compiled_step(model, trace_backward, backend):
    if trace_backward:
        return torch.compile(_training_step(model), fullgraph=True, backend=backend)
    forward = torch.compile(model, fullgraph=True, backend=backend)
    return _training_step(forward)


def _assert_same(eager, compiled, tol=1e-12):
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled):
        assert relative_error(loss_c, loss_e) < tol
        assert grads_e.keys() == grads_c.keys()
        for name in grads_e:
            assert relative_error(grads_c[name], grads_e[name]) < tol, name


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_compiled_training_step_matches_eager(name, trace_backward):
    torch._dynamo.reset()
    eager_model = Trainer(OPTION_SETS[name], backend="native")
    compiled_model = Trainer(OPTION_SETS[name], backend="auto")  # "auto" takes the operator under compile
    torch.manual_seed(123)  # the global generator feeds "global_rng_gaussian"
    eager = _run_steps(_training_step(eager_model), eager_model)
    torch.manual_seed(123)
    compiled = _run_steps(_compiled_step(compiled_model, trace_backward, "aot_eager"), compiled_model)
    # Two steps: the second shows the Gaussian generator advancing exactly as in eager.
    _assert_same(eager, compiled)


def test_inductor_training_step_matches_eager(trace_backward):
    # The default backend (Inductor) on the fullest option set.
    torch._dynamo.reset()
    eager_model = Trainer(OPTION_SETS["everything"], backend="native")
    compiled_model = Trainer(OPTION_SETS["everything"], backend="auto")
    eager = _run_steps(_training_step(eager_model), eager_model)
    compiled = _run_steps(_compiled_step(compiled_model, trace_backward, "inductor"), compiled_model)
    _assert_same(eager, compiled, tol=1e-10)


def test_compiled_graph_holds_the_operators(trace_backward):
    torch._dynamo.reset()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = Trainer(OPTION_SETS["everything"], backend="auto")
    _compiled_step(model, trace_backward, capture)(*_inputs())
    assert len(graphs) == 1
    code = "\n".join(m.code for m in graphs[0].modules() if hasattr(m, "code"))
    ops = set(re.findall(r"torch\.ops\.fastcl\.(\w+)", code))
    # A mean loss takes the one pass: one operator forms the loss and its gradients.
    expected = {"infonce_fwd_grad", "gaussian_negatives"}
    assert expected <= ops, ops


@pytest.mark.parametrize("name", ["everything", "symmetric", "labels_none"])
def test_export_matches_eager(name):
    exported_model = Trainer(OPTION_SETS[name], backend="auto")
    eager_model = Trainer(OPTION_SETS[name], backend="native")
    inputs = _inputs()
    program = torch.export.export(exported_model, inputs)
    assert "fastcl.infonce_fwd." in str(program.graph)  # the forward alone, not the one pass
    exported_model.loss_fn.generator = None  # exporting drew nothing; start both from the seed
    with torch.no_grad():
        for seed in range(2):
            inputs = _inputs(seed)
            ours = program.module()(*inputs)
            ref = eager_model(*inputs)
            assert relative_error(ours, ref) < 1e-12
