"""``python -m fastcl.train`` as real processes, stopped at random instants: SIGKILL (saves
included: a checkpoint every step), and Ctrl-C twice (the second one aborts). Each chain
of interrupted runs, resumed each time, must end exactly where one uninterrupted run
ends: the same weights, optimizer state, log (each step once) and scores; and no
temporary file may be left behind.

The instants are drawn from a fixed seed (reproducible), spread over the whole training
phase: steps, checkpoint writes, evaluations, the best model's installation and the
final model's. Startup dominates a run's time, so each kill waits for the line that
announces training and then a random delay.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from fastcl.train.checkpoint import read_checkpoint

from .train_support import REPO, free_port, train_workspace

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 9
TIMING = {"eval_seconds", "sentences_per_s", "elapsed_s"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return train_workspace(tmp_path_factory.mktemp("kill"), sts_rows=60)


class Run:
    """One training process; its stderr is read on a thread so that the test can wait for
    the line announcing the training loop."""

    def __init__(self, workspace, out) -> None:
        if (out / "checkpoint" / "state.pt").exists():
            self.mode = ["--resume"]
        elif out.exists() and any(out.iterdir()):
            self.mode = ["--overwrite"]  # killed before its first checkpoint
        else:
            self.mode = []
        cmd = [sys.executable, "-m", "fastcl.train", "--train-file", str(workspace / "wiki40.txt"),
               "--model", str(workspace / "tiny"), "--output-dir", str(out), "--batch-size", "8",
               "--max-steps", str(STEPS), "--save-steps", "1", "--eval-steps", "3", "--logging-steps", "1",
               "--learning-rate", "1e-3", "--warmup-steps", "2", "--eval-data-dir", str(workspace / "sts"),
               "--pooler", "cls", "--mlp-only-train", "--no-progress", *self.mode]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.lines, self.training = [], threading.Event()
        self.training_at = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("training "):
                self.training_at = time.monotonic()
                self.training.set()
        self.training.set()  # ended without training: nobody waits forever

    def signal(self, sig) -> bool:
        try:
            self.proc.send_signal(sig)
            return True
        except ProcessLookupError:
            return False

    def wait(self) -> int:
        rc = self.proc.wait(timeout=300)
        self.reader.join(timeout=30)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def straight(workspace):
    out = workspace / "straight"
    run = Run(workspace, out)
    assert run.wait() == 0, run.stderr[-3000:]
    return out, time.monotonic() - run.training_at  # the training phase's length


def _records(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "log.jsonl").read_text().splitlines()]


def _leftovers(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if ".tmp" in p.name or p.name in (".best.pending", "best.old") or p.name.startswith("rng-rank"))


def _assert_same_run(out, reference):
    """Bit-identical weights and optimizer state, the same log step by step, the same scores."""
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa, sb = read_checkpoint(reference / "checkpoint" / "state.pt"), read_checkpoint(out / "checkpoint" / "state.pt")
    assert sa["step"] == sb["step"] == STEPS and sa["best_step"] == sb["best_step"]
    for key in ("model", "optimizer"):
        for k, v in sa[key].items() if key == "model" else sa[key]["state"].items():
            w = sb[key][k] if key == "model" else sb[key]["state"][k]
            assert (torch.equal(v, w) if key == "model" else all(torch.equal(v[s], w[s]) for s in v)), (key, k)
    assert _records(out) == _records(reference)  # every step once, nothing of an abandoned future
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (reference, out))
    assert ra["after"] == rb["after"] and ra["before"] == rb["before"] and ra["best_step"] == rb["best_step"]
    assert _leftovers(out) == []
    for name in ("best", "checkpoint", "modules.json", "fastcl_config.json", "1_Pooling", "2_Normalize"):
        assert (out / name).exists(), name


def _interrupt_chain(workspace, straight, name, attempts, seed, interrupt, early=0.0, reach=1.0):
    """Start, interrupt after a random delay into the training phase, and start again
    (``--resume`` when a checkpoint is there) until ``attempts`` interruptions have
    landed; a run that ends by itself first ends its chain (checked against the
    uninterrupted run) and a new chain begins in a new directory."""
    reference, train_seconds = straight
    rng = random.Random(seed)
    outcomes, landed, chain = [], 0, 0
    out = workspace / f"{name}-{chain}"
    for _ in range(attempts + 8):
        run = Run(workspace, out)
        interrupting = landed < attempts
        if interrupting:
            if rng.random() < early:  # now and then during start-up, set-up and the first evaluation
                time.sleep(rng.uniform(0.0, 4.0))
            else:
                run.training.wait(timeout=120)
                done = read_checkpoint(out / "checkpoint" / "state.pt")["step"] if "--resume" in run.mode else 0
                time.sleep(rng.uniform(0.0, reach * train_seconds * (STEPS - done + 1) / (STEPS + 1)))
            interrupt(run, rng)
        rc = run.wait()
        outcomes.append((run.mode, rc))
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
        assert rc in (0, 130, -signal.SIGKILL, -signal.SIGTERM), (outcomes, run.stderr[-3000:])
        if (out / "checkpoint" / "state.pt").exists():
            state = read_checkpoint(out / "checkpoint" / "state.pt")  # whole, whatever the instant
            assert 0 <= state["step"] <= STEPS
        if rc != 0:
            landed += 1
            continue
        _assert_same_run(out, reference)
        if not interrupting:
            return outcomes
        chain += 1
        out = workspace / f"{name}-{chain}"
    raise AssertionError(f"the interruptions did not land: {outcomes}")


def test_sigkill_at_random_instants_resumes_exactly(workspace, straight):
    def kill(run, rng):
        run.signal(signal.SIGKILL)

    outcomes = _interrupt_chain(workspace, straight, "killed", attempts=10, seed=2024,
                                interrupt=kill, early=0.15, reach=1.1)
    killed = [rc for _, rc in outcomes if rc == -signal.SIGKILL]
    assert len(killed) >= 8, outcomes  # (a kill can also land as a run exits)
    assert sum(mode == ["--resume"] for mode, _ in outcomes) >= 4


def test_ctrl_c_twice_at_random_instants_never_applies_a_step_twice(workspace, straight):
    """The first Ctrl-C asks for a checkpoint at the end of the step; the second, a random
    moment later (often inside the step, between the optimizer's update and the step
    counter, or inside the checkpoint's write), aborts without writing anything."""
    def twice(run, rng):
        sig = signal.SIGINT if rng.random() < 0.75 else signal.SIGTERM
        if run.signal(sig):
            time.sleep(rng.choice([0.0, rng.uniform(0.0, 0.05), rng.uniform(0.0, 0.4)]))
            run.signal(sig)

    outcomes = _interrupt_chain(workspace, straight, "ctrl-c", attempts=6, seed=7,
                                interrupt=twice, reach=0.8)
    assert sum(rc in (130, -signal.SIGTERM) for _, rc in outcomes) >= 6, outcomes


def test_two_processes_killed_resume_exactly(workspace):
    """torchrun with 2 processes (gloo), dropout on: every rank's random states travel in
    the one checkpoint file (gathered to rank 0), so a run killed whole and resumed ends
    with the weights of the uninterrupted run."""

    def launch(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "fastcl.train", "--train-file", str(workspace / "wiki40.txt"),
               "--model", str(workspace / "tiny"), "--output-dir", str(out), "--batch-size", "8",
               "--max-steps", "8", "--save-steps", "1", "--logging-steps", "1", "--learning-rate", "1e-3",
               "--no-eval", "--no-progress", "--do-mlm", *extra]
        return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    straight = launch(workspace / "ddp-straight")
    err = straight.communicate(timeout=300)[1]
    assert straight.returncode == 0, err[-3000:]
    out = workspace / "ddp-killed"
    for attempt in range(6):  # kill the whole group once a checkpoint past step 2 is there
        run = launch(out, *(["--resume"] if (out / "checkpoint" / "state.pt").exists() else []))
        deadline = time.monotonic() + 120
        while run.poll() is None and time.monotonic() < deadline:
            try:
                if read_checkpoint(out / "checkpoint" / "state.pt")["step"] >= 2 + 2 * attempt:
                    break
            except Exception:  # noqa: BLE001 - not there yet (or being replaced)
                pass
            time.sleep(0.01)
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.communicate(timeout=60)
        if run.returncode == 0:
            break
    else:
        raise AssertionError("the resumed runs did not finish")
    assert attempt >= 1  # at least one kill, one resume
    state = read_checkpoint(out / "checkpoint" / "state.pt")
    assert state["world"] == 2 and len(state["ranks"]) == 2
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    a, b = load_file(str(workspace / "ddp-straight" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _records(out) == _records(workspace / "ddp-straight")
