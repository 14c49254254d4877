"""The table of benchmarks/results/train/methods/: one row per run of
benchmarks/methods_runs.sh, then the per-method mean over seeds.

    python benchmarks/methods_table.py RUNS_ROOT OUT_DIR

copies each run's results.json and log.jsonl (no weights) to OUT_DIR/RUN/, with the
runs' temporary paths rewritten to runs/methods/, and prints the markdown table.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

COLUMNS = ("stsb_dev", "stsb_test", "alignment", "uniformity", "spectrum_top1_energy", "spectrum_effective_rank")


def _rewrite(text: str, root: Path) -> str:
    return text.replace(str(root), "runs/methods")


def collect(root: Path, out: Path) -> list[dict]:
    rows = []
    for results in sorted(root.glob("*/results.json")):
        run = results.parent.name
        dest = out / run
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "log.jsonl"):
            src = results.parent / name
            if src.is_file():
                (dest / name).write_text(_rewrite(src.read_text(encoding="utf-8"), root), encoding="utf-8")
        data = json.loads(results.read_text(encoding="utf-8"))
        rows.append({"run": run, "method": data["config"].get("method", "simcse"), "seed": data["config"]["seed"],
                     "before": data["before"], "after": data["after"], "steps": data["steps"],
                     "best_step": data["best_step"], "sentences_per_s": data["sentences_per_s"],
                     "train_seconds": data["train_seconds"]})
    return rows


def table(rows: list[dict]) -> str:
    head = ("| run | best step | STS-B dev | STS-B test | alignment | uniformity | top-1 energy | effective rank "
            "| sentences/s | train s |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['run']} | {r['best_step']} | {b['stsb_dev']:.2f} -> {a['stsb_dev']:.2f} "
                     f"| {b['stsb_test']:.2f} -> {a['stsb_test']:.2f} | {b['alignment']:.3f} -> {a['alignment']:.3f} "
                     f"| {b['uniformity']:.3f} -> {a['uniformity']:.3f} "
                     f"| {b['spectrum_top1_energy']:.4f} -> {a['spectrum_top1_energy']:.4f} "
                     f"| {b['spectrum_effective_rank']:.1f} -> {a['spectrum_effective_rank']:.1f} "
                     f"| {r['sentences_per_s']:.1f} | {r['train_seconds']:.0f} |")
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    lines += ["", "| method | seeds | STS-B dev (mean, spread) | STS-B test (mean, spread) |", "|---|---|---|---|"]
    for method, rs in by_method.items():
        dev = [r["after"]["stsb_dev"] for r in rs]
        test = [r["after"]["stsb_test"] for r in rs]
        spread = (lambda v: f"{max(v) - min(v):.2f}" if len(v) > 1 else "-")
        lines.append(f"| {method} | {len(rs)} | {statistics.mean(dev):.2f} ({spread(dev)}) "
                     f"| {statistics.mean(test):.2f} ({spread(test)}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    rows = collect(Path(sys.argv[1]), Path(sys.argv[2]))
    print(table(rows))
