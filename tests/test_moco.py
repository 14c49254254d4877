"""MoCo pieces: the momentum encoder's EMA and the key queue's order, wrap-around, state
and its all-ranks enqueue under torch.distributed (gloo, 2 processes)."""


import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fastcl import info_nce
from fastcl.moco import KeyQueue, MomentumEncoder

from .helpers import free_port, gloo_group


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.norm(self.linear(x))


def _set(module, weight, bias):
    with torch.no_grad():
        module.linear.weight.copy_(torch.tensor(weight))
        module.linear.bias.copy_(torch.tensor(bias))


def test_momentum_encoder_ema_exact_values():
    query = _Encoder()
    _set(query, [[1.0, 2.0], [3.0, 4.0]], [0.5, -0.5])
    key = MomentumEncoder(query, momentum=0.75)
    # Starts as an exact copy, with no gradient.
    assert torch.equal(key.encoder.linear.weight, query.linear.weight)
    assert all(not p.requires_grad for p in key.parameters())
    assert key.encoder.linear.weight.data_ptr() != query.linear.weight.data_ptr()

    _set(query, [[5.0, 6.0], [7.0, 8.0]], [1.5, 2.5])
    key.update(query)
    # k = 0.75 k + 0.25 q, exact in binary floating point for these values.
    assert torch.equal(key.encoder.linear.weight, torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    assert torch.equal(key.encoder.linear.bias, torch.tensor([0.75, 0.25]))
    _set(query, [[2.0, 3.0], [4.0, 5.0]], [0.75, 0.25])
    key.update(query)  # the query now equals the key: a fixed point
    assert torch.equal(key.encoder.linear.weight, torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    _set(query, [[6.0, 7.0], [8.0, 9.0]], [0.0, 0.0])
    key.update(query)
    assert torch.equal(key.encoder.linear.weight, torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
    assert torch.equal(key.encoder.linear.bias, torch.tensor([0.5625, 0.1875]))


def test_momentum_encoder_matches_the_formula_on_random_weights_and_copies_buffers():
    torch.manual_seed(0)
    query = _Encoder()
    key = MomentumEncoder(query, momentum=0.9)
    k0 = {n: p.clone() for n, p in key.encoder.named_parameters()}
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))
    query(torch.randn(8, 2))  # updates the query's batch-norm running statistics
    key.update(query)
    for name, p in key.encoder.named_parameters():
        # In float64, then compared at fp32 rounding (the update may fuse its multiply-add).
        expected = k0[name].double() * 0.9 + dict(query.named_parameters())[name].detach().double() * 0.1
        torch.testing.assert_close(p.double(), expected, rtol=2e-7, atol=1e-7)
        assert not torch.equal(p, k0[name])
    for name, b in key.encoder.named_buffers():
        assert torch.equal(b, dict(query.named_buffers())[name])
    assert int(key.encoder.norm.num_batches_tracked) == 1


def test_momentum_encoder_forward_has_no_gradient_and_unwraps_names():
    query = _Encoder()
    key = MomentumEncoder(nn.DataParallel(query), momentum=0.5)  # names without "module."
    out = key(torch.randn(4, 2))
    assert not out.requires_grad
    key.update(nn.DataParallel(query))
    with pytest.raises(ValueError, match="momentum"):
        MomentumEncoder(query, momentum=1.5)
    with pytest.raises(ValueError, match="names differ"):
        key.update(nn.Linear(2, 2))


def _rows(start, count, dim=3):
    """Row r is filled with the value r: the queue's order is readable from column 0."""
    return torch.arange(start, start + count, dtype=torch.float32)[:, None].expand(count, dim).clone()


def test_queue_fills_then_wraps_oldest_out():
    queue = KeyQueue(5, 3)
    assert len(queue) == 0 and queue.keys().shape == (0, 3)
    queue.enqueue(_rows(0, 2))
    assert queue.keys()[:, 0].tolist() == [0, 1]  # only the filled part
    queue.enqueue(_rows(2, 2))
    assert queue.keys()[:, 0].tolist() == [0, 1, 2, 3] and not queue.full
    queue.enqueue(_rows(4, 3))  # wraps: 0 and 1 leave
    assert queue.keys()[:, 0].tolist() == [2, 3, 4, 5, 6] and queue.full
    queue.enqueue(_rows(7, 4))
    assert queue.keys()[:, 0].tolist() == [6, 7, 8, 9, 10]
    queue.enqueue(_rows(11, 5))  # exactly the size
    assert queue.keys()[:, 0].tolist() == [11, 12, 13, 14, 15]
    assert torch.equal(queue.keys(), _rows(11, 5))


def test_queue_batch_larger_than_the_queue_keeps_the_newest():
    queue = KeyQueue(4, 3)
    queue.enqueue(_rows(0, 1))
    queue.enqueue(_rows(1, 10))
    assert queue.keys()[:, 0].tolist() == [7, 8, 9, 10]
    queue.enqueue(_rows(11, 2))
    assert queue.keys()[:, 0].tolist() == [9, 10, 11, 12]


def test_queue_keys_are_a_copy_detached_and_cast():
    queue = KeyQueue(4, 3, dtype=torch.float64)
    x = _rows(0, 2).requires_grad_()
    queue.enqueue(x * 1.0)
    held = queue.keys()
    assert held.dtype == torch.float64 and not held.requires_grad
    queue.enqueue(_rows(5, 4))
    assert held[:, 0].tolist() == [0, 1]  # not changed by the later enqueue
    with pytest.raises(ValueError, match=r"\(batch, 3\)"):
        queue.enqueue(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="size"):
        KeyQueue(0, 3)


def test_queue_state_dict_round_trip_continues():
    queue = KeyQueue(5, 3)
    for start in (0, 3, 6):
        queue.enqueue(_rows(start, 3))
    restored = KeyQueue(5, 3)
    restored.load_state_dict(queue.state_dict())
    assert len(restored) == 5 and torch.equal(restored.keys(), queue.keys())
    for q in (queue, restored):
        q.enqueue(_rows(9, 2))
    assert torch.equal(restored.keys(), queue.keys())
    assert restored.keys()[:, 0].tolist() == [6, 7, 8, 9, 10]
    partial = KeyQueue(5, 3)
    partial.enqueue(_rows(0, 2))
    back = KeyQueue(5, 3)
    back.load_state_dict(partial.state_dict())
    assert back.keys()[:, 0].tolist() == [0, 1] and not back.full


def test_queue_feeds_info_nce_as_extra_negatives():
    torch.manual_seed(0)
    queue = KeyQueue(6, 4, dtype=torch.float64)
    queue.enqueue(torch.randn(6, 4, dtype=torch.float64))
    a, p = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with_queue = info_nce(a, p, extra_negatives=queue.keys(), backend="reference")
    # The queue's keys add negatives: the loss grows.
    assert with_queue > info_nce(a, p, backend="reference")


def _queue_worker(rank, world, port, results):
    with gloo_group(rank, world, port):
        queue = KeyQueue(7, 3, all_ranks=True)
        history = []
        # Unequal batches: rank 0 enqueues 2 rows, rank 1 enqueues 3, values tell who and when.
        for step in range(3):
            count = 2 + rank
            keys = _rows(100 * step + 10 * rank, count)
            queue.enqueue(keys)
            history.append(queue.keys()[:, 0].tolist())
        results[rank] = history


def test_queue_all_ranks_enqueues_every_ranks_keys_identically():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_queue_worker, args=(2, free_port(), results), nprocs=2, join=True)
    assert results[0] == results[1]
    step_keys = [[100 * s + 0, 100 * s + 1, 100 * s + 10, 100 * s + 11, 100 * s + 12] for s in range(3)]
    assert results[0][0] == step_keys[0]
    assert results[0][1] == (step_keys[0] + step_keys[1])[-7:]
    assert results[0][2] == (step_keys[0] + step_keys[1] + step_keys[2])[-7:]
