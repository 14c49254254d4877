"""benchmarks/bench.py end to end, on tiny CPU sizes, in a subprocess (about 10 s).

The run includes a hidden implementation with a planted 10% error in one gradient and an
exact loss: the agreement check must flag it, on that gradient alone, while the real
implementations agree with the float64 reference. Peers that are not installed (or need
CUDA) must be reported with a reason, not crash the run.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench.py"
SIZES = (48, 96)
IMPLS = ("fastcl", "fastcl-torch", "dense", "cce")


def _run_bench(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # conftest sets TRITON_INTERPRET for the in-process tests; with it, fastcl's "auto"
    # backend would pick the (slow) interpreted kernels instead of the CPU path.
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(BENCH), "--device", "cpu", "--sizes", ",".join(map(str, SIZES)),
           "--dim", "32", "--dtype", "fp32", "--impls", ",".join(IMPLS), "--plant-error",
           "--repeats", "3", "--min-repeats", "2", "--warmup", "1", "--threads", "1",
           "--out", str(out), "--run-id", "test-run", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _run_bench(out)
    assert proc.returncode == 0, f"bench.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads((out / "test-run.json").read_text())
    return out, proc, data


def _result(data, impl, n):
    [r] = [r for r in data["results"] if r["impl"] == impl and r["n"] == n]
    return r


def test_json_records_the_run(bench_run):
    _, _, data = bench_run
    assert data["schema"] == "fastcl-bench/1"
    assert data["complete"] and not data["interrupted"] and data["fatal"] is None
    env = data["environment"]
    for key in ("torch", "triton", "python", "platform", "git_commit", "device_name"):
        assert env[key], key
    assert env["device_type"] == "cpu" and env["gpu_name"] is None
    assert "--plant-error" in data["command"] and data["date"]
    cfg = data["config"]
    assert cfg["sizes"] == list(SIZES) and cfg["dims"] == [32] and cfg["dtype"] == "float32"
    assert cfg["tolerances"] == {"loss": 1e-5, "grad": 1e-4}
    # one result per implementation and size, planted error included
    assert {(r["impl"], r["n"]) for r in data["results"]} == \
        {(i, n) for i in (*IMPLS, "planted-error") for n in SIZES}


def test_real_implementations_agree_and_are_timed(bench_run):
    _, _, data = bench_run
    for impl in ("fastcl", "fastcl-torch", "dense"):
        for n in SIZES:
            r = _result(data, impl, n)
            assert r["status"] == "ok", (impl, n, r["reason"])
            assert r["m"] == n and r["d"] == 32
            a = r["agreement"]
            assert a["checked"] and a["ok"]
            assert a["loss_rel_err"] < 1e-5
            assert set(a["grad_rel_err"]) == {"anchors", "positives"}
            assert max(a["grad_rel_err"].values()) < 1e-4
            t = r["time_ms"]
            assert 2 <= t["runs"] <= 3
            assert 0 < t["min"] <= t["median"] <= t["max"]
            assert r["tflops_8nmd"] == pytest.approx(8 * n * n * 32 / (t["median"] * 1e-3) / 1e12)
            assert r["peak_extra_bytes"] > 0 and r["peak_method"]
    assert _result(data, "fastcl-torch", 96)["backend"] == "torch"
    assert _result(data, "dense", 96)["tflops_real"] == pytest.approx(_result(data, "dense", 96)["tflops_8nmd"] * 6 / 8)


def test_memory_sees_the_dense_logits(bench_run):
    # The dense loss holds several N x M fp32 matrices; the chunked path none.
    _, _, data = bench_run
    n = SIZES[-1]
    assert _result(data, "dense", n)["peak_extra_bytes"] > 2 * n * n * 4


def test_planted_error_is_flagged_on_its_gradient_only(bench_run):
    _, proc, data = bench_run
    for n in SIZES:
        r = _result(data, "planted-error", n)
        assert r["status"] == "disagrees"
        a = r["agreement"]
        assert a["checked"] and not a["ok"]
        assert a["loss_rel_err"] < 1e-5  # the loss is exact
        assert a["grad_rel_err"]["anchors"] < 1e-4
        assert a["grad_rel_err"]["positives"] == pytest.approx(0.1, rel=1e-3)
        assert "dpositives" in r["reason"] and "anchors" not in r["reason"]
        assert r["time_ms"] is not None  # timed, but flagged
    assert "DISAGREES" in proc.stdout
    md = (bench_run[0] / "test-run.md").read_text()
    assert "✗" in md and "planted-error" in md


def test_peer_that_cannot_run_is_reported(bench_run):
    _, _, data = bench_run
    for n in SIZES:
        r = _result(data, "cce", n)
        # not installed in CI; where it is installed, it still needs CUDA
        assert r["status"] in ("unavailable", "unsupported")
        assert r["reason"] and r["time_ms"] is None


def test_outputs_say_cpu(bench_run):
    out, proc, data = bench_run
    assert "CPU RUN" in proc.stdout
    md = (out / "test-run.md").read_text()
    assert "CPU run" in md and "| 96 | 96 |" in md
    if importlib.util.find_spec("matplotlib") is None:
        assert data["plots"].startswith("skipped")
    else:
        assert sorted(data["plots"]) == ["test-run-memory.png", "test-run-time.png"]
        for name in data["plots"]:
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hard_negatives_shape_and_chunked_reference(tmp_path):
    # M = 2N, and a reference too large for the dense path (forced with a 0 GiB budget)
    proc = _run_bench(tmp_path, "--hard", "--sizes", "40", "--no-plots", "--no-memory",
                      "--ref-dense-max-gib", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "test-run.json").read_text())
    r = _result(data, "fastcl", 40)
    assert r["m"] == 80 and r["status"] == "ok"
    assert r["agreement"]["reference"].startswith("fastcl backend='torch'")
    assert set(r["agreement"]["grad_rel_err"]) == {"anchors", "positives", "hard_negatives"}
    assert _result(data, "dense", 40)["agreement"]["max_grad_rel_err"] < 1e-4
    assert _result(data, "planted-error", 40)["status"] == "disagrees"


def test_reference_limit_leaves_cases_unchecked(tmp_path):
    proc = _run_bench(tmp_path, "--sizes", "40", "--impls", "dense", "--no-plots", "--no-memory",
                      "--ref-max-flops", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "test-run.json").read_text())
    r = _result(data, "dense", 40)
    assert r["status"] == "unchecked" and "ref-max-flops" in r["reason"]
    assert r["time_ms"]["median"] > 0
    assert _result(data, "planted-error", 40)["status"] == "unchecked"
