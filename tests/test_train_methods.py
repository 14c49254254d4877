"""``python -m fastcl.train`` with MoCo and Child-Tuning (F and D) end to end on a tiny
BERT: each trains, checkpoints, and after Ctrl-C and ``--resume`` ends exactly where the
uninterrupted run ends (model, optimizer with its Child-Tuning state, MoCo key encoder
and queue); D's mask stays fixed and its masked weights never move; bad combinations of
the options are refused with a message that names the flag."""

import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from fastcl.train import cli, trainer as trainer_module

from .train_support import assert_usage_errors, train_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return train_workspace(tmp_path_factory.mktemp("methods"))


def _run(workspace, out, *extra):
    return cli.main(["--train-file", str(workspace / "wiki40.txt"), "--model", str(workspace / "tiny"),
                     "--output-dir", str(out), "--batch-size", "8", "--max-steps", "7", "--save-steps", "2",
                     "--learning-rate", "1e-3", "--warmup-steps", "2", "--no-eval", "--no-progress",
                     "--mlp-only-train", "--pooler", "cls", *extra])


def _state(out):
    return torch.load(out / "checkpoint" / "state.pt", weights_only=False)


def _assert_equal(a, b, where="state"):
    """Bitwise equality of nested checkpoint structures (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


CASES = {
    "moco-chunked": ["--moco-queue", "12", "--moco-momentum", "0.9", "--chunk-size", "3"],
    "child-tuning-f": ["--child-tuning", "f", "--child-tuning-p", "0.5"],
    "child-tuning-d": ["--child-tuning", "d", "--child-tuning-p", "0.3", "--child-tuning-fisher-batches", "3"],
}


@pytest.mark.parametrize("case", CASES)
def test_train_interrupt_and_resume_bit_exactly(workspace, case, monkeypatch, capsys):
    """7 steps of batch 8 over 40 rows (an epoch boundary at 5), dropout on, checkpoints
    every 2 steps; interrupted by SIGINT during step 4, then resumed: every weight, the
    optimizer state and the MoCo state equal those of the uninterrupted run."""
    flags = CASES[case]
    straight = workspace / f"{case}-straight"
    assert _run(workspace, straight, *flags) == 0
    straight_err = capsys.readouterr().err

    real = trainer_module.compute_gradients
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # (D's Fisher batches are not training steps and do not count)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 4
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_gradients", interrupting)
    out = workspace / f"{case}-resumed"
    assert _run(workspace, out, *flags) == 130
    monkeypatch.setattr(trainer_module, "compute_gradients", real)
    at_4 = _state(out)
    assert at_4["step"] == 4
    capsys.readouterr()
    assert _run(workspace, out, *flags, "--resume") == 0
    resumed_err = capsys.readouterr().err

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    initial = load_file(str(workspace / "tiny" / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    moved = 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(a[name], initial[name]))
    assert moved > 10
    sa, sb = _state(straight), _state(out)
    assert sa["step"] == sb["step"] == 7
    for key in ("model", "optimizer", "scheduler", "moco", "optimizer_param_names"):
        _assert_equal(sa[key], sb[key], key)

    if case.startswith("moco"):
        moco = sb["moco"]
        assert int(moco["queue.filled"]) == 12 and int(moco["queue.position"]) == (7 * 8) % 12
        assert moco["queue.queue"].abs().sum(1).gt(0).all()
        key = {n.removeprefix("key_encoder.encoder."): t for n, t in moco.items() if n.startswith("key_encoder.")}
        assert key.keys() == sb["model"].keys()
        lagging = [n for n, t in sb["model"].items() if t.is_floating_point() and not torch.equal(key[n], t)]
        assert len(lagging) > 10  # the key encoder trails the trained encoder (EMA), it is not a copy
        assert "MoCo (queue 12, momentum 0.9)" in straight_err
        # --resume must keep the MoCo options of its checkpoint
        assert _run(workspace, out, "--resume") == 2
        assert "made with moco_queue=12, now 0" in capsys.readouterr().err
        return

    child = sb["optimizer"]["child_tuning"]
    assert child["mode"] == case[-1]
    if case == "child-tuning-f":
        assert child["generators"] and not child["masks"]
        assert "Child-Tuning-F (p 0.5)" in straight_err
        return

    # Task-driven: one mask, estimated before training (not again on resume), never changed.
    assert "Fisher information of the training loss over 3 batches" in straight_err
    assert "Fisher information" not in resumed_err
    masks = child["masks"]
    _assert_equal(at_4["optimizer"]["child_tuning"]["masks"], masks, "masks at step 4 vs 7")
    names = sb["optimizer_param_names"]
    assert masks and all("layer" in names[i] for i in masks)  # the transformer layers, as the paper scores
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == math.ceil(0.3 * total)
    frozen = changed = 0
    for i, mask in masks.items():
        final, start = sb["model"][names[i]], initial[names[i].removeprefix("backbone.")]
        # Masked entries get no gradient-driven update (and weight decay is 0): bit-identical.
        assert torch.equal(final[~mask], start[~mask]), names[i]
        frozen += int((~mask).sum())
        changed += int((final[mask] != start[mask]).sum())
    assert frozen == total - kept and changed > 0.9 * kept


def test_bad_combinations_are_refused(workspace, capsys):
    base = ["--train-file", str(workspace / "wiki40.txt"), "--model", str(workspace / "tiny"), "--no-progress"]
    cases = [
        (["--moco-queue", "8", "--moco-momentum", "1.0"], "--moco-momentum must be in [0, 1)"),
        (["--moco-queue", "8", "--moco-momentum", "-0.1"], "--moco-momentum must be in [0, 1)"),
        (["--moco-queue", "8", "--moco-momentum", "nan"], "--moco-momentum must be in [0, 1)"),
        (["--moco-momentum", "0.99"], "--moco-momentum needs --moco-queue"),
        (["--moco-queue", "-1"], "--moco-queue must be an int >= 0"),
        (["--child-tuning", "d", "--child-tuning-p", "0"], "--child-tuning-p must be in (0, 1]"),
        (["--child-tuning", "f", "--child-tuning-p", "1.5"], "--child-tuning-p must be in (0, 1]"),
        (["--child-tuning-p", "0.3"], "--child-tuning-p needs --child-tuning f or d"),
        (["--child-tuning", "f", "--child-tuning-fisher-batches", "4"], "is for --child-tuning d"),
        (["--child-tuning", "d", "--child-tuning-fisher-batches", "0"], "--child-tuning-fisher-batches must be"),
        (["--child-tuning", "x"], "invalid choice: 'x'"),
        (["--distributed-loss", "allgather"], "invalid choice: 'allgather'"),
    ]
    assert_usage_errors(base, cases, capsys)
    # Programmatic use gets the same checks.
    cfg = trainer_module.TrainConfig(train_file=str(workspace / "wiki40.txt"), output_dir=str(workspace / "x"),
                                     moco_queue=4, moco_momentum=1.0)
    with pytest.raises(ValueError, match=r"--moco-momentum must be in \[0, 1\)"):
        trainer_module.Trainer(cfg).setup()


def test_ring_in_one_process_trains_with_a_note(workspace, capsys):
    """--distributed-loss ring without DDP: the plain loss, and a note saying so."""
    out = workspace / "ring-one"
    assert _run(workspace, out, "--distributed-loss", "ring", "--max-steps", "2") == 0
    assert "--distributed-loss ring applies under DDP" in capsys.readouterr().err
    assert _state(out)["step"] == 2
