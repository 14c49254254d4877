"""The evaluator: SentEval's file formats, SimCSE's "all" aggregation, errors that name the
file and line, the command line, and the correctness anchor (all-MiniLM-L6-v2, mean
pooling, STS-B test Spearman 82.03 on the real file)."""

import json
import zlib

import pytest
import torch
from scipy import stats

from fastcl.evaluate import (
    DataFormatError, evaluate, find_tasks, load_sick_split, load_sts_year, load_stsb_split, main,
)

from .train_support import STSB, save_tiny_bert


def bag_of_words(sentences):
    """A deterministic stand-in encoder: sum of fixed random vectors per word."""
    rows = []
    for s in sentences:
        v = torch.zeros(16, dtype=torch.float64)
        for w in s.split():
            v += torch.randn(16, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())), dtype=torch.float64)
        rows.append(v)
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


PAIRS = [("a man plays a guitar", "a man is playing the guitar", 4.6),
         ("a woman slices an onion", "a man plays the flute", 0.2),
         ("the cat sleeps on the sofa", "a cat is sleeping on a couch", 4.2),
         ("two dogs run in the park", "dogs are running outside", 3.8),
         ("a plane takes off", "the stock market fell", 0.0),
         ("children play football", "kids are playing soccer", 4.4),
         ("a chef cooks pasta", "someone is cooking noodles", 3.5)]


def write_sts_year(root, year, subsets, blank_gold_at=None):
    d = root / f"{year}-en-test"
    d.mkdir(parents=True)
    for k, name in enumerate(subsets):
        pairs = PAIRS[k:] + PAIRS[:k]
        (d / f"STS.input.{name}.txt").write_text("".join(f"{a}\t{b}\n" for a, b, _ in pairs))
        gold = [f"{s}" for _, _, s in pairs]
        if blank_gold_at is not None and k == 0:
            gold[blank_gold_at] = ""
        (d / f"STS.gs.{name}.txt").write_text("\n".join(gold) + "\n")
    return d


def write_stsb(root, rows=PAIRS):
    d = root / "STSBenchmark"
    d.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (d / f"sts-{split}.csv").write_text("".join(
            f"main-captions\tMSRvid\t2012test\t{i:04d}\t{s:.3f}\t{a}\t{b}\n" for i, (a, b, s) in enumerate(rows)))
    return d


def write_sick(root):
    d = root / "SICK"
    d.mkdir(parents=True)
    body = "".join(f"{i}\t{a}\t{b}\t{1 + s * 0.8:.1f}\tNEUTRAL\n" for i, (a, b, s) in enumerate(PAIRS))
    (d / "SICK_test_annotated.txt").write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\t"
                                               "entailment_judgment\n" + body)
    return d


def _expected_spearman(pairs):
    cos = [float((bag_of_words([a]) * bag_of_words([b])).sum()) for a, b, _ in pairs]
    return 100 * stats.spearmanr(cos, [s for _, _, s in pairs]).correlation


def test_sts_year_all_is_spearman_of_the_concatenation(tmp_path):
    d = write_sts_year(tmp_path / "STS", "STS12", ["MSRpar", "MSRvid", "extra"], blank_gold_at=2)
    sets = load_sts_year(d, "STS12")
    assert [s.name for s in sets] == ["STS12/MSRpar", "STS12/MSRvid", "STS12/extra"]  # SentEval's order first
    assert len(sets[0]) == len(PAIRS) - 1  # the pair with a blank gold score is dropped
    assert PAIRS[2][0] not in sets[0].sent1
    results = evaluate(bag_of_words, tmp_path, geometry=False, log=lambda m: None)
    assert set(results["tasks"]) == {"STS12"}
    assert "STS13" in results["missing"] and "SICKRelatedness" in results["missing"]
    concatenated = []
    for k in range(3):
        pairs = PAIRS[k:] + PAIRS[:k]
        concatenated += [p for i, p in enumerate(pairs) if not (k == 0 and i == 2)]
    details = results["tasks"]["STS12"]["details"]
    assert results["tasks"]["STS12"]["spearman"] == pytest.approx(_expected_spearman(concatenated), abs=1e-9)
    subset_scores = [details[f"STS12/{n}"]["spearman"] for n in ("MSRpar", "MSRvid", "extra")]
    # "all" is not the mean of the subsets (the point of SimCSE's aggregation)
    assert details["all"]["spearman_mean"] == pytest.approx(sum(subset_scores) / 3)


def test_all_seven_tasks_and_average(tmp_path):
    for year in ("STS12", "STS13", "STS14", "STS15", "STS16"):
        write_sts_year(tmp_path / "STS", year, ["headlines"])
    write_stsb(tmp_path / "STS")
    write_sick(tmp_path)
    results = evaluate(bag_of_words, tmp_path, log=lambda m: None)
    assert results["missing"] == [] and results["average_over"] == 7
    scores = [t["spearman"] for t in results["tasks"].values()]
    assert results["average"] == pytest.approx(sum(scores) / 7)
    assert results["tasks"]["STSBenchmark"]["spearman"] == pytest.approx(_expected_spearman(PAIRS), abs=1e-9)
    sick_scores = [round(1 + s * 0.8, 1) for _, _, s in PAIRS]  # a monotone map of the same scores
    assert results["tasks"]["SICKRelatedness"]["spearman"] == pytest.approx(_expected_spearman(PAIRS), abs=1e-9)
    assert sorted(sick_scores) == sorted(load_sick_split(tmp_path / "SICK" / "SICK_test_annotated.txt").scores)
    g = results["geometry"]
    assert g["n_positive_pairs"] == sum(s > 4 for _, _, s in PAIRS)
    assert g["alignment"] > 0 and g["uniformity"] < 0


def test_real_stsb_files_load():
    test, dev = load_stsb_split(STSB / "sts-test.csv"), load_stsb_split(STSB / "sts-dev.csv")
    assert (len(test), len(dev)) == (1379, 1500)
    assert test.sent1[0] == "a girl is styling her hair ." and test.scores[0] == 2.5
    assert all(0 <= s <= 5 for s in test.scores + dev.scores)
    assert find_tasks(STSB.parent.parent)["STSBenchmark"] == STSB


def test_errors_name_file_and_line(tmp_path):
    d = write_stsb(tmp_path)
    bad = d / "sts-test.csv"
    lines = bad.read_text().splitlines()
    lines[3] = "main-captions\tMSRvid\t2012test\t0003\t4.0\tonly one sentence"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"sts-test\.csv:4: expected 7 tab-separated columns.*got 6"):
        load_stsb_split(bad)
    lines[3] = "main-captions\tMSRvid\t2012test\t0003\tfour\ta\tb"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"sts-test\.csv:4: gold score 'four' is not a number"):
        load_stsb_split(bad)
    y = write_sts_year(tmp_path, "STS13", ["FNWN"])
    (y / "STS.gs.FNWN.txt").write_text("1\n2\n")
    with pytest.raises(DataFormatError, match=r"STS\.input\.FNWN\.txt has 7 lines but .*STS\.gs\.FNWN\.txt has 2"):
        load_sts_year(y, "STS13")
    with pytest.raises(FileNotFoundError, match="no STS task found"):
        evaluate(bag_of_words, tmp_path / "STS13-en-test")


def test_cli_on_a_tiny_model(tmp_path, capsys):
    data = tmp_path / "data"
    write_sts_year(data / "STS", "STS16", ["answer-answer", "headlines"])
    write_stsb(data / "STS")
    model = save_tiny_bert(tmp_path / "tiny")
    out, plot = tmp_path / "r.json", tmp_path / "spectrum.png"
    code = main(["--model", str(model), "--data-dir", str(data), "--pooler", "avg", "--output", str(out),
                 "--plot", str(plot)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "STS16" in printed and "STSB" in printed and "Avg.(2)" in printed and "alignment" in printed
    results = json.loads(out.read_text())
    assert set(results["tasks"]) == {"STS16", "STSBenchmark"} and results["pooler"] == "avg"
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["--model", str(model), "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_minilm_anchor_stsb_test(capsys):
    """all-MiniLM-L6-v2 with mean pooling: 82.03 Spearman on STS-B test, measured independently."""
    assert main(["--data-dir", str(STSB.parent), "--tasks", "STSBenchmark", "--no-geometry"]) == 0
    printed = capsys.readouterr()
    assert "pooler: avg" in printed.err  # read from the package's 1_Pooling/config.json
    value = float(printed.out.splitlines()[2].split("|")[1])
    assert abs(value - 82.03) <= 0.05, value


def test_a_task_with_a_file_missing_is_incomplete_and_the_others_are_evaluated(tmp_path, capsys):
    """SimCSE's "all" over fewer subsets would be another number: the task is not scored."""
    data = tmp_path / "data"
    y12 = write_sts_year(data, "STS12", ["MSRpar", "MSRvid"])
    (y12 / "STS.gs.MSRvid.txt").unlink()
    y13 = write_sts_year(data, "STS13", ["FNWN", "headlines"])
    (y13 / "STS.input.headlines.txt").unlink()
    write_sts_year(data, "STS14", ["images"])
    write_stsb(data)
    results = evaluate(bag_of_words, data, log=lambda m: None)
    assert set(results["tasks"]) == {"STS14", "STSBenchmark"} and results["average_over"] == 2
    assert set(results["incomplete"]) == {"STS12", "STS13"}
    assert results["incomplete"]["STS12"].endswith("STS.gs.MSRvid.txt missing")
    assert results["incomplete"]["STS13"].endswith("STS.input.headlines.txt missing")
    assert "geometry" in results
    model = save_tiny_bert(tmp_path / "tiny")
    assert main(["--model", str(model), "--data-dir", str(data), "--pooler", "avg", "--no-geometry"]) == 0
    printed = capsys.readouterr().out
    assert "incomplete (not evaluated): STS12: " in printed and "STS14 |   STSB | Avg.(2) |" in printed
    # Nothing left to evaluate: one line naming why.
    with pytest.raises(DataFormatError, match="no task could be evaluated: STS12: .*STS.gs.MSRvid.txt missing"):
        evaluate(bag_of_words, data, tasks=["STS12"], log=lambda m: None)


@pytest.mark.parametrize("flag", ["--output", "--plot"])
def test_an_output_that_cannot_be_written_is_refused_before_evaluating(tmp_path, capsys, monkeypatch, flag):
    import fastcl.encoder

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(fastcl.encoder, "load_encoder", never)
    data = tmp_path / "data"
    write_stsb(data)
    (tmp_path / "a-file").write_text("x")
    for target, message in ((tmp_path / "a-file" / "r.json", f"cannot write there ({tmp_path / 'a-file'} is a file"),
                            (tmp_path, "is a directory; give a file name")):
        assert main(["--data-dir", str(data), flag, str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} {target}") and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1


def test_model_folder_errors_are_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    write_stsb(data)
    empty = tmp_path / "empty"
    empty.mkdir()
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes(b"")
    for model, message in ((empty, "is not a model directory: it is empty"),
                           (weights_only, "is not a model directory: it has no config.json"),
                           (weights_only / "model.safetensors", "is a file, not a model directory"),
                           (tmp_path / "nowhere", "does not exist")):
        assert main(["--model", str(model), "--data-dir", str(data)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_invalid_utf8_in_an_sts_file_names_line_and_byte(tmp_path):
    d = write_stsb(tmp_path, rows=PAIRS * 300)  # ~ 100 KB
    path = d / "sts-test.csv"
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    k = 1505  # a line with "guitar" (PAIRS[0])
    lines[k] = lines[k].replace(b"guitar", b"guit\xe4r")
    path.write_bytes(b"\n".join(lines))
    offset = len(b"\n".join(lines[:k])) + 1 + lines[k].index(b"\xe4")
    assert offset > 8192
    with pytest.raises(DataFormatError, match=rf"sts-test\.csv:{k + 1}: not valid UTF-8 at byte {offset} "):
        load_stsb_split(path)


def test_ctrl_c_during_evaluation_writes_nothing(tmp_path, capsys, monkeypatch):
    import fastcl.encoder

    data = tmp_path / "data"
    write_stsb(data)
    model = save_tiny_bert(tmp_path / "tiny")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastcl.encoder.Encoder, "encode", interrupted)
    out = tmp_path / "r.json"
    assert main(["--model", str(model), "--data-dir", str(data), "--pooler", "avg", "--output", str(out)]) == 130
    assert "interrupted: nothing written" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))
