"""MoCo in the training step (tiny BERT, float64): the key encoder encodes the positives
and hard negatives without gradient, the queue adds negatives, ``after_step`` does the
EMA update and enqueues this step's positive keys in order; with gradient caching and
dropout on, the step's loss and gradients equal those of one autograd graph."""

import copy

import pytest
import torch

from fastcl import info_nce
from fastcl.train.step import LossConfig, MoCo, _flat, _views, compute_gradients, contrastive_loss

from .test_train_step import SENTENCES, assert_same_grads, batch_of, encoder, grads


def _encode(module, batch, views):
    """Rows of ``views`` of ``batch`` encoded in one call: (B, V', D)."""
    part = _views(batch, views, mlm=False)
    n, v = part["input_ids"].shape[:2]
    with torch.no_grad():
        return module(**_flat(part, slice(None), "cpu"))[0].view(n, v, -1)


def test_moco_step_ema_and_queue_order():
    """Dropout off, so every embedding can be recomputed: step 1 (pairs, empty queue),
    an SGD step, after_step; step 2 (triplets: hard negatives are keys too) against the
    queue; after_step again, the queue of 5 drops its oldest key."""
    model = encoder(dropout=0.0, pooler="cls", mlp="auto")
    moco = MoCo(model, queue_size=5, momentum=0.75, dim=32)
    assert moco.queue.queue.dtype == torch.float64 and len(moco.queue) == 0
    assert all(not p.requires_grad for p in moco.parameters())
    cfg = LossConfig(temperature=0.1, hard_negative_weight=2.0)

    b1 = batch_of([(SENTENCES[i], SENTENCES[i + 1]) for i in range(3)])
    k1 = _encode(model, b1, slice(1, 2))[:, 0]  # the key encoder is still an exact copy
    out = compute_gradients(model, b1, cfg, moco=moco)
    torch.testing.assert_close(moco.pending, k1, rtol=0, atol=0)
    anchors = _encode(model, b1, slice(0, 1))[:, 0]
    assert out["loss"] == pytest.approx(float(info_nce(anchors, k1, temperature=0.1)), rel=1e-12)
    assert all(p.grad is None for p in moco.parameters())  # keys get no gradient
    assert len(grads(model)) > 10

    k0 = {n: p.clone() for n, p in moco.key_encoder.encoder.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    q1 = dict(model.named_parameters())
    moco.after_step(model)
    moved = 0
    for name, p in moco.key_encoder.encoder.named_parameters():
        torch.testing.assert_close(p, 0.75 * k0[name] + 0.25 * q1[name].detach(), rtol=1e-14, atol=1e-15)
        moved += int(not torch.equal(p, k0[name]))
    assert moved > 10
    assert moco.pending is None and torch.equal(moco.queue.keys(), k1)

    # Step 2: triplets; keys from the updated key encoder, the queue as extra negatives.
    b2 = batch_of([(SENTENCES[i], SENTENCES[i + 3], SENTENCES[(i + 6) % 10]) for i in range(3)])
    k2 = _encode(moco.key_encoder, b2, slice(1, 3))
    reference = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    out = compute_gradients(model, b2, cfg, moco=moco)
    q = reference(**_flat(_views(b2, slice(0, 1), mlm=False), slice(None), "cpu"))[0]
    ref_loss = info_nce(q, k2[:, 0], k2[:, 1], k1, temperature=0.1, hard_negative_weight=2.0)
    ref_loss.backward()
    assert out["loss"] == pytest.approx(ref_loss.item(), rel=1e-12)
    assert_same_grads(grads(model), grads(reference))
    moco.after_step(model)
    assert torch.equal(moco.queue.keys(), torch.cat([k1[1:], k2[:, 0]]))  # 6 keys into 5: the oldest left


def test_moco_gradient_caching_with_dropout_equals_one_graph():
    """Chunks of 2 with dropout on, hard negatives, Gaussian negatives and a filled queue:
    the cached step equals one autograd graph that draws the same dropout masks (keys
    chunk by chunk first, then the anchors chunk by chunk, as the cached step's first
    pass does)."""
    rows = [(SENTENCES[i], SENTENCES[(i + 2) % 10], SENTENCES[(i + 5) % 10]) for i in range(5)]
    batch = batch_of(rows)
    cfg = LossConfig(hard_negative_weight=2.0, gaussian_negatives=3)
    cached_model, plain_model = encoder(pooler="cls", mlp="auto"), encoder(pooler="cls", mlp="auto")
    cached_moco = MoCo(cached_model, queue_size=4, momentum=0.9, dim=32)
    cached_moco.queue.enqueue(torch.randn(4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    plain_moco = copy.deepcopy(cached_moco)

    torch.manual_seed(5)
    n, chunk = len(rows), 2
    key_part, query_part = _views(batch, slice(1, None), mlm=False), _views(batch, slice(0, 1), mlm=False)
    keys = torch.cat([plain_moco.key_encoder(**_flat(key_part, slice(i, min(i + chunk, n)), "cpu"))[0].view(-1, 2, 32)
                      for i in range(0, n, chunk)])
    anchors = torch.cat([plain_model(**_flat(query_part, slice(i, min(i + chunk, n)), "cpu"))[0].view(-1, 1, 32)
                         for i in range(0, n, chunk)])
    loss = contrastive_loss(torch.cat([anchors, keys], dim=1), cfg, torch.Generator().manual_seed(9), False,
                            plain_moco.negatives())
    loss.backward()

    torch.manual_seed(5)
    out = compute_gradients(cached_model, batch, cfg, chunk_size=chunk, generator=torch.Generator().manual_seed(9),
                            moco=cached_moco)
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(cached_moco.pending, keys[:, 0], rtol=0, atol=0)
    assert_same_grads(grads(cached_model), grads(plain_model))


def test_moco_with_mlm_on_the_anchors_chunked_equals_one_pass():
    """Dropout off: MLM runs on the anchors' sentences only (the query encoder's inputs),
    averaged over their masked tokens; the chunked step equals the plain one."""
    batch = batch_of([(SENTENCES[i], SENTENCES[i + 1]) for i in range(6)], mlm=True)
    cfg = LossConfig(mlm_weight=0.1)
    one, cached = encoder(dropout=0.0, do_mlm=True), encoder(dropout=0.0, do_mlm=True)
    moco_one, moco_cached = MoCo(one, 8, 0.9, dim=32), MoCo(cached, 8, 0.9, dim=32)
    a = compute_gradients(one, batch, cfg, moco=moco_one)
    b = compute_gradients(cached, batch, cfg, chunk_size=4, moco=moco_cached)
    query_part = _views(batch, slice(0, 1), mlm=True)
    with torch.no_grad():
        _, mlm_sum, count = encoder(dropout=0.0, do_mlm=True)(**_flat(query_part, slice(None), "cpu"))
    assert count == int((batch["mlm_labels"][:, 0] != -100).sum()) > 0
    assert a["mlm_loss"] == pytest.approx(float(mlm_sum) / count, rel=1e-12)
    assert b["mlm_loss"] == pytest.approx(a["mlm_loss"], rel=1e-10) and b["loss"] == pytest.approx(a["loss"], rel=1e-10)
    assert "mlm_head.bias" in grads(one)
    assert_same_grads(grads(cached), grads(one), rtol=1e-8, atol=1e-12)
