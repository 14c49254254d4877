"""What each training recipe does to the embedding space: SimCSE's analysis (alignment,
uniformity, singular spectrum) and one table of recipes, every run made with
``python -m fastcl.train`` from all-MiniLM-L6-v2.

    python benchmarks/study.py list      # every run's command, in the order they run
    python benchmarks/study.py run       # run them one at a time; finished runs are skipped
    python benchmarks/study.py status    # done / left
    python benchmarks/study.py report    # table, per-run JSON and plots into benchmarks/results/train/study/

Run from the repository root (the data paths are ``../shared/data/...``). ``run`` can be
stopped and started again: a finished run (``results.json`` written) is skipped, an
interrupted one continues from its checkpoint with ``--resume``. Run outputs go to
``runs/study/`` (not committed); ``report`` copies each run's ``results.json`` and
``log.jsonl`` (never model weights) into the results folder.

Every recipe gets the same budget of training sentences (:data:`BUDGET`; supervised rows
count their three sentences), so batch 4096 makes one step where batch 64 makes 64. The
learning rate (on ``unsup-avg``; every recipe uses it) and then the supervised
hard-negative weight are chosen on STS-B dev with seed 42 (:data:`TUNING`); every recipe
then runs with each of :data:`SEEDS`.

Adding a method is one :class:`Recipe` line in :data:`RECIPES` (its flags; ``data="sup"``
for the triplets), e.g. ``Recipe("tacl", "TaCL: token-level contrast", ("--method", "tacl"))``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = Path("runs/study")
RESULTS = Path("benchmarks/results/train/study")
UNSUP = "../shared/data/unsup/wiki1m_subset.txt"
SUP = "../shared/data/nli/snli_devtest_triplets.csv"

#: Training sentences per run (the smallest budget in which batch 4096 makes a step).
BUDGET = 4096
SEEDS = (42, 43)
#: Grids searched on STS-B dev (seed 42): the learning rate (on unsup-avg), then the
#: supervised hard-negative weight at that rate.
TUNING = {"lr": (1e-5, 3e-5, 1e-4), "alpha": (0.5, 1.0, 2.0)}
#: GS-InfoNCE as its authors ran it on BERT-base (caskcsg/sentemb, gsInfoNCE/run.sh):
#: 192 Gaussian vectors, no weight on them (lambda 1); their standard deviation does not
#: matter under cosine similarity.
GS = ("--gaussian-negatives", "192", "--gaussian-weight", "1")
CHUNK = 128  # gradient caching for every batch above 64 (memory of 256 sequences at a time)


@dataclass(frozen=True)
class Recipe:
    name: str
    what: str
    args: tuple[str, ...] = ()
    data: str = "unsup"  # "unsup": wiki1m_subset.txt; "sup": the SNLI triplets
    batch: int = 64
    tuned_alpha: bool = False  # the hard-negative weight chosen on STS-B dev
    #: DCLR's complementary model (``--dclr-model``), a frozen SimCSE-trained encoder:
    #: this study's seed-42 unsup-avg run at the chosen learning rate.
    simcse_model: bool = False

    @property
    def chunk(self) -> int:
        return CHUNK if self.batch > 64 else 0


RECIPES = [
    Recipe("unsup-avg", "unsupervised SimCSE (InfoNCE, dropout views, in-batch negatives), mean pooling"),
    Recipe("unsup-cls-mlp", "SimCSE's own head: [CLS] with an MLP at training only",
           ("--pooler", "cls", "--mlp-only-train")),
    Recipe("unsup-mlm", "unsupervised + masked-LM loss (weight 0.1)", ("--do-mlm",)),
    Recipe("unsup-dedup", "unsupervised, rows repeating a sentence of the batch dropped", ("--dedup",)),
    Recipe("gs-infonce", "GS-InfoNCE: + 192 Gaussian negatives (weight 1)", GS),
    Recipe("moco", "MoCo: momentum key encoder (0.995) and a queue of 256 keys",
           ("--moco-queue", "256", "--moco-momentum", "0.995")),
    Recipe("child-tuning-f", "Child-Tuning-F: a fresh Bernoulli(0.3) gradient mask each step",
           ("--child-tuning", "f")),
    Recipe("child-tuning-d", "Child-Tuning-D: the 30% of weights with most Fisher information (32 batches)",
           ("--child-tuning", "d")),
    Recipe("sup-a1", "supervised SimCSE on SNLI triplets, hard-negative weight 1", ("--hard-negative-weight", "1"),
           data="sup"),
    Recipe("sup-tuned", "supervised SimCSE, hard-negative weight chosen on STS-B dev", data="sup", tuned_alpha=True),
    *[Recipe(f"infonce-b{b}", f"unsupervised InfoNCE, batch {b} (gradient caching, chunks of {CHUNK})", batch=b)
      for b in (256, 1024, 4096)],
    *[Recipe(f"gs-infonce-b{b}", f"GS-InfoNCE, batch {b} (gradient caching, chunks of {CHUNK})", GS, batch=b)
      for b in (256, 1024, 4096)],
    Recipe("sgbert", "SG-BERT: [CLS] pulled to a frozen copy's max-pooled random layer, + its regularizer",
           ("--method", "sgbert")),
    Recipe("tacl", "TaCL: masked tokens pulled to a frozen teacher's tokens, + masked LM", ("--method", "tacl")),
    Recipe("vascl", "VaSCL: virtual augmentations hard against each instance's 16 neighbours, + SimCSE",
           ("--method", "vascl")),
    Recipe("dclr", "DCLR: + noise negatives moved toward non-uniform points; negatives a frozen SimCSE model "
           "scores above 0.9 dropped", ("--method", "dclr"), simcse_model=True),
]
BY_NAME = {r.name: r for r in RECIPES}
#: The batch-size sweep (batch 64 is the plain recipe).
SWEEP = {"InfoNCE": ["unsup-avg", "infonce-b256", "infonce-b1024", "infonce-b4096"],
         "GS-InfoNCE": ["gs-infonce", "gs-infonce-b256", "gs-infonce-b1024", "gs-infonce-b4096"]}


def _num(x: float) -> str:
    return f"{x:g}"


def schedule(recipe: Recipe) -> dict:
    """Steps for the budget, and evaluation / geometry / logging intervals: STS-B dev at
    half-way and at the end (the best is kept), alignment and uniformity every quarter."""
    per_row = 3 if recipe.data == "sup" else 1
    steps = max(1, BUDGET // (recipe.batch * per_row))
    return {"steps": steps, "sentences": steps * recipe.batch * per_row, "eval": max(1, steps // 2),
            "geometry": max(1, steps // 4), "logging": max(1, steps // 16)}


def command(recipe: Recipe, seed: int, lr: float, alpha: float | None = None) -> tuple[str, list[str]]:
    """(run directory name, argument list of python -m fastcl.train) — the output directory excluded."""
    s = schedule(recipe)
    args = ["--train-file", SUP if recipe.data == "sup" else UNSUP, "--batch-size", str(recipe.batch)]
    if recipe.chunk:
        args += ["--chunk-size", str(recipe.chunk)]
    args += list(recipe.args)
    if recipe.simcse_model:
        args += ["--dclr-model", str(run_dir(command(BY_NAME["unsup-avg"], 42, lr)[0]))]
    name = f"{recipe.name}_lr{_num(lr)}"
    if alpha is not None:
        args += ["--hard-negative-weight", _num(alpha)]
        name += f"_a{_num(alpha)}"
    args += ["--learning-rate", _num(lr), "--max-steps", str(s["steps"]), "--eval-steps", str(s["eval"]),
             "--geometry-steps", str(s["geometry"]), "--logging-steps", str(s["logging"]), "--seed", str(seed)]
    return f"{name}_s{seed}", args


def run_dir(name: str) -> Path:
    return RUNS / name


def finished(name: str) -> dict | None:
    path = run_dir(name) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def dev_after(name: str) -> float | None:
    r = finished(name)
    return r["after"]["stsb_dev"] if r and r.get("after") else None


def choices(dry: bool = False) -> tuple[list[tuple[str, list[str]]], dict]:
    """The tuning runs, and the values chosen from those finished (None while undecided;
    ``dry`` fills undecided values with the first grid value, to list commands)."""
    chosen, runs = {}, []
    base, sup = BY_NAME["unsup-avg"], BY_NAME["sup-a1"]

    def pick(candidates, key):
        scores = [(dev_after(name), value) for value, name in candidates]
        if all(s is not None for s, _ in scores):
            chosen[key] = max(scores)[1]
        elif dry:
            chosen[key] = None

    grid = [(lr, command(base, 42, lr)) for lr in TUNING["lr"]]
    runs += [c for _, c in grid]
    pick([(lr, c[0]) for lr, c in grid], "lr")
    if "lr" in chosen:
        lr = chosen["lr"] or TUNING["lr"][0]
        grid = [(a, command(sup, 42, lr) if a == 1.0 else command(BY_NAME["sup-tuned"], 42, lr, a))
                for a in TUNING["alpha"]]
        runs += [c for _, c in grid]
        pick([(a, c[0]) for a, c in grid], "alpha")
    return runs, chosen


def recipe_command(recipe: Recipe, seed: int, chosen: dict) -> tuple[str, list[str]] | None:
    lr = chosen.get("lr")
    if lr is None:
        return None
    if recipe.tuned_alpha:
        alpha = chosen.get("alpha")
        if alpha is None:
            return None
        if alpha == 1.0:  # the same run as hard-negative weight 1
            return command(BY_NAME["sup-a1"], seed, lr)
        return command(recipe, seed, lr, alpha)
    return command(recipe, seed, lr)


def plan(dry: bool = False) -> tuple[list[tuple[str, list[str]]], dict, bool]:
    """Every run in order (tuning first, then each seed's recipes), the choices, and
    whether the plan is complete (False while tuning runs are unfinished)."""
    runs, chosen = choices(dry)
    complete = True
    for seed in SEEDS:
        for recipe in RECIPES:
            c = recipe_command(recipe, seed, {k: (v if v is not None else _first(k)) for k, v in chosen.items()}
                               if dry else chosen)
            if c is None:
                complete = False
                continue
            if c not in runs:
                runs.append(c)
    return runs, chosen, complete


def _first(key: str):
    return TUNING[key][0]


def shell(name: str, args: list[str]) -> str:
    return " ".join(["python -m fastcl.train", *args, "--output-dir", str(run_dir(name))])


#: Where the training runs import fastcl from (``--code``): a frozen copy of the sources
#: keeps a long study on one version while the repository changes.
CODE = REPO


def run_one(name: str, args: list[str]) -> bool:
    out = run_dir(name)
    resume = (out / "checkpoint" / "state.pt").is_file()
    cmd = [sys.executable, "-m", "fastcl.train", *args, "--output-dir", str(out), "--no-progress",
           "--resume" if resume else "--overwrite"]
    logs = RUNS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%H:%M:%S')} {'resume' if resume else 'start'} {name}", flush=True)
    t0 = time.time()
    with open(logs / f"{name}.log", "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(CODE)})
    wall = time.time() - t0
    print(f"{time.strftime('%H:%M:%S')} {name}: exit {code} after {wall:.0f} s", flush=True)
    if code != 0:
        return False
    record = out / "study_run.json"
    previous = json.loads(record.read_text())["wall_seconds"] if resume and record.is_file() else 0.0
    record.write_text(json.dumps({"name": name, "command": shell(name, args), "wall_seconds": previous + wall,
                                  "code": _version()}))
    for entry in ("checkpoint", "best"):  # large, and the final model is kept
        shutil.rmtree(out / entry, ignore_errors=True)
    return True


def _version() -> str:
    """The fastcl sources the runs use: the commit a frozen copy was made from (its
    ``COMMIT`` file), else the repository's HEAD."""
    if (CODE / "COMMIT").is_file():
        return (CODE / "COMMIT").read_text().strip()
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=CODE, capture_output=True, text=True).stdout.strip()


def cmd_run(stop_on_failure: bool) -> int:
    failures = set()
    while True:
        runs, _, complete = plan()
        todo = [(n, a) for n, a in runs if finished(n) is None and n not in failures]
        if not todo:
            break
        name, args = todo[0]
        if not run_one(name, args):
            failures.add(name)
            if stop_on_failure:
                return 1
    if failures or not complete:
        print(f"not done: {', '.join(sorted(failures)) or 'tuning undecided'}")
        return 1
    print("study complete")
    return 0


def cmd_list() -> int:
    runs, chosen, complete = plan(dry=True)
    for name, args in runs:
        print(("done  " if finished(name) else "      ") + shell(name, args))
    print(f"chosen: {chosen}" + ("" if complete else " (tuning runs unfinished: later commands use the first grid "
                                                     "value as a placeholder)"))
    return 0


def cmd_status() -> int:
    runs, chosen, complete = plan()
    done = [n for n, _ in runs if finished(n)]
    print(f"{len(done)}/{len(runs)} runs done{'' if complete else ' (more after tuning)'}; chosen {chosen}")
    for name, _ in runs:
        r = finished(name)
        if r:
            print(f"  {name}: dev {r['before']['stsb_dev']:.2f} -> {r['after']['stsb_dev']:.2f}, "
                  f"test {r['before']['stsb_test']:.2f} -> {r['after']['stsb_test']:.2f}, "
                  f"{r['sentences_per_s']:.1f} sent/s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("list", "run", "status", "report"))
    p.add_argument("--stop-on-failure", action="store_true")
    p.add_argument("--code", default=None, help="import fastcl from this copy of the sources (e.g. made with "
                   "git archive, with the commit in a COMMIT file) instead of the repository")
    a = p.parse_args(argv)
    global CODE
    if a.code:
        CODE = Path(a.code).resolve()
    if Path.cwd().resolve() != REPO:
        p.error(f"run from the repository root ({REPO}): the data paths are relative to it")
    if a.what == "report":
        from study_report import report

        return report()
    return {"list": cmd_list, "status": cmd_status, "run": lambda: cmd_run(a.stop_on_failure)}[a.what]()


if __name__ == "__main__":
    sys.exit(main())
