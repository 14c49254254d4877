"""Negatives gathered across ranks give the global-batch loss and its gradients.

Real process groups: gloo on CPU, 2 and 3 processes (3 with unequal local batches).
"""

import pytest
import torch
import torch.multiprocessing as mp

from fastcl import info_nce
from fastcl.distributed import all_gather_with_grad, gathered_info_nce

from .helpers import free_port, gloo_group

D = 6


def _global_inputs(sizes, hard, k=None):
    """Anchors, positives (and hard negatives: N x D, or N x k x D)."""
    g = torch.Generator().manual_seed(0)
    n = sum(sizes)
    rows = [torch.randn(n, D, dtype=torch.float64, generator=g) for _ in range(2)]
    rows[1] = rows[1] + 1.5 * rows[0]  # positives closer than chance: the margin drops some, not all
    if hard:
        rows.append(torch.randn(n, *((k,) if k else ()), D, dtype=torch.float64, generator=g))
    return rows


def _global_guide(sizes, k, rows):
    """A guide's rows for the anchors, the positives and the hard negatives (noisy copies
    of the rows, of another width) and one threshold per anchor that drops some entries."""
    g = torch.Generator().manual_seed(1)
    project = torch.randn(D, D + 2, dtype=torch.float64, generator=g)
    guide = [x @ project + 0.5 * torch.randn(*x.shape[:-1], D + 2, dtype=torch.float64, generator=g) for x in rows]
    positive = torch.nn.functional.cosine_similarity(guide[0], guide[1], dim=-1)
    return guide, positive - 0.4


def _candidates(guide):
    """The guide's candidate rows, in the candidates' order [positives; hard blocks]."""
    hard = guide[2:]
    blocks = [hard[0]] if hard and hard[0].dim() == 2 else list(hard[0].unbind(1)) if hard else []
    return torch.cat([guide[1], *blocks])


def _guide_keywords(guide, threshold, rows=slice(None)) -> dict:
    return dict(guide_anchors=guide[0][rows], guide_candidates=_candidates([g[rows] for g in guide]),
                guide_threshold=threshold[rows])


def _worker(rank, world, port, sizes, options, backend, results):
    with gloo_group(rank, world, port):
        hard = options.get("hard", False)
        start = sum(sizes[:rank])
        rows = _global_inputs(sizes, hard, options.get("k"))
        local = [x[start:start + sizes[rank]].clone().requires_grad_() for x in rows]
        kwargs = {k: v for k, v in options.items() if k not in ("hard", "k", "guide")}
        if options.get("guide"):
            kwargs.update(_guide_keywords(*_global_guide(sizes, options.get("k"), rows),
                                          slice(start, start + sizes[rank])))
        loss = gathered_info_nce(local[0], local[1], local[2] if hard else None, backend=backend, **kwargs)
        loss.backward()
        results[rank] = (loss.detach(), [x.grad for x in local])


def _run(world, sizes, options, backend="torch"):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world, free_port(), sizes, options, backend, results), nprocs=world, join=True)
    return dict(results)


@pytest.mark.parametrize(
    "world, sizes, options, backend",
    [
        (2, [9, 9], dict(), "torch"),
        (2, [9, 9], dict(hard=True, hard_negative_weight=2.0, symmetric=True, temperature=0.1), "torch"),
        (3, [5, 8, 4], dict(hard=True, hard_negative_weight=0.5), "torch"),
        (2, [7, 10], dict(hard=True, hard_negative_weight=3.0), "triton"),
        (3, [5, 8, 4], dict(hard=True, k=3, hard_negative_weight=2.0, temperature=0.1, false_negative_margin=0.1,
                            directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
                            hardness_mode="all_negatives", hardness_strength=2.0), "torch"),
        (2, [6, 9], dict(hard=True, k=2, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
                         hardness_mode="in_batch_negatives", hardness_strength=1.0), "torch"),
        (2, [6, 7], dict(hard=True, k=2, directions=("query_to_doc", "query_to_query", "doc_to_doc"),
                         doc_to_doc_negatives=False), "torch"),
        (3, [5, 8, 4], dict(hard=True, k=2, guide=True, temperature=0.1,
                            directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")), "torch"),
        (2, [6, 9], dict(hard=True, guide=True, directions=("query_to_doc", "doc_to_query"),
                         partition_mode="per_direction"), "torch"),
        (2, [7, 10], dict(hard=True, guide=True), "triton"),
    ],
    ids=["plain-2", "sup-sym-2", "unequal-3", "triton-2", "family-unequal-3", "family-per-direction-2",
         "doc-to-doc-positives-2", "guide-family-unequal-3", "guide-symmetric-2", "guide-triton-2"],
)
def test_gathered_loss_equals_single_process(world, sizes, options, backend):
    results = _run(world, sizes, options, backend)
    hard = options.get("hard", False)
    rows = _global_inputs(sizes, hard, options.get("k"))
    full = [x.clone().requires_grad_() for x in rows]
    kwargs = {k: v for k, v in options.items() if k not in ("hard", "k", "guide")}
    if options.get("guide"):
        kwargs.update(_guide_keywords(*_global_guide(sizes, options.get("k"), rows)))
        unguided = info_nce(*full[:2], full[2] if hard else None, backend="reference",
                            **{k: v for k, v in kwargs.items() if not k.startswith("guide")})
        # The guide drops entries: without it the loss differs.
        assert abs(unguided.item() - info_nce(*full[:2], full[2] if hard else None, **kwargs).item()) > 1e-6
    reference = info_nce(full[0], full[1], full[2] if hard else None, backend="reference", **kwargs)
    reference.backward()

    n_global = sum(sizes)
    # Each rank returns (W / N_global) * its local sum: the ranks' values average to the loss.
    total = sum(results[r][0] for r in range(world)) / world
    torch.testing.assert_close(total, reference.detach(), rtol=1e-10, atol=1e-12)
    for r in range(world):
        start = sum(sizes[:r])
        for grad, ref_input in zip(results[r][1], full):
            # DDP averages over W ranks: each rank's gradient / W is the global gradient.
            torch.testing.assert_close(grad / world, ref_input.grad[start:start + sizes[r]], rtol=1e-9, atol=1e-12)
    assert n_global == full[0].shape[0]


def test_gather_anchors_false_refuses_doc_to_query():
    a, p = _global_inputs([4], False)
    with gloo_group(0, 1, free_port()):
        with pytest.raises(ValueError, match="gather_anchors=False with doc_to_query"):
            gathered_info_nce(a, p, symmetric=True, gather_anchors=False)
        # Without doc_to_query it runs; on one rank the anchors are every rank's anyway.
        both = [gathered_info_nce(a, p, directions=("query_to_doc", "query_to_query"), gather_anchors=g)
                for g in (False, True)]
        torch.testing.assert_close(both[0], both[1])


def _gather_worker(rank, world, port, results):
    with gloo_group(rank, world, port):
        x = torch.full((rank + 1, 2), float(rank), requires_grad=True)
        gathered = all_gather_with_grad(x)
        (gathered * torch.arange(1, gathered.shape[0] + 1)[:, None]).sum().backward()
        results[rank] = (gathered.detach(), x.grad)


def test_all_gather_with_grad_orders_rows_and_sums_gradients():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_gather_worker, args=(2, free_port(), results), nprocs=2, join=True)
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for rank in range(2):
        assert torch.equal(results[rank][0], expected)
    # Row weights 1, 2, 3 on both ranks; each rank's rows get the sum over both ranks.
    assert torch.equal(results[0][1], torch.full((1, 2), 2.0))
    assert torch.equal(results[1][1], torch.tensor([[4.0, 4.0], [6.0, 6.0]]))
