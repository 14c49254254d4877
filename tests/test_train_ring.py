"""The trainer's step under DDP (gloo, 2 CPU processes, dropout off, float64) with
``--distributed-loss ring`` and with MoCo: the ring loss gives the loss and parameter
gradients of the gathered loss and of one process on the whole batch, plain and with
gradient caching; MoCo under DDP (keys gathered, the queue filled with every rank's keys
in rank order) equals MoCo in one process over two steps, queue included; and
``torchrun`` end to end with MoCo, the ring loss and Child-Tuning-D logs the losses of one
process."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastcl.train.data import local_slice, tokenize_rows
from fastcl.train.step import LossConfig, MoCo, compute_gradients

from .test_train_ddp import ROWS
from .test_train_step import SENTENCES, encoder
from .train_support import free_port, tokenizer, train_one_and_two_processes

ROWS2 = [(SENTENCES[(i + 4) % 10], SENTENCES[(i + 1) % 10], SENTENCES[(i + 8) % 10]) for i in range(10)]
OPTIONS = dict(hard_negative_weight=2.0, gaussian_negatives=3)
CASES = {"gather-plain": ("gather", 0), "ring-plain": ("ring", 0), "ring-chunked": ("ring", 2)}
QUEUE, MOMENTUM = 13, 0.8


def _batch(rows):
    return tokenize_rows(rows, tokenizer(), 16, 3)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _moco_run(model, inner, batches, distributed_loss, chunk, all_ranks):
    """Two MoCo steps of ``model`` (a DDP wrapper of ``inner``, or ``inner``), SGD and
    after_step after each; returns the second step's loss and gradients, then the queue
    and the key encoder after its after_step."""
    moco = MoCo(inner, QUEUE, MOMENTUM, dim=32, all_ranks=all_ranks)
    opt = torch.optim.SGD(inner.parameters(), lr=0.5)
    cfg = LossConfig(distributed=distributed_loss, **OPTIONS)
    for batch in batches:
        inner.zero_grad(set_to_none=True)
        out = compute_gradients(model, batch, cfg, chunk_size=chunk, generator=torch.Generator().manual_seed(4),
                                moco=moco)
        grads = _grads(inner)
        opt.step()
        moco.after_step(inner)
    return out, grads, moco.queue.keys(), {n: p.clone() for n, p in moco.key_encoder.named_parameters()}


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        import fastcl.distributed as fd

        calls = {"ring": 0}
        real_ring = fd.ring_info_nce

        def counting_ring(*args, **kwargs):
            calls["ring"] += 1
            return real_ring(*args, **kwargs)

        fd.ring_info_nce = counting_ring  # the step imports it at call time
        part = local_slice(len(ROWS), rank, world)
        local = _batch(ROWS[part])
        for name, (distributed_loss, chunk) in CASES.items():
            model = DDP(encoder(dropout=0.0, pooler="cls", mlp="auto"), broadcast_buffers=False)
            out = compute_gradients(model, local, LossConfig(distributed=distributed_loss, **OPTIONS),
                                    chunk_size=chunk, generator=torch.Generator().manual_seed(4))
            results[(name, rank)] = (out, _grads(model.module))
        inner = encoder(dropout=0.0, pooler="cls", mlp="auto")
        moco_model = DDP(inner, broadcast_buffers=False)  # MoCo copies the encoder itself, not the wrapper
        results[("moco", rank)] = _moco_run(moco_model, inner, [local, _batch(ROWS2[part])], "ring", 2, True)
        results[("ring calls", rank)] = calls["ring"]
    finally:
        dist.destroy_process_group()


def _assert_close_dicts(a, b, what):
    assert a.keys() == b.keys() and len(a) > 10, what
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-8, atol=1e-12, msg=lambda m: f"{what} {name}: {m}")


def test_ring_and_moco_under_ddp_equal_one_process():
    world = 2
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, free_port(), results), nprocs=world, join=True)

    single = encoder(dropout=0.0, pooler="cls", mlp="auto")
    ref = compute_gradients(single, _batch(ROWS), LossConfig(**OPTIONS), generator=torch.Generator().manual_seed(4))
    ref_grads = _grads(single)
    assert [results[("ring calls", rank)] for rank in range(world)] == [4, 4]  # 2 ring cases + 2 MoCo steps
    for case in CASES:
        for rank in range(world):
            out, grads = results[(case, rank)]
            assert abs(out["loss"] - ref["loss"]) <= 1e-10 * ref["loss"], (case, rank, out["loss"], ref["loss"])
            _assert_close_dicts(grads, ref_grads, f"{case} rank {rank}")  # DDP averaged the ranks' gradients

    inner = encoder(dropout=0.0, pooler="cls", mlp="auto")
    out, grads, queue, key = _moco_run(inner, inner, [_batch(ROWS), _batch(ROWS2)], "gather", 0, False)
    assert queue.shape == (QUEUE, 32)
    for rank in range(world):
        r_out, r_grads, r_queue, r_key = results[("moco", rank)]
        assert abs(r_out["loss"] - out["loss"]) <= 1e-10 * out["loss"], (rank, r_out["loss"], out["loss"])
        _assert_close_dicts(r_grads, grads, f"moco rank {rank}")
        # every rank's keys, in rank order: the queue of one process on the whole batch
        torch.testing.assert_close(r_queue, queue, rtol=1e-10, atol=1e-12)
        _assert_close_dicts(r_key, key, f"moco key encoder rank {rank}")


def test_torchrun_moco_ring_child_tuning_d_equal_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m fastcl.train`` (gloo) with MoCo, the ring loss,
    Child-Tuning-D (Fisher under DDP) and gradient caching, dropout off: each of 3 steps
    logs the loss of a single-process run (so the Fisher mask, the updates, the key
    encoder and the queue of both ranks' keys all agree with it), and the final queue is
    the single process's."""
    import json

    _, two = train_one_and_two_processes(
        tmp_path, "--max-steps", "3", "--learning-rate", "1e-3", "--moco-queue", "40", "--moco-momentum", "0.5",
        "--child-tuning", "d", "--child-tuning-fisher-batches", "2", "--distributed-loss", "ring")
    assert "over 2 processes (ring loss), MoCo (queue 40, momentum 0.5), Child-Tuning-D (p 0.3)" in two.stderr
    logs = {n: [json.loads(x) for x in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("one", "two")}
    assert [r["step"] for r in logs["two"]] == [1, 2, 3]
    for a, b in zip(logs["two"], logs["one"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"], (a, b)
    states = {n: torch.load(tmp_path / n / "checkpoint" / "state.pt", weights_only=False) for n in ("one", "two")}
    for n in ("one", "two"):
        assert int(states[n]["moco"]["queue.filled"]) == 40
    torch.testing.assert_close(states["two"]["moco"]["queue.queue"], states["one"]["moco"]["queue.queue"],
                               rtol=1e-4, atol=1e-5)
    masks = [states[n]["optimizer"]["child_tuning"]["masks"] for n in ("one", "two")]
    assert masks[0].keys() == masks[1].keys()
    differ = sum(int((masks[0][i] != masks[1][i]).sum()) for i in masks[0])
    assert differ <= 10  # the same Fisher mask, up to fp32 rounding at the threshold
