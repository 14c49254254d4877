"""benchmarks/study.py: the recipe table's plan (equal budgets, tuning on STS-B dev first,
choices from finished runs, every command a valid trainer command). Nothing is trained:
finished runs are simulated by their results.json."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fastcl.train.cli import build_parser, config_from_args

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def study(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("study_under_test", REPO / "benchmarks" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study_under_test"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RUNS", tmp_path / "runs")
    yield module
    sys.modules.pop("study_under_test", None)


def _finish(study, name, dev):
    d = study.run_dir(name)
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"after": {"stsb_dev": dev}}))


def test_every_recipe_gets_the_same_budget(study):
    for recipe in study.RECIPES:
        s = study.schedule(recipe)
        per_row = 3 if recipe.data == "sup" else 1
        assert study.BUDGET - recipe.batch * per_row < s["sentences"] <= study.BUDGET, recipe.name
        assert s["sentences"] == s["steps"] * recipe.batch * per_row
        assert 1 <= s["geometry"] <= s["eval"] <= s["steps"]
    assert study.schedule(study.BY_NAME["infonce-b4096"])["steps"] == 1
    assert study.schedule(study.BY_NAME["unsup-avg"])["steps"] == 64


def test_tuning_runs_first_then_choices_from_dev(study):
    runs, chosen, complete = study.plan()
    assert not complete and chosen == {}
    assert [n for n, _ in runs] == [f"unsup-avg_lr{lr:g}_s42" for lr in study.TUNING["lr"]]
    for lr, dev in zip(study.TUNING["lr"], (85.0, 87.5, 86.0)):
        _finish(study, f"unsup-avg_lr{lr:g}_s42", dev)
    runs, chosen, complete = study.plan()
    assert chosen == {"lr": 3e-5} and not complete
    alpha_runs = [n for n, _ in runs if n.startswith("sup") and n.endswith("_s42")]
    assert alpha_runs == ["sup-tuned_lr3e-05_a0.5_s42", "sup-a1_lr3e-05_s42", "sup-tuned_lr3e-05_a2_s42"]
    for name, dev in zip(alpha_runs, (80.0, 81.0, 80.5)):
        _finish(study, name, dev)
    runs, chosen, complete = study.plan()
    assert complete and chosen == {"lr": 3e-5, "alpha": 1.0}
    names = [n for n, _ in runs]
    assert len(names) == len(set(names))
    # weight 1 won: sup-tuned is the same run as sup-a1 (not run twice)
    assert study.recipe_command(study.BY_NAME["sup-tuned"], 43, chosen)[0] == "sup-a1_lr3e-05_s43"
    for seed in study.SEEDS:
        for recipe in study.RECIPES:
            assert study.recipe_command(recipe, seed, chosen)[0] in names
    assert "unsup-avg_lr3e-05_s42" in names and "unsup-avg_lr1e-05_s43" not in names


def test_every_command_is_a_valid_trainer_command(study):
    runs, _, _ = study.plan(dry=True)
    parser = build_parser()
    for name, args in runs:
        cfg = config_from_args(parser.parse_args([*args, "--output-dir", str(study.run_dir(name))]))
        recipe = study.BY_NAME[name.split("_lr")[0]]
        s = study.schedule(recipe)
        assert (cfg.batch_size, cfg.max_steps, cfg.geometry_steps) == (recipe.batch, s["steps"], s["geometry"])
        assert cfg.chunk_size == (study.CHUNK if recipe.batch > 64 else 0)
        assert cfg.train_file.endswith("snli_devtest_triplets.csv" if recipe.data == "sup" else "wiki1m_subset.txt")
    gs = dict(zip(*[iter(study.command(study.BY_NAME["gs-infonce"], 42, 3e-5)[1])] * 2))
    assert gs["--gaussian-negatives"] == "192" and gs["--gaussian-weight"] == "1"


def test_a_new_method_is_one_recipe_line(study, monkeypatch):
    monkeypatch.setattr(study, "RECIPES", [*study.RECIPES, study.Recipe("new", "a method", ("--do-mlm",))])
    for lr, dev in zip(study.TUNING["lr"], (85.0, 87.5, 86.0)):
        _finish(study, f"unsup-avg_lr{lr:g}_s42", dev)
    runs, _, _ = study.plan()
    assert [n for n, _ in runs if n.startswith("new_")] == ["new_lr3e-05_s42", "new_lr3e-05_s43"]
