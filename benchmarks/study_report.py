"""``python benchmarks/study.py report``: the study's results folder from its finished runs.

Writes into ``benchmarks/results/train/study/``: ``runs/<run>/`` (each run's
``results.json``, ``log.jsonl`` and ``study_run.json``: command, wall time, code
version), ``README.md`` (the tables), ``summary.json`` (per recipe: per-seed and mean
numbers), ``alignment_uniformity.png`` and ``spectra.png`` (one run per recipe, the first
seed), and ``alignment_uniformity_batch.png`` (the batch-size sweep).
"""

from __future__ import annotations

import json
import shutil
import statistics

import study as S

from fastcl.plots import load_run, plot_alignment_uniformity, plot_spectra_before_after

KEYS = ("stsb_dev", "stsb_test", "alignment", "uniformity", "spectrum_top1_energy", "spectrum_effective_rank")


def _runs_of(recipe: S.Recipe, chosen: dict) -> list[tuple[int, str, list[str]]]:
    out = []
    for seed in S.SEEDS:
        c = S.recipe_command(recipe, seed, chosen)
        if c is not None and S.finished(c[0]):
            out.append((seed, *c))
    return out


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (with two seeds: half their difference)."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def _fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    m, s = _mean_spread(values)
    per = " / ".join(f"{v:.{digits}f}" for v in values)
    return f"**{m:.{digits}f}** ± {s:.{digits}f} ({per})"


def _args_without_seed(args: list[str]) -> str:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--seed":
            skip = True
            continue
        out.append(a)
    return " ".join(["python -m fastcl.train", *out, "--seed SEED --output-dir OUT"])


def summarize(chosen: dict) -> dict:
    summary = {}
    for recipe in S.RECIPES:
        runs = _runs_of(recipe, chosen)
        if not runs:
            continue
        results = [S.finished(name) for _, name, _ in runs]
        walls = []
        for _, name, _ in runs:
            record = S.run_dir(name) / "study_run.json"
            walls.append(json.loads(record.read_text())["wall_seconds"] if record.is_file() else None)
        summary[recipe.name] = {
            "what": recipe.what, "command": _args_without_seed(runs[0][2]), "seeds": [s for s, _, _ in runs],
            "runs": [n for _, n, _ in runs], "steps": results[0]["steps"],
            "sentences": S.schedule(recipe)["sentences"],
            "before": {k: results[0]["before"][k] for k in KEYS},
            "after": {k: [r["after"][k] for r in results] for k in KEYS},
            "best_step": [r["best_step"] for r in results],
            "sentences_per_s": [r["sentences_per_s"] for r in results],
            "train_seconds": [r["train_seconds"] for r in results],
            "wall_seconds": walls,
        }
    return summary


def _tuning_table(chosen: dict) -> list[str]:
    lines = ["| grid (seed 42) | value | STS-B dev after | chosen |", "|---|---|---|---|"]
    base, sup = S.BY_NAME["unsup-avg"], S.BY_NAME["sup-a1"]
    rows = [("learning rate (unsup-avg)", lr, S.command(base, 42, lr)[0], chosen.get("lr")) for lr in S.TUNING["lr"]]
    if chosen.get("lr") is not None:
        lr = chosen["lr"]
        rows += [("hard-negative weight (sup, at that rate)", a, (S.command(sup, 42, lr) if a == 1.0 else
                                                                 S.command(S.BY_NAME["sup-tuned"], 42, lr, a))[0],
                  chosen.get("alpha")) for a in S.TUNING["alpha"]]
    for grid, value, name, pick in rows:
        dev = S.dev_after(name)
        lines.append(f"| {grid} | {value:g} | {dev:.2f} | {'**yes**' if value == pick else ''} |" if dev is not None
                     else f"| {grid} | {value:g} | (not run) | |")
    return lines


def _main_table(summary: dict) -> list[str]:
    lines = ["| recipe | STS-B dev after | STS-B test after | alignment after | uniformity after | "
             "top-1 energy after | effective rank after | sentences/s | wall s / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = sorted(summary, key=lambda n: -statistics.fmean(summary[n]["after"]["stsb_dev"]))
    for name in order:
        s = summary[name]
        a = s["after"]
        walls = [w for w in s["wall_seconds"] if w is not None]
        wall = f"{statistics.fmean(walls):.0f}" if walls else "-"
        lines.append(f"| {name} | {_fmt(a['stsb_dev'])} | {_fmt(a['stsb_test'])} | {_fmt(a['alignment'], 4)} | "
                     f"{_fmt(a['uniformity'], 4)} | {_fmt(a['spectrum_top1_energy'], 4)} | "
                     f"{_fmt(a['spectrum_effective_rank'], 1)} | {statistics.fmean(s['sentences_per_s']):.1f} | "
                     f"{wall} |")
    return lines


def _before_table(summary: dict) -> list[str]:
    lines = ["| starting point (all-MiniLM-L6-v2) | recipes | STS-B dev | STS-B test | alignment | uniformity | "
             "top-1 energy | effective rank |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[str]] = {}
    for name, s in summary.items():
        groups.setdefault(tuple(round(s["before"][k], 6) for k in KEYS), []).append(name)
    for values, names in groups.items():
        pooler = "[CLS] (no MLP at evaluation)" if any("cls" in n for n in names) else "mean pooling"
        lines.append(f"| {pooler} | {', '.join(names)} | {values[0]:.2f} | {values[1]:.2f} | {values[2]:.4f} | "
                     f"{values[3]:.4f} | {values[4]:.4f} | {values[5]:.1f} |")
    return lines


def _sweep_table(summary: dict) -> list[str]:
    lines = ["| loss | batch | steps | STS-B dev after | STS-B test after | alignment after | uniformity after |",
             "|---|---|---|---|---|---|---|"]
    for loss, names in S.SWEEP.items():
        for name in names:
            if name not in summary:
                continue
            s, a = summary[name], summary[name]["after"]
            lines.append(f"| {loss} | {S.BY_NAME[name].batch} | {s['steps']} | {_fmt(a['stsb_dev'])} | "
                         f"{_fmt(a['stsb_test'])} | {_fmt(a['alignment'], 4)} | {_fmt(a['uniformity'], 4)} |")
    return lines


def _runs_table(chosen: dict) -> list[str]:
    lines = ["| run | steps (best) | STS-B dev | STS-B test | alignment | uniformity | effective rank | train s | "
             "sentences/s | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    names = [n for n, _ in S.plan()[0] if S.finished(n)]
    for name in names:
        r = S.finished(name)
        b, a = r["before"], r["after"]
        record = S.run_dir(name) / "study_run.json"
        wall = json.loads(record.read_text())["wall_seconds"] if record.is_file() else float("nan")
        lines.append(f"| [{name}](runs/{name}/results.json) | {r['steps']} ({r['best_step']}) | "
                     f"{b['stsb_dev']:.2f} → {a['stsb_dev']:.2f} | {b['stsb_test']:.2f} → {a['stsb_test']:.2f} | "
                     f"{b['alignment']:.4f} → {a['alignment']:.4f} | {b['uniformity']:.4f} → {a['uniformity']:.4f} | "
                     f"{b['spectrum_effective_rank']:.1f} → {a['spectrum_effective_rank']:.1f} | "
                     f"{r['train_seconds']:.0f} | {r['sentences_per_s']:.1f} | {wall:.0f} |")
    return lines


def report() -> int:
    runs, chosen, complete = S.plan()
    out = S.RESULTS
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for name, _ in runs:
        if not S.finished(name):
            continue
        target = out / "runs" / name
        target.mkdir(exist_ok=True)
        for f in ("results.json", "log.jsonl", "study_run.json"):
            if (S.run_dir(name) / f).is_file():
                shutil.copy2(S.run_dir(name) / f, target / f)
    summary = summarize(chosen)
    (out / "summary.json").write_text(json.dumps({"budget_sentences": S.BUDGET, "seeds": list(S.SEEDS),
                                                  "chosen": chosen, "recipes": summary}, indent=2))
    first = {name: load_run(f"{name}={out / 'runs' / s['runs'][0]}") for name, s in summary.items()}
    if first:
        plot_alignment_uniformity(list(first.values()), out / "alignment_uniformity.png",
                                  title=f"STS-B dev alignment and uniformity along training (seed {S.SEEDS[0]})")
        plot_spectra_before_after(list(first.values()), out / "spectra.png",
                                  title=f"STS-B dev embeddings: normalized singular spectrum (seed {S.SEEDS[0]})")
        sweep = [first[n] for names in S.SWEEP.values() for n in names if n in first]
        if sweep:
            plot_alignment_uniformity(sweep, out / "alignment_uniformity_batch.png",
                                      title="Batch size at an equal budget of sentences: InfoNCE and GS-InfoNCE")
    finished = sum(bool(S.finished(name)) for name, _ in runs)
    status = ("" if complete and finished == len(runs) else
              f" **In progress: {finished} of {len(runs)} planned runs finished"
              f"{'' if complete else ' (more are planned once the tuning runs are done)'}; the tables show those.**")
    analysis = (" The analysis is in [docs/study.md](../../../../docs/study.md)."
                if (S.REPO / "docs" / "study.md").is_file() else "")
    commands = ["| recipe | what | command |", "|---|---|---|"]
    commands += [f"| {n} | {s['what']} | `{s['command']}` |" for n, s in summary.items()]
    text = "\n".join([
        "# The recipe study: what each recipe does to the embedding space",
        "",
        "Generated by `python benchmarks/study.py report` from the runs of `python benchmarks/study.py run`."
        + analysis,
        "",
        f"Every run: all-MiniLM-L6-v2, {S.BUDGET} training sentences (supervised rows count three), fp32 on a "
        "2-core CPU shared with other work (sentences/s and wall times are low and noisy), STS-B dev every half of "
        "the run with the best model kept, alignment and uniformity on STS-B dev every quarter "
        "(`--geometry-steps`). Values: mean ± half the spread of the seeds (the seeds' values in brackets)."
        + status,
        "",
        "## Recipes, best STS-B dev first", "", *_main_table(summary), "",
        "## Before training", "", *_before_table(summary), "",
        "## Batch size at an equal budget", "", *_sweep_table(summary), "",
        "## Tuning on STS-B dev", "", *_tuning_table(chosen), "",
        "## Commands", "", *commands, "",
        "## Every run", "", *_runs_table(chosen), "",
        "Plots: [alignment_uniformity.png](alignment_uniformity.png), [spectra.png](spectra.png), "
        "[alignment_uniformity_batch.png](alignment_uniformity_batch.png).",
        "",
    ])
    (out / "README.md").write_text(text)
    print(text)
    return 0 if complete and finished == len(runs) else 1
