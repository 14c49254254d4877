"""``python -m fastcl.train`` end to end on a tiny BERT: evaluation and the best model,
logs, the output directory loading with AutoModel / SentenceTransformer / fastcl.encode,
Ctrl-C and --resume reproducing an uninterrupted run exactly, and bad input."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

import fastcl
from fastcl.train import cli, trainer as trainer_module

from .train_support import train_workspace

SENTENCES_FOR_CHECK = ["a man is playing a guitar .", "the cat sleeps on the sofa", "stocks fell"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny BERT, 40 real Wikipedia lines, and the first 120 pairs of the real STS-B dev / test."""
    return train_workspace(tmp_path_factory.mktemp("train"), sts_rows=120)


def _records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("pooler,mlp", [("cls", "auto"), ("avg", "auto"), ("cls", "train-only"), ("avg", "always")])
def test_train_evaluate_save_and_load(workspace, pooler, mlp):
    """The "after training" scores are those of the best model as it was evaluated live:
    the saved model loads with the head it was trained with (SimCSE's --mlp-only-train
    included)."""
    out = workspace / f"run-{pooler}-{mlp}"
    code = cli.main(["--train-file", str(workspace / "wiki40.txt"), "--model", str(workspace / "tiny"),
                     "--output-dir", str(out), "--pooler", pooler, "--mlp", mlp, "--batch-size", "8", "--chunk-size", "3",
                     "--max-steps", "4", "--eval-steps", "2", "--logging-steps", "2", "--learning-rate", "1e-3",
                     "--eval-data-dir", str(workspace / "sts"), "--no-progress"])
    assert code == 0
    records = _records(out)
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4, 4]  # before, every 2 steps, after (best model)
    assert evals[0]["when"] == "before" and evals[-1]["when"] == "after (best model)"
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [2, 4] and all(r["sentences_per_s"] > 0 and r["loss"] > 0 for r in train)
    best = max(evals[1:3], key=lambda r: r["stsb_dev"])
    assert evals[-1]["stsb_dev"] == pytest.approx(best["stsb_dev"], abs=1e-6)  # OUT holds the best model
    for key in ("alignment", "uniformity"):
        assert evals[-1][key] == pytest.approx(best[key], rel=1e-5)
    results = json.loads((out / "results.json").read_text())
    assert results["before"]["stsb_test"] == evals[0]["stsb_test"] and results["after"]["stsb_dev"] == evals[-1]["stsb_dev"]
    assert results["steps"] == 4 and results["sentences_per_s"] > 0 and results["best_step"] == best["step"]
    for key in ("alignment", "uniformity", "spectrum_effective_rank"):
        assert key in results["after"] and key in results["before"]
    assert len(results["spectrum_normalized"]["after"]) == 32 and results["spectrum_normalized"]["before"][0] == 1.0
    assert (out / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    assert all(not k.startswith("_") for r in records for k in r)

    mine = fastcl.encode(out, SENTENCES_FOR_CHECK)
    torch.testing.assert_close(mine.norm(dim=1), torch.ones(3))
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    st = SentenceTransformer(str(out), device="cpu")
    theirs = torch.as_tensor(st.encode(SENTENCES_FOR_CHECK))
    torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-4)
    auto, tok = AutoModel.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        o = auto(**tok(SENTENCES_FOR_CHECK, padding=True, return_tensors="pt"))
    if mlp == "auto" and pooler == "cls":  # the MLP used at evaluation is BERT's pooler in the saved model
        assert json.loads((out / "fastcl_config.json").read_text())["mlp_eval"] is True
        assert (out / "2_Dense" / "model.safetensors").exists()
        torch.testing.assert_close(torch.nn.functional.normalize(o.pooler_output, dim=1), mine, atol=1e-5, rtol=1e-4)
    else:
        assert (out / "2_Dense").exists() == (mlp == "always")
        assert json.loads((out / "fastcl_config.json").read_text())["mlp_eval"] is (mlp == "always")
        mode = "pooling_mode_mean_tokens" if pooler == "avg" else "pooling_mode_cls_token"
        assert json.loads((out / "1_Pooling" / "config.json").read_text())[mode] is True


def _run(workspace, out, *extra):
    return cli.main(["--train-file", str(workspace / "wiki40.txt"), "--model", str(workspace / "tiny"),
                     "--output-dir", str(out), "--batch-size", "8", "--max-steps", "7", "--save-steps", "2",
                     "--learning-rate", "1e-3", "--warmup-steps", "2", "--no-eval", "--no-progress",
                     "--mlp-only-train", "--pooler", "cls", *extra])


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(workspace, monkeypatch, capsys):
    """7 steps of batch 8 over 40 rows cross an epoch boundary (5 batches an epoch); dropout
    is on. Interrupted by SIGINT during step 4, then resumed, the run ends with exactly
    the weights of the run that was never interrupted: model, optimizer, schedule, RNG
    and data position all came back."""
    assert _run(workspace, workspace / "straight") == 0

    real = trainer_module.compute_gradients
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of step 4
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_gradients", interrupting)
    out = workspace / "interrupted"
    assert _run(workspace, out) == 130
    assert "SIGINT" in capsys.readouterr().err
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert (state["step"], state["epoch"], state["index"]) == (4, 0, 4)
    assert not list((out / "checkpoint").glob(".*tmp*"))  # nothing half-written left behind
    monkeypatch.setattr(trainer_module, "compute_gradients", real)

    assert _run(workspace, out) == 2  # a checkpoint is there: refuse to start over silently
    assert "--resume" in capsys.readouterr().err
    assert _run(workspace, out, "--resume") == 0
    a, b = load_file(str(workspace / "straight" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        moved += int(not torch.equal(a[name], load_file(str(workspace / "tiny" / "model.safetensors"))[name]))
    assert moved > 10  # training did change the weights


def test_atomic_checkpoint_write_keeps_the_old_file(tmp_path, monkeypatch):
    from fastcl.train.checkpoint import atomic_torch_save

    path = tmp_path / "state.pt"
    atomic_torch_save({"step": 1}, path)

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # the temporary file went too


def test_bad_input_errors(workspace, tmp_path, capsys):
    base = ["--model", str(workspace / "tiny"), "--output-dir", str(tmp_path / "o"), "--no-progress"]
    assert cli.main(["--train-file", str(tmp_path / "nope.txt"), *base]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    assert cli.main(["--train-file", str(workspace / "wiki40.txt"), "--batch-size", "64", *base]) == 2
    assert "batch size 64 is larger than the 40 rows of" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("sent0,sent1,hard_neg\na,b,c\nd,e\n")
    assert cli.main(["--train-file", str(bad), *base]) == 2
    assert "bad.csv:3: expected 3 columns (sent0,sent1,hard_neg), got 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--train-file", str(bad), "--pooler", "max", *base])
    assert e.value.code == 2 and "invalid choice: 'max'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--train-file", str(bad), "--temperature", "0", *base])
    assert "--temperature must be > 0" in capsys.readouterr().err


def test_supervised_with_every_option(workspace):
    """The real SNLI triplets with MLM, dedup, Gaussian and weighted hard negatives,
    gradient caching and the avg_first_last pooler (sentence-transformers averages the
    same two layers with its WeightedLayerPooling)."""
    from .train_support import NLI

    lines = NLI.read_text(encoding="utf-8").splitlines()[:33]
    csv = workspace / "nli32.csv"
    csv.write_text("\n".join(lines + [lines[1]]) + "\n", encoding="utf-8")  # a duplicate row for --dedup
    out = workspace / "run-sup"
    code = cli.main(["--train-file", str(csv), "--model", str(workspace / "tiny"), "--output-dir", str(out),
                     "--batch-size", "33", "--chunk-size", "8", "--max-steps", "2", "--do-mlm", "--dedup",
                     "--gaussian-negatives", "4", "--hard-negative-weight", "2.0", "--pooler", "avg_first_last",
                     "--no-eval", "--no-progress", "--logging-steps", "1"])
    assert code == 0
    train = [r for r in _records(out) if r["event"] == "train"]
    assert len(train) == 2 and all(r["mlm_loss"] > 0 and r["loss"] > 0 for r in train)
    from fastcl.train.data import BatchPlan, drop_duplicates, read_training_file

    rows = read_training_file(csv).rows
    expected = [len(drop_duplicates([rows[i] for i in BatchPlan(33, 33, seed=42).batch(e, 0)])) for e in (0, 1)]
    assert max(expected) <= 32  # at least the repeated row goes
    assert [r["rows"] for r in train] == expected
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "triplets" and results["sentences_per_s"] > 0
    assert results["after"] is None  # no evaluation asked for
    assert json.loads((out / "fastcl_config.json").read_text())["pooler"] == "avg_first_last"
    emb = fastcl.encode(out, SENTENCES_FOR_CHECK)
    assert emb.shape == (3, 32) and torch.isfinite(emb).all()
    from sentence_transformers import SentenceTransformer

    theirs = torch.as_tensor(SentenceTransformer(str(out), device="cpu").encode(SENTENCES_FOR_CHECK))
    torch.testing.assert_close(theirs, emb, rtol=0, atol=2e-6)  # the same layer average, not plain mean pooling


def test_geometry_steps_log_the_live_model_without_changing_training(workspace, capsys):
    """--geometry-steps N logs alignment / uniformity / STS-B dev every N steps (not at an
    evaluation's step, which records them from its own encoding, nor at the last step,
    which the final evaluation covers); the numbers are the live model's (equal to an
    evaluation at that step) and training is unchanged (the same final weights)."""
    def run(out, *extra):
        return cli.main(["--train-file", str(workspace / "wiki40.txt"), "--model", str(workspace / "tiny"),
                         "--output-dir", str(out), "--batch-size", "8", "--max-steps", "5", "--learning-rate", "1e-3",
                         "--eval-data-dir", str(workspace / "sts"), "--logging-steps", "0", "--no-progress", *extra])

    geo, plain, every = workspace / "geo", workspace / "geo-plain", workspace / "geo-every"
    assert run(geo, "--eval-steps", "3", "--geometry-steps", "1") == 0
    assert run(plain, "--eval-steps", "3") == 0
    assert run(every, "--eval-steps", "1") == 0
    records = _records(geo)
    geometry = [r for r in records if r["event"] == "geometry"]
    assert [r["step"] for r in geometry] == [1, 2, 4]
    assert [r["step"] for r in records if r["event"] == "eval"] == [0, 3, 5, 5]  # before, step 3, last, after
    evals = {r["step"]: r for r in _records(every) if r["event"] == "eval" and r.get("when") is None}
    for r in geometry:
        for key in ("stsb_dev", "alignment", "uniformity", "spectrum_top1_energy", "spectrum_effective_rank"):
            assert r[key] == evals[r["step"]][key], key
    assert [r for r in _records(plain) if r["event"] == "geometry"] == []
    assert (geo / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    from fastcl.plots import load_run

    assert [p["step"] for p in load_run(geo).points] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(SystemExit) as e:
        run(workspace / "geo-bad", "--geometry-steps", "2", "--no-eval")
    assert e.value.code == 2 and "--geometry-steps measures on STS-B dev" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(workspace / "geo-bad", "--geometry-steps", "-1")
    assert "--geometry-steps must be >= 0" in capsys.readouterr().err
