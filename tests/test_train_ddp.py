"""DDP with the gloo backend, 2 CPU processes: the trainer's step gives the loss and the
parameter gradients of one process computing the whole batch.

Dropout is off: with it on, each process draws its own masks and no single-process run
can draw the same ones for the same rows, so equality would test the random generator,
not the step. (Gradient caching's mask replay is tested with dropout on in
test_train_step.py.) Each rank tokenizes only its rows (its own padding width), as the
trainer does; MLM masks are drawn once for the global batch and sliced.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastcl.train.data import local_slice, mask_tokens, tokenize_rows
from fastcl.train.step import LossConfig, compute_gradients

from .test_train_step import SENTENCES, encoder
from .train_support import free_port, tokenizer, train_one_and_two_processes

ROWS = [(SENTENCES[i], SENTENCES[(i + 3) % 10], SENTENCES[(i + 7) % 10]) for i in range(10)]


def _batch(rows, mlm):
    batch = tokenize_rows(rows, tokenizer(), 16, 3)
    if mlm:
        batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens(
            batch["input_ids"], batch["attention_mask"], tokenizer(), 0.3, torch.Generator().manual_seed(3))
    return batch


def _local_batch(rank, world, mlm):
    full = _batch(ROWS, mlm)
    part = local_slice(len(ROWS), rank, world)
    local = tokenize_rows(ROWS[part], tokenizer(), 16, 3)
    if mlm:  # the global draw, sliced and cut to the local padding width
        width = local["input_ids"].shape[-1]
        local["mlm_input_ids"] = full["mlm_input_ids"][part][..., :width]
        local["mlm_labels"] = full["mlm_labels"][part][..., :width]
    return local


CASES = {"plain-hard": (0, False, dict(hard_negative_weight=2.0)),
         "chunked-mlm-gauss": (2, True, dict(hard_negative_weight=2.0, gaussian_negatives=3, mlm_weight=0.1))}


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        for name, (chunk, mlm, options) in CASES.items():  # one spawn for all cases: start-up dominates
            model = DDP(encoder(dropout=0.0, pooler="cls", mlp="auto", do_mlm=mlm), broadcast_buffers=False)
            out = compute_gradients(model, _local_batch(rank, world, mlm), LossConfig(**options), chunk_size=chunk,
                                    generator=torch.Generator().manual_seed(4))
            grads = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}
            results[(name, rank)] = (out, grads)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one():
    world = 2
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world, free_port(), results), nprocs=world, join=True)
    for case, (chunk, mlm, options) in CASES.items():
        single = encoder(dropout=0.0, pooler="cls", mlp="auto", do_mlm=mlm)
        ref = compute_gradients(single, _batch(ROWS, mlm), LossConfig(**options), chunk_size=0,
                                generator=torch.Generator().manual_seed(4))
        ref_grads = {n: p.grad for n, p in single.named_parameters() if p.grad is not None}
        for rank in range(world):
            out, grads = results[(case, rank)]
            assert out["loss"] == pytest.approx(ref["loss"], rel=1e-10), case
            if mlm:
                assert out["mlm_loss"] == pytest.approx(ref["mlm_loss"], rel=1e-10), case
            assert grads.keys() == ref_grads.keys()
            for name, g in ref_grads.items():  # DDP has averaged the ranks' gradients
                torch.testing.assert_close(grads[name], g, rtol=1e-8, atol=1e-12, msg=lambda m: f"{case} {name}: {m}")


def test_torchrun_two_processes_end_to_end(tmp_path):
    """``torchrun --nproc-per-node 2 -m fastcl.train`` (gloo on CPU): the process group,
    the global batch split across ranks, rank-0-only outputs. With dropout off, the first
    step's logged loss (before any update) equals that of a single-process run."""
    import json

    _, two = train_one_and_two_processes(tmp_path, "--max-steps", "2")
    assert two.stdout.count("model written to") == 1  # rank 0 only
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 2
    logs = {n: [json.loads(x) for x in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("one", "two")}
    assert [r["rows"] for r in logs["two"]] == [32, 32]
    assert logs["two"][0]["loss"] == pytest.approx(logs["one"][0]["loss"], rel=1e-5)
