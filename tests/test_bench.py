"""benchmarks/bench.py end to end, on tiny CPU sizes, in subprocesses.

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
            # what the call leaves allocated: at least the two input gradients
            assert 2 * n * 32 * 4 <= r["retained_bytes"] <= r["peak_extra_bytes"]
    assert _result(data, "fastcl-torch", 96)["backend"] == "chunked"
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


def test_guide_mask_case_agrees_with_the_float64_reference(tmp_path):
    # GISTEmbed / DCLR's guide mask: fastcl and the dense loss (the guide's matrix, masked)
    # against fastcl's dense float64 reference; peers without a guide are refused.
    proc = _run_bench(tmp_path, "--hard", "--guide-dim", "16", "--sizes", "40", "--no-plots", "--no-memory")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "test-run.json").read_text())
    assert data["config"]["guide_dim"] == 16
    for impl in ("fastcl", "fastcl-torch", "dense"):
        r = _result(data, impl, 40)
        assert r["status"] == "ok" and r["agreement"]["max_grad_rel_err"] < 1e-4, (impl, r)
    assert _result(data, "fastcl", 40)["agreement"]["reference"].startswith("fastcl.info_nce_reference")
    assert _result(data, "cce", 40)["status"] in ("unavailable", "unsupported")


def test_guide_rows_are_decided_alike_in_every_precision():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import torch
        from impls import Spec, guide_rows
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    spec = Spec(n=64, m=128, d=8, dtype=torch.float32, device=torch.device("cpu"), temperature=0.05, hard=True,
                symmetric=False, guide_dim=384)
    anchors, candidates, threshold = guide_rows(spec)
    assert threshold == 39 / 384
    cosines = [torch.nn.functional.normalize(anchors.to(dt), dim=-1) @ torch.nn.functional.normalize(
        candidates.to(dt), dim=-1).T for dt in (torch.float64, torch.float32, torch.bfloat16)]
    dropped = [c > threshold for c in cosines]
    assert torch.equal(dropped[0], dropped[1]) and torch.equal(dropped[0], dropped[2])
    assert 0.005 < dropped[0].double().mean() < 0.05  # some entries dropped, most kept
    # Every cosine is an even numerator over 384: at least 1/384 from the threshold.
    assert ((cosines[0] - threshold).abs() >= 1 / 384 - 1e-12).all()


def test_reference_limit_leaves_cases_unchecked(tmp_path):
    proc = _run_bench(tmp_path, "--sizes", "40", "--impls", "dense", "--no-plots", "--no-memory",
                      "--ref-max-flops", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "test-run.json").read_text())
    r = _result(data, "dense", 40)
    assert r["status"] == "unchecked" and "ref-max-flops" in r["reason"]
    assert r["time_ms"]["median"] > 0
    assert _result(data, "planted-error", 40)["status"] == "unchecked"


# ------------------------------------------------------------ --loss nt_xent and groups
#
# The same harness on the two other losses: NT-Xent (N pairs, 2N rows, each against the
# other 2N - 1) and token-level groups (N tokens in sequences of G, negatives within the
# sequence). Each mode's planted error must be flagged on its one wrong gradient.

NT_SIZES = (24, 48)
GROUP_SIZES, G = (32, 128), 8


@pytest.fixture(scope="module")
def nt_xent_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-nt-xent")
    proc = _run_bench(out, "--loss", "nt_xent", "--sizes", ",".join(map(str, NT_SIZES)),
                      "--impls", "fastcl,fastcl-torch,dense,memeff,inf-cl,cce")
    assert proc.returncode == 0, f"bench.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc, json.loads((out / "test-run.json").read_text())


@pytest.fixture(scope="module")
def groups_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-groups")
    proc = _run_bench(out, "--loss", "groups", "--group-size", str(G), "--sizes", ",".join(map(str, GROUP_SIZES)),
                      "--impls", "fastcl,fastcl-torch,dense,dense-masked,memeff,cce")
    assert proc.returncode == 0, f"bench.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc, json.loads((out / "test-run.json").read_text())


def _assert_agrees_and_timed(r, grad_names):
    assert r["status"] == "ok", (r["impl"], r["n"], r["reason"])
    a = r["agreement"]
    assert a["checked"] and a["ok"]
    assert a["loss_rel_err"] < 1e-5 and set(a["grad_rel_err"]) == set(grad_names)
    assert max(a["grad_rel_err"].values()) < 1e-4
    t = r["time_ms"]
    assert 2 <= t["runs"] <= 3 and 0 < t["min"] <= t["median"] <= t["max"]
    assert r["peak_extra_bytes"] > 0


def test_nt_xent_json_and_agreement(nt_xent_run):
    out, proc, data = nt_xent_run
    cfg = data["config"]
    assert data["complete"] and cfg["loss"] == "nt_xent" and cfg["group_size"] is None
    assert cfg["temperature"] == 0.1  # SimCLR's default, not InfoNCE's 0.05
    assert "2N" in cfg["flop_count"]
    for n in NT_SIZES:
        for impl in ("fastcl", "fastcl-torch", "dense"):
            r = _result(data, impl, n)
            _assert_agrees_and_timed(r, {"z1", "z2"})
            assert r["loss"] == "nt_xent" and r["m"] == 2 * n
            assert r["agreement"]["reference"] == "dense PyTorch NT-Xent in float64"
            assert r["flops"] == 8 * (2 * n) ** 2 * 32
            assert r["tflops"] == pytest.approx(r["flops"] / (r["time_ms"]["median"] * 1e-3) / 1e12)
            assert r["tflops_8nmd"] is None  # an InfoNCE-only field
        dense = _result(data, "dense", n)
        assert dense["tflops_real"] == pytest.approx(dense["tflops"] * 6 / 8)
        # every implementation is checked against the same reference loss
        assert len({_result(data, i, n)["agreement"]["reference_loss"] for i in ("fastcl", "dense")}) == 1
        bad = _result(data, "planted-error", n)
        assert bad["status"] == "disagrees"
        assert bad["agreement"]["grad_rel_err"]["z2"] == pytest.approx(0.1, rel=1e-3)
        assert bad["agreement"]["grad_rel_err"]["z1"] < 1e-4 and bad["agreement"]["loss_rel_err"] < 1e-5
        assert "dz2" in bad["reason"] and "dz1" not in bad["reason"]
        for peer in ("inf-cl", "cce"):  # no self-exclusion: unsupported whatever is installed
            r = _result(data, peer, n)
            assert r["status"] == "unsupported" and "own column" in r["reason"] and r["time_ms"] is None
        # memeff has NT-Xent (q-q negatives), but only on CUDA
        assert _result(data, "memeff", n)["status"] in ("unavailable", "unsupported")
    assert _result(data, "fastcl-torch", NT_SIZES[-1])["backend"] == "chunked"
    md = (out / "test-run.md").read_text()
    assert "NT-Xent" in md and "| N | rows 2N |" in md and f"| {NT_SIZES[-1]} | {2 * NT_SIZES[-1]} |" in md
    assert "TFLOP/s(8(2N)^2D)" in proc.stdout


def test_groups_json_and_agreement(groups_run):
    out, proc, data = groups_run
    cfg = data["config"]
    assert data["complete"] and cfg["loss"] == "groups" and cfg["group_size"] == G
    assert cfg["temperature"] == 0.05 and "8NGD" in cfg["flop_count"]
    for n in GROUP_SIZES:
        for impl in ("fastcl", "fastcl-torch", "dense", "dense-masked"):
            r = _result(data, impl, n)
            _assert_agrees_and_timed(r, {"anchors", "positives"})
            assert r["group_size"] == G and r["m"] == n
            assert r["agreement"]["reference"] == "dense PyTorch per sequence (torch.bmm) in float64"
            assert r["flops"] == 8 * n * G * 32  # the useful work only
        seconds = {i: _result(data, i, n)["time_ms"]["median"] * 1e-3
                   for i in ("dense", "dense-masked", "fastcl-torch")}
        # real work: per sequence 6NGD, masked 6N^2 D, fastcl's chunked path the whole 8N^2 D
        assert _result(data, "dense", n)["tflops_real"] == pytest.approx(6 * n * G * 32 / seconds["dense"] / 1e12)
        assert _result(data, "dense-masked", n)["tflops_real"] == pytest.approx(
            6 * n * n * 32 / seconds["dense-masked"] / 1e12)
        assert _result(data, "fastcl-torch", n)["tflops_real"] == pytest.approx(
            8 * n * n * 32 / seconds["fastcl-torch"] / 1e12)
        bad = _result(data, "planted-error", n)
        assert bad["status"] == "disagrees"
        assert bad["agreement"]["grad_rel_err"]["positives"] == pytest.approx(0.1, rel=1e-3)
        assert bad["agreement"]["grad_rel_err"]["anchors"] < 1e-4
        for peer in ("memeff", "cce"):
            r = _result(data, peer, n)
            assert r["status"] == "unsupported" and "group" in r["reason"]
    # the per-sequence loss holds B x G x G logits, the masked one several N x N
    n = GROUP_SIZES[-1]
    masked, batched = (_result(data, i, n)["peak_extra_bytes"] for i in ("dense-masked", "dense"))
    assert masked - batched > 2 * n * n * 4, (masked, batched)
    md = (out / "test-run.md").read_text()
    assert f"G = {G}" in md and "| N tokens | sequences |" in md and f"| {n} | {n // G} |" in md


@pytest.mark.parametrize("loss", ["nt_xent", "groups"])
def test_new_losses_with_the_chunked_reference(tmp_path, loss):
    # a reference too large for the dense form (forced with a 0 GiB budget): fastcl's
    # chunked path in float64, which the dense implementation must agree with
    extra = ["--group-size", "4"] if loss == "groups" else []
    proc = _run_bench(tmp_path, "--loss", loss, *extra, "--sizes", "24", "--impls", "dense", "--no-plots",
                      "--no-memory", "--ref-dense-max-gib", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "test-run.json").read_text())
    r = _result(data, "dense", 24)
    assert r["status"] == "ok" and r["agreement"]["reference"].startswith("fastcl backend='torch'")
    assert r["agreement"]["max_grad_rel_err"] < 1e-4
    assert _result(data, "planted-error", 24)["status"] == "disagrees"


def test_family_script_is_bench_with_its_loss(tmp_path):
    # benchmarks/bench_groups.py takes bench.py's options, its family fixed
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_groups.py"), "--device", "cpu",
                           "--sizes", "16", "--group-size", "4", "--dim", "8", "--impls", "dense", "--no-plots",
                           "--no-memory", "--repeats", "2", "--min-repeats", "2", "--warmup", "1", "--out",
                           str(tmp_path), "--run-id", "family"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "family.json").read_text())
    assert data["config"]["loss"] == "groups" and data["config"]["group_size"] == 4
    assert _result(data, "dense", 16)["status"] == "ok"


@pytest.mark.parametrize("extra, message", [
    (["--loss", "groups", "--group-size", "5", "--sizes", "24"], "multiple of --group-size"),
    (["--loss", "nt_xent", "--hard"], "InfoNCE options"),
    (["--group-size", "4"], "goes with --loss groups"),
    (["--guide-dim", "8", "--gte"], "not with --gte"),
    (["--loss", "nt_xent", "--guide-dim", "8"], "InfoNCE options"),
    (["--loss", "nt_xent", "--impls", "dense-masked"], "unknown implementation"),
])
def test_bad_loss_options_are_refused(tmp_path, capsys, monkeypatch, extra, message):
    # in-process: main() refuses these before it runs or writes anything
    spec = importlib.util.spec_from_file_location("bench_under_test", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--out", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
