"""The GPU runner (python -m benchmarks.gpu) end to end on the CPU: a dry run of every
stage at tiny sizes in the interpreter, a stage that fails and one that overruns its
budget, and the pieces the dry run cannot reach (targets at real sizes, NaN errors in a
test's output, wheels)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _runner(out: Path, *extra: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)  # the runner sets it for its stages
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", str(out), "--dry-run", *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - t0


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry-run")
    proc, seconds = _runner(out, "--budget-s", "300")
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, proc, seconds


def test_every_stage_runs_and_leaves_its_files(dry_run):
    out, proc, _ = dry_run
    runner = _json(out / "runner.json")
    assert [(s["name"], s["status"]) for s in runner["stages"]] == [
        ("environment", "done"), ("correctness", "done"), ("speed", "done"), ("training", "done"), ("extra", "done")]
    for s in runner["stages"]:
        assert (out / s["log"]).exists() and s["seconds"] <= s["budget_s"]
        assert _json(out / f"{s['number']}-{s['name']}.json")["status"] == "done"
    # the summary is what a reader sees last: the stage table, then the targets
    tail = proc.stdout.strip().splitlines()
    assert any(line.startswith("| 5 extra | done |") for line in tail)
    assert "| target | measured | result |" in proc.stdout
    assert (out / "summary.md").read_text().strip() in proc.stdout


def test_environment_and_kernels(dry_run):
    stage = _json(dry_run[0] / "1-environment.json")
    env = stage["environment"]
    assert env["torch"] and env["triton"] and env["python"] and env["git_commit"]
    assert env["variables"]["TRITON_INTERPRET"] == "1"
    kernels = stage["kernels"]
    assert kernels and all(k["status"] == "ok" for k in kernels), kernels
    assert {k["strategy"] for k in kernels} == {"slab", "workspace", "one_pass"}
    assert stage["workers"] == 2  # the cases ran in the pool of processes, as on a GPU
    assert all(math.isfinite(e) and e < 1e-4 for k in kernels for e in k["errors"].values())


def test_correctness_records_each_test(dry_run):
    out = dry_run[0]
    stage = _json(out / "2-correctness.json")
    assert stage["counts"].get("passed", 0) >= 2 and not stage["counts"].get("failed")
    assert all(t["outcome"] == "passed" for t in stage["tests"])
    assert "<testsuite" in (out / "2-correctness.junit.xml").read_text()


def test_speed_runs_every_strategy_and_agrees(dry_run):
    out = dry_run[0]
    for name in ("main", "large", "hard"):
        data = _json(out / f"3-speed-{name}.json")
        assert data["schema"] == "fastcl-bench/1" and data["complete"]
        assert (out / f"3-speed-{name}.md").exists()
    main = _json(out / "3-speed-main.json")
    impls = {r["impl"] for r in main["results"] if r["status"] == "ok"}
    assert {"fastcl", "fastcl-slab", "fastcl-workspace", "dense"} <= impls
    assert {r["status"] for r in main["results"] if r["impl"] in ("memeff", "inf-cl", "cce")} <= {"unavailable",
                                                                                                    "unsupported"}
    assert all(r["m"] == 2 * r["n"] for r in _json(out / "3-speed-hard.json")["results"])


def test_training_and_extra(dry_run):
    out = dry_run[0]
    training = _json(out / "4-training.json")
    [run] = training["runs"]
    assert run["status"] == "done" and run["steps"] == 4 and run["sentences_per_s"] > 0
    extra = _json(out / "5-extra.json")
    names = {r["name"]: r for r in extra["runs"]}
    assert names["cuda-suite"]["status"] == "skipped: GPU only"
    for name in ("nt_xent", "groups", "hard7", "gte", "guide", "small", "dims", "fp32"):
        assert names[name]["status"] == "done", names[name]
        assert _json(out / f"5-extra-{name}.json")["complete"]
    # The sentence-transformers loss step, in its own process: every implementation ran
    # and fastcl's loss equals sentence-transformers' on the same embeddings.
    for name, stem in (("st", "loss_step"), ("st-gist", "loss_step_gist")):
        assert names[name]["status"] == "done", names[name]
        rows = _json(out / f"5-extra-{name}" / f"{stem}.json")["results"]
        assert rows and all(r["status"] == "ok" for r in rows), rows
        for n, k in {(r["n"], r["k"]) for r in rows}:
            losses = {r["impl"]: r["loss"] for r in rows if (r["n"], r["k"]) == (n, k)}
            assert abs(losses["fastcl"] - losses["st"]) <= 1e-5 * abs(losses["st"]), losses
        assert (out / f"5-extra-{name}" / f"{stem}.md").exists()


def test_a_failing_stage_is_recorded_and_an_overrun_is_cut(tmp_path):
    budget = 20.0
    proc, seconds = _runner(tmp_path, "--stages", "environment,training", "--budget-s", str(budget),
                            "--inject-failure", "environment", "--inject-hang", "training")
    assert proc.returncode == 1, proc.stdout[-3000:]
    stages = {s["name"]: s for s in _json(tmp_path / "runner.json")["stages"]}
    assert stages["environment"]["status"] == "failed"
    assert "failure injected" in stages["environment"]["reason"]
    assert _json(tmp_path / "1-environment.json")["status"] == "failed"
    # the next stage runs; it hangs ignoring SIGINT, and is killed at its budget
    assert stages["training"]["status"] == "timeout"
    assert stages["training"]["seconds"] <= stages["training"]["budget_s"] + 1.0
    assert seconds < budget + 5  # the whole run stays within its budget (plus start-up)
    assert "| 4 training | timeout |" in proc.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_without_a_gpu_it_says_so(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------ what the dry run cannot reach


def _bench_json(path: Path, rows) -> None:
    results = [{"impl": impl, "n": n, "d": 768, "status": status, "reason": None,
                "time_ms": {"median": ms} if ms is not None else None, "peak_extra_gib": gib}
               for impl, n, status, ms, gib in rows]
    path.write_text(json.dumps({"results": results}))


def test_targets_are_read_from_the_speed_results(tmp_path):
    from benchmarks.gpu.summary import targets

    _bench_json(tmp_path / "3-speed-main.json", [
        ("fastcl", 16384, "ok", 9.5, 0.1), ("compiled", 16384, "ok", 10.0, 3.0),
        ("fastcl", 65536, "unchecked", 40.0, 0.9), ("compiled", 65536, "oom", None, None)])
    _bench_json(tmp_path / "3-speed-large.json", [("fastcl", 1048576, "unchecked", 9000.0, 6.0)])
    rows = {r["target"]: r for r in targets(tmp_path)}
    assert rows["fastcl <= 0.9x torch.compile(dense) at N=16384"]["result"] == "FAIL"
    assert rows["fastcl <= 0.9x torch.compile(dense) at N=16384"]["measured"].endswith("= 0.95x")
    assert rows["fastcl <= 0.9x torch.compile(dense) at N=65536"]["result"] == "NO DATA"
    assert "compiled: oom" in rows["fastcl <= 0.9x torch.compile(dense) at N=65536"]["measured"]
    assert rows["fastcl <= 35 ms at N=65536"]["result"] == "FAIL"
    assert rows["fastcl extra peak memory <= 1.5 GiB at N=65536"]["result"] == "PASS"
    assert rows["fastcl runs at N=1,048,576"]["result"] == "PASS"


def test_a_disagreeing_case_meets_no_target(tmp_path):
    from benchmarks.gpu.summary import targets

    _bench_json(tmp_path / "3-speed-main.json", [("fastcl", 65536, "disagrees", 1.0, 0.1)])
    rows = {r["target"]: r for r in targets(tmp_path)}
    assert rows["fastcl <= 35 ms at N=65536"]["result"] == "NO DATA"
    assert rows["fastcl runs at N=1,048,576"]["result"] == "NO DATA"


def test_printed_errors_are_recorded_and_nan_never_passes(tmp_path):
    from benchmarks.gpu.correctness import read_record

    record = tmp_path / "tests.jsonl"
    lines = [
        {"test": "t[ok]", "when": "call", "outcome": "passed", "seconds": 1.0,
         "stdout": "N=4096 D=768 bf16/highest unsupervised slab: loss 1.20e-03, anchors 3.40e-03\n"},
        {"test": "t[nan]", "when": "call", "outcome": "passed", "seconds": 1.0,
         "stdout": "N=4096 D=768 fp16/highest symmetric workspace: loss nan, anchors 1.00e-03\n"},
    ]
    record.write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"cut off")
    ok, bad = read_record(record)
    assert ok["outcome"] == "passed"
    assert ok["errors"] == {"N=4096 D=768 bf16/highest unsupervised slab": {"loss": 1.2e-3, "anchors": 3.4e-3}}
    assert bad["outcome"] == "failed" and "non-finite" in bad["message"]


def test_wheels_install_onto_the_path(tmp_path):
    from benchmarks.gpu.__main__ import install_wheels
    from benchmarks.gpu.wheels import requirements

    wheel = tmp_path / "wheels" / "fastcl_probe-0.1-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fastcl_probe/__init__.py", "VALUE = 42\n")
        z.writestr("fastcl_probe-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fastcl-probe\nVersion: 0.1\n"
                   "Requires-Dist: torch\nRequires-Dist: pytest ; extra == 'test'\n"
                   "Requires-Dist: pywin32 ; sys_platform == 'win32'\nRequires-Dist: tqdm>=4\n")
        z.writestr("fastcl_probe-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr("fastcl_probe-0.1.dist-info/RECORD", "")
    assert requirements(wheel) == ["torch", "tqdm"]
    site = tmp_path / "site"
    assert install_wheels(str(wheel.parent), site) == [wheel.name]
    probe = subprocess.run([sys.executable, "-c", "import fastcl_probe; print(fastcl_probe.VALUE)"],
                           env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True)
    assert probe.stdout.strip() == "42"


def test_wheels_command_names_the_target_machine():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu.wheels", "/tmp/unused", "--print"], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert proc.returncode == 0
    commands = proc.stdout.strip().splitlines()
    assert len(commands) == 3 and all("--only-binary=:all:" in c and "--python-version 3.12" in c and "--no-deps" in c
                                      for c in commands)
    assert [c.split()[-1] for c in commands] == ["memeff==0.3.1", "inf-cl==1.2.1", "cut-cross-entropy==25.1.1"]
