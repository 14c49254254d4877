"""The tuner's measuring step (benchmarks/tune.py measure), run in Triton's interpreter at
tiny sizes: a check of the code that picks the GPU's launch configurations, which
otherwise runs only on a GPU."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import tune  # noqa: E402

SMALL = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, BLOCK_D_OUT=16, num_warps=1, num_stages=1)
WIDE = dict(SMALL, BLOCK_N=32)
BROKEN = dict(SMALL, BLOCK_M=12)  # not a power of two: Triton refuses it


@pytest.mark.parametrize("kernel", ["forward", "one_pass_logits"])
def test_measure_picks_a_correct_candidate_and_records_the_ones_that_fail(tmp_path, kernel):
    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps(dict(candidates={kernel: {"half": {"24": [
        dict(config=SMALL), dict(config=BROKEN), dict(config=WIDE)]}}})))
    table, log = tmp_path / "sm90.json", tmp_path / "log.json"
    tune.main(["measure", "--device", "cpu", "--candidates", str(candidates), "--n", "40", "--dims", "24",
               "--families", "half", "--kernels", kernel, "--jobs", "1", "--write", str(table), "--log", str(log)])
    chosen = json.loads(table.read_text())["configs"][kernel]["half"]["24"]
    assert chosen in (SMALL, WIDE)
    results = {json.dumps(r["config"]): r for r in json.loads(log.read_text())["runs"][0]["results"]}
    assert results[json.dumps(SMALL)]["correct"] and results[json.dumps(WIDE)]["correct"]
    broken = results[json.dumps(BROKEN)]
    assert not broken["correct"] and broken["error"]


def test_measure_writes_no_table_when_nothing_runs(tmp_path, capsys):
    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps(dict(candidates={"forward": {"half": {"24": [dict(config=BROKEN)]}}})))
    table = tmp_path / "sm90.json"
    tune.main(["measure", "--device", "cpu", "--candidates", str(candidates), "--n", "40", "--dims", "24",
               "--families", "half", "--kernels", "forward", "--jobs", "1", "--write", str(table)])
    assert not table.exists()
    assert "no candidate ran correctly" in capsys.readouterr().out


def test_the_gpu_measure_refuses_the_interpreter():
    with pytest.raises(SystemExit):
        tune.main(["measure", "--candidates", "unused.json"])


def test_measure_follows_the_order_asked_and_keeps_each_kernels_result(tmp_path):
    # A run cut short keeps the kernels measured first: they are those asked for first.
    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps(dict(candidates={k: {"half": {"24": [dict(config=SMALL)]}}
                                                      for k in ("forward", "one_pass_logits")})))
    table, log = tmp_path / "sm90.json", tmp_path / "log.json"
    tune.main(["measure", "--device", "cpu", "--candidates", str(candidates), "--n", "40", "--dims", "24",
               "--families", "half", "--kernels", "one_pass_logits", "forward", "--jobs", "1",
               "--write", str(table), "--log", str(log)])
    assert [run["kernel"] for run in json.loads(log.read_text())["runs"]] == ["one_pass_logits", "forward"]
    assert set(json.loads(table.read_text())["configs"]) == {"one_pass_logits", "forward"}
    assert not list(tmp_path.glob("*.tmp"))
