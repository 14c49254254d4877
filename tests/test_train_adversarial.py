"""``python -m fastcl.train`` against what users do by mistake and what goes wrong around
it: output directories that hold something else (or the model itself), paths that cannot
be written, damaged or foreign checkpoints, a disk that fills up mid-save, a second
Ctrl-C at the worst moment. Each case must destroy nothing that was not asked for, fail
with one line (exit 2 for a usage error, 1 for a failed write), and leave a state that
``--resume`` continues exactly."""

import errno
import hashlib
import json
import os
import pickle
import signal

import pytest
import torch
from safetensors.torch import load_file

import fastcl.saved_model
from fastcl.train import checkpoint as checkpoint_module
from fastcl.train import cli
from fastcl.train.checkpoint import read_checkpoint
from fastcl.train.output import DirectoryLock

from .train_support import save_tiny_bert, tokenizer, train_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return train_workspace(tmp_path_factory.mktemp("adversarial"), sts_rows=60)


def _args(ws, out, *extra, steps=6, model=None):
    return ["--train-file", str(ws / "wiki40.txt"), "--model", str(model or ws / "tiny"), "--output-dir", str(out),
            "--batch-size", "8", "--max-steps", str(steps), "--save-steps", "2", "--eval-steps", "3",
            "--logging-steps", "1", "--learning-rate", "1e-3", "--eval-data-dir", str(ws / "sts"), "--no-progress",
            "--pooler", "cls", "--mlp-only-train", *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _tree(directory) -> dict:
    """Every file under ``directory`` with its content's digest."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the model gets loaded: checks must come first."""
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(fastcl.saved_model, "load_backbone", never)


@pytest.fixture(scope="module")
def straight(ws):
    out = ws / "straight"
    assert cli.main(_args(ws, out)) == 0
    return out


def _assert_equal_weights(a_dir, b_dir):
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _log_steps(out):
    records = map(json.loads, (out / "log.jsonl").read_text().splitlines())
    return [(r["event"], r["step"], r.get("when")) for r in records]


# ------------------------------------------------------------------ the output directory


def test_a_non_empty_directory_is_refused_and_left_as_it_was(ws, tmp_path, capsys, no_model_loading):
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "best" / "model.safetensors").write_bytes(b"the user's best model")
    (out / "log.jsonl").write_text('{"event": "eval"}\n')
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    assert cli.main(_args(ws, out)) == 2
    line = _error_line(capsys)
    assert f"output directory {out} is not empty (best, log.jsonl, notes.txt): pass --overwrite" in line
    assert _tree(out) == before


def test_overwrite_replaces_an_earlier_run_and_keeps_other_files(ws, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_args(ws, out, steps=3, model=ws / "tiny") + ["--mlp", "always", "--pooler", "avg"]) == 0
    assert (out / "2_Dense").is_dir()
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert cli.main(_args(ws, out, steps=3)) == 2  # a finished run is not continued silently either
    assert "pass --overwrite" in _error_line(capsys) and (out / "2_Dense").is_dir()
    assert cli.main(_args(ws, out, "--overwrite", steps=3) + ["--pooler", "avg_top2", "--mlp", "none"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "2_Dense").exists()  # the earlier run's head, which the new model does not have
    assert json.loads((out / "fastcl_config.json").read_text())["pooler"] == "avg_top2"
    assert [s for _, s, w in _log_steps(out) if w == "before"] == [0]  # one run's log, not two


def _model_cases(ws, tmp_path):
    model = tmp_path / "models" / "tiny"
    model.parent.mkdir()
    save_tiny_bert(model)
    link = tmp_path / "link"
    link.symlink_to(model)
    return model, [("the same", model, model), ("inside", model / "run", model), ("holding", model.parent, model),
                   ("a link to it", link, model), ("through a link", model, link)]


def test_never_writes_over_the_model_it_trains_from(ws, tmp_path, capsys, no_model_loading):
    model, cases = _model_cases(ws, tmp_path)
    before = _tree(model.parent)
    for what, out, source in cases:
        for extra in ([], ["--overwrite"]):
            assert cli.main(_args(ws, out, *extra, model=source)) == 2, what
            line = _error_line(capsys)
            assert "the model being trained from" in line and "write over its own source" in line, (what, line)
    assert _tree(model.parent) == before
    os.chdir(model)  # a relative output path: "."
    try:
        assert cli.main(_args(ws, ".", "--overwrite", model=model)) == 2
    finally:
        os.chdir(ws)
    assert "is the model being trained from" in _error_line(capsys)
    assert _tree(model.parent) == before


def test_paths_that_cannot_be_used_fail_in_one_line_before_loading(ws, tmp_path, capsys, monkeypatch,
                                                                    no_model_loading):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    cases = [
        (tmp_path / "a-file", [], "is a file, not a directory"),
        (tmp_path / "a-file" / "run", [], f"cannot write to output directory {tmp_path / 'a-file' / 'run'}: "
                                         f"{tmp_path / 'a-file'} is a file, not a folder"),
        (tmp_path / "dangling", [], "is a symbolic link to"),
        (tmp_path / "fresh", ["--resume"], "holds no checkpoint"),
        (tmp_path / "fresh", ["--resume", "--overwrite"], "pass one of them"),
    ]
    for out, extra, message in cases:
        assert cli.main(_args(ws, out, *extra)) == 2, out
        line = _error_line(capsys)
        assert message in line, (out, line)
    assert not (tmp_path / "fresh").exists()

    import fastcl.paths

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fastcl.paths, "open", read_only, raising=False)
    assert cli.main(_args(ws, tmp_path / "ro")) == 2
    assert f"cannot write to output directory {tmp_path / 'ro'}: Permission denied" in _error_line(capsys)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="permission bits do not bind root")
def test_a_read_only_directory_fails_before_loading(ws, tmp_path, capsys, no_model_loading):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert cli.main(_args(ws, out)) == 2
        assert "cannot write to output directory" in _error_line(capsys)
    finally:
        out.chmod(0o755)


def test_a_second_run_into_the_same_directory_is_refused(ws, tmp_path, capsys, no_model_loading):
    out = tmp_path / "busy"
    out.mkdir()
    lock = DirectoryLock(out)
    lock.acquire()
    try:
        assert cli.main(_args(ws, out)) == 2
        assert "another training run is writing to" in _error_line(capsys)
    finally:
        lock.release()


def test_model_paths_fail_in_one_line(ws, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for model, message in ((empty, "is not a model directory: it is empty"),
                           (ws / "tiny" / "config.json", "is a file, not a model directory"),
                           (tmp_path / "nowhere", "does not exist")):
        assert cli.main(_args(ws, tmp_path / "out", model=model)) == 2
        assert message in _error_line(capsys)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ checkpoints


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_damaged_or_foreign_checkpoints_fail_in_one_line(ws, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli.main(_args(ws, out, steps=2)) == 0
    path = out / "checkpoint" / "state.pt"
    good = path.read_bytes()
    monkeypatch.chdir(tmp_path)
    damages = {
        "truncated": (good[: len(good) // 2], "is not a readable checkpoint (truncated or damaged"),
        "cut short": (good[:100], "is not a readable checkpoint"),
        "empty": (b"", "is empty"),
        "garbage": (os.urandom(5000), "is not a readable checkpoint"),
        "code": (pickle.dumps(_Payload()), "is not a readable checkpoint"),
    }
    for name, (content, message) in damages.items():
        path.write_bytes(content)
        assert cli.main(_args(ws, out, "--resume", steps=4)) == 2, name
        line = _error_line(capsys)
        assert message in line and "--overwrite" in line, (name, line)
    assert not (tmp_path / "PWNED").exists()  # never unpickled as code
    for name, obj, message in (("a list", [1, 2], "is not a fastcl checkpoint"),
                               ("no state", {"step": 2}, "is not a fastcl checkpoint (no epoch, index")):
        torch.save(obj, path)
        assert cli.main(_args(ws, out, "--resume", steps=4)) == 2, name
        assert message in _error_line(capsys)
    path.write_bytes(good)
    assert cli.main(_args(ws, out, "--resume", "--learning-rate", "2e-3", steps=4)) == 2
    assert "made with learning_rate=0.001, now 0.002" in _error_line(capsys)
    assert cli.main(_args(ws, out, "--resume", "--pooler", "avg", steps=4)) == 2
    assert "made with pooler='cls', now 'avg'" in _error_line(capsys)
    from transformers import BertConfig, BertModel

    wide = tmp_path / "wide"
    BertModel(BertConfig(vocab_size=len(tokenizer()), hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(wide)
    tokenizer().save_pretrained(wide)
    assert cli.main(_args(ws, out, "--resume", steps=4, model=wide)) == 2
    assert f"does not fit the model of --model {wide}" in _error_line(capsys)
    other = tmp_path / "other-tokenizer"  # the same architecture, another vocabulary
    save_tiny_bert(other)
    vocab = (other / "tokenizer.json").read_text().replace('"[unused0]"', '"[unused-zero]"')
    (other / "tokenizer.json").write_text(vocab)
    assert cli.main(_args(ws, out, "--resume", steps=4, model=other)) == 2
    assert f"was trained from {ws / 'tiny'}, whose tokenizer differs" in _error_line(capsys)
    assert path.read_bytes() == good
    assert cli.main(_args(ws, out, "--resume", steps=4)) == 0  # the checkpoint is still usable


def _fail_nth(n, real, error=OSError(errno.ENOSPC, "No space left on device")):
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            target = args[1] if len(args) > 1 else None
            if hasattr(target, "write"):
                target.write(b"half a file")
            raise error
        return real(*args, **kwargs)

    return failing


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(ws, straight, capsys, monkeypatch):
    out = ws / "disk-full"
    monkeypatch.setattr(checkpoint_module.torch, "save", _fail_nth(2, torch.save))
    assert cli.main(_args(ws, out)) == 1  # the second checkpoint (step 4) fails
    line = _error_line(capsys)
    assert "could not write" in line and "No space left on device" in line and "previous checkpoint is intact" in line
    monkeypatch.undo()
    assert read_checkpoint(out / "checkpoint" / "state.pt")["step"] == 2
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["state.pt"]  # no temporary left
    assert cli.main(_args(ws, out, "--resume")) == 0
    _assert_equal_weights(straight, out)
    assert _log_steps(out) == _log_steps(straight)


def test_a_full_disk_while_saving_the_best_model_leaves_no_half_model(ws, straight, capsys, monkeypatch):
    out = ws / "best-full"
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", _fail_nth(1, PreTrainedModel.save_pretrained))
    assert cli.main(_args(ws, out)) == 1
    line = _error_line(capsys)
    assert "could not write the model to" in line and "No space left on device" in line
    monkeypatch.undo()
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".fastcl.lock"]
    assert leftovers == [] and not (out / "best").exists()
    assert cli.main(_args(ws, out, "--resume")) == 0
    _assert_equal_weights(straight, out)


def test_a_pending_best_model_is_installed_or_dropped_by_the_checkpoint(ws, straight, tmp_path):
    """Killed between the checkpoint that names a new best model and its installation:
    installed on resume. A pending model the checkpoint does not name is dropped."""
    import shutil

    out = tmp_path / "pending"
    shutil.copytree(straight, out)
    best_step = read_checkpoint(out / "checkpoint" / "state.pt")["best_step"]
    os.replace(out / "best", out / ".best.pending")
    before = _tree(out / ".best.pending")
    assert cli.main(_args(ws, out, "--resume")) == 0
    assert not (out / ".best.pending").exists() and _tree(out / "best") == before
    assert json.loads((out / "best" / "fastcl_config.json").read_text())["training"]["step"] == best_step
    shutil.copytree(out / "best", out / ".best.pending")
    config = json.loads((out / ".best.pending" / "fastcl_config.json").read_text())
    config["training"]["step"] = 99
    (out / ".best.pending" / "fastcl_config.json").write_text(json.dumps(config))
    assert cli.main(_args(ws, out, "--resume")) == 0
    assert not (out / ".best.pending").exists() and _tree(out / "best") == before
    _assert_equal_weights(straight, out)
    assert _log_steps(out) == _log_steps(straight)


def test_a_second_ctrl_c_between_the_update_and_the_step_counter_writes_nothing(ws, straight, capsys,
                                                                                  monkeypatch):
    """The second Ctrl-C lands after the optimizer has updated the weights for step 5 but
    before the step is counted: nothing is written, so the resumed run applies step 5
    once, from the checkpoint of step 4."""
    out = ws / "double-ctrl-c"
    real = torch.amp.GradScaler.update
    calls = {"n": 0}

    def update(self, *args, **kwargs):  # runs after optimizer.step(), before the counter moves
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "update", update)
    assert cli.main(_args(ws, out)) == 130
    err = capsys.readouterr().err
    assert "aborted: nothing written; --resume continues from the checkpoint of step 4" in err
    monkeypatch.undo()
    assert read_checkpoint(out / "checkpoint" / "state.pt")["step"] == 4
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["state.pt"]
    assert cli.main(_args(ws, out, "--resume")) == 0
    _assert_equal_weights(straight, out)
    assert _log_steps(out) == _log_steps(straight)  # steps 5 of the aborted run were cut from the log


def test_resume_below_the_checkpoints_step_is_refused(ws, straight, tmp_path, capsys):
    import shutil

    out = tmp_path / "done"
    shutil.copytree(straight, out)
    before = _tree(out)
    assert cli.main(_args(ws, out, "--resume", steps=4)) == 2
    assert "the checkpoint is at step 6, past the 4 steps asked for" in _error_line(capsys)
    assert _tree(out) == before


def test_a_failed_start_leaves_no_empty_directory_and_no_lock(ws, straight, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    bad = tmp_path / "bad.csv"
    bad.write_text("sent0,sent1\na,b\n")
    assert cli.main(_args(ws, out) + ["--train-file", str(bad)]) == 2
    assert "batch size 8 is larger than the 1 rows" in _error_line(capsys)
    assert not out.exists()
    assert not (straight / ".fastcl.lock").exists()  # a finished run leaves the directory as it made it


def test_a_changed_training_file_or_a_missing_device_is_refused(ws, straight, tmp_path, capsys):
    import shutil

    out = tmp_path / "changed"
    shutil.copytree(straight, out)
    data = tmp_path / "wiki.txt"
    data.write_text((ws / "wiki40.txt").read_text() + "one more line\n")
    args = _args(ws, out, "--resume", steps=8)
    args[args.index("--train-file") + 1] = str(data)
    state = read_checkpoint(out / "checkpoint" / "state.pt")
    state["config"]["train_file"] = str(data)  # the same path, other content
    torch.save(state, out / "checkpoint" / "state.pt")
    assert cli.main(args) == 2
    assert "has changed since the checkpoint (40 rows" in _error_line(capsys)
    for device, message in (("gpu", "--device 'gpu' is not a device"), ("cuda:7", "--device cuda:7: ")):
        if device.startswith("cuda") and torch.cuda.device_count() > 7:
            continue
        assert cli.main(_args(ws, tmp_path / "dev", "--device", device)) == 2
        assert message in _error_line(capsys)


def test_training_on_from_a_saved_model_starts_from_its_head(ws, straight, tmp_path):
    """The "before" scores of a run that trains on from a saved model are that model's
    "after" scores: the same embeddings, its MLP head included (not a fresh one)."""
    first = tmp_path / "first"
    assert cli.main(_args(ws, first, steps=3) + ["--mlp", "auto"]) == 0  # cls with its MLP at inference
    second = tmp_path / "second"
    assert cli.main(_args(ws, second, steps=1, model=first) + ["--mlp", "auto"]) == 0
    after, before = (json.loads((d / "results.json").read_text()) for d in (first, second))
    assert before["before"]["stsb_dev"] == pytest.approx(after["after"]["stsb_dev"], abs=1e-9)
    assert before["before"]["stsb_test"] == pytest.approx(after["after"]["stsb_test"], abs=1e-9)


def test_a_second_ctrl_c_during_a_checkpoint_write_lets_the_file_finish(ws, straight, capsys, monkeypatch):
    """Inside torch.save an exception raised by a signal handler breaks its zip writer (a
    RuntimeError): the second Ctrl-C waits for the file to be whole, then the run stops."""
    out = ws / "ctrl-c-in-save"
    real = checkpoint_module.torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of step 3 (after 2: every 2 steps, and at each new best)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    assert cli.main(_args(ws, out)) == 130
    err = capsys.readouterr().err
    assert "aborted: nothing written; --resume continues from the checkpoint of step 3" in err, err
    monkeypatch.undo()
    assert read_checkpoint(out / "checkpoint" / "state.pt")["step"] == 3
    assert [p.name for p in (out / "checkpoint").iterdir()] == ["state.pt"]
    assert (out / "best").is_dir() and not (out / ".best.pending").exists()  # the checkpoint names it
    assert cli.main(_args(ws, out, "--resume")) == 0
    _assert_equal_weights(straight, out)
    assert _log_steps(out) == _log_steps(straight)
