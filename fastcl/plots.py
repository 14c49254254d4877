"""Plots of training runs, drawn from what ``python -m fastcl.train`` writes: the
alignment-uniformity trajectories along training (SimCSE's Figure 2) and the normalized
singular spectra before and after training (SimCSE section 5).

    python -m fastcl.evaluate --runs runs/unsup runs/sup --plot au.png --plot-spectra spectra.png

A run is a training output directory (or its ``log.jsonl``). The trajectory's points are
the log's records that carry alignment and uniformity on STS-B dev: the evaluation
before training (step 0), every ``--eval-steps`` evaluation and every ``--geometry-steps``
record, in step order, ending at the last step; the final model (the best on STS-B dev)
is marked apart. The spectra come from ``results.json``. Nothing is encoded here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

AFTER = "after (best model)"


@dataclass
class Run:
    """One training run as read from its output directory."""

    label: str
    path: Path
    points: list[dict]  # {"step", "alignment", "uniformity", "stsb_dev" (if logged)} in step order
    kept: dict | None = None  # the final (best on STS-B dev) model's record, with "best_step"
    spectra: dict = field(default_factory=dict)  # "before" / "after": normalized singular values
    results: dict | None = None  # results.json, if written (a run that finished)


def parse_run_spec(spec: str) -> tuple[str | None, Path]:
    """``LABEL=PATH`` or ``PATH`` (a path that exists is never split at ``=``)."""
    if "=" in spec and not Path(spec).exists():
        label, _, path = spec.partition("=")
        if label and path:
            return label, Path(path)
    return None, Path(spec)


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON record ({e.msg})") from None
            if isinstance(record, dict):
                records.append(record)
    return records


def _finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def load_run(spec: str | Path, label: str | None = None) -> Run:
    """Read a run (``LABEL=PATH`` accepted); ValueError naming the path if it holds no
    alignment-uniformity records."""
    spec_label, path = parse_run_spec(str(spec))
    label = label or spec_label
    log = path / "log.jsonl" if path.is_dir() else path
    directory = log.parent
    if not log.is_file():
        raise ValueError(f"{path}: no log.jsonl there (give the output directory of python -m fastcl.train)")
    by_step, kept = {}, None
    for r in _read_jsonl(log):
        if r.get("event") not in ("eval", "geometry") or not _finite(r.get("alignment"), r.get("uniformity")):
            continue
        if not isinstance(r.get("step"), int):
            continue
        if r.get("when") == AFTER:
            kept = r
            continue
        point = {"step": r["step"], "alignment": float(r["alignment"]), "uniformity": float(r["uniformity"])}
        if _finite(r.get("stsb_dev")):
            point["stsb_dev"] = float(r["stsb_dev"])
        by_step[r["step"]] = point  # a resumed run may log a step again: the later record stands
    if not by_step:
        raise ValueError(f"{log}: no record with alignment and uniformity (train with STS-B evaluation; "
                         "--geometry-steps N adds a point every N steps)")
    results = None
    if (directory / "results.json").is_file():
        try:
            results = json.loads((directory / "results.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{directory / 'results.json'}: not JSON ({e.msg})") from None
    spectra = {k: v for k, v in ((results or {}).get("spectrum_normalized") or {}).items() if v}
    return Run(label or directory.name, directory, [by_step[s] for s in sorted(by_step)], kept, spectra, results)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the plots need matplotlib: pip install matplotlib") from e
    return plt


def _colors(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def plot_alignment_uniformity(runs: list[Run], path: str | Path,
                              title: str = "Alignment and uniformity on STS-B dev along training") -> Path:
    """Each run's trajectory in the (alignment, uniformity) plane, one color per run,
    arrows in the direction of training; a hollow circle at the start (before training),
    a square at the last step, a star at the final model (the best on STS-B dev). Lower
    is better on both axes."""
    if not runs:
        raise ValueError("no run to plot")
    plt = _pyplot()
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=130)
    handles = []
    for run, color in zip(runs, _colors(len(runs))):
        x = [p["alignment"] for p in run.points]
        y = [p["uniformity"] for p in run.points]
        ax.plot(x, y, "-", color=color, lw=1.0, alpha=0.6)
        for (x0, y0), (x1, y1) in zip(zip(x, y), zip(x[1:], y[1:])):
            if (x0, y0) != (x1, y1):
                ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                            arrowprops={"arrowstyle": "->", "color": color, "lw": 1.1, "shrinkA": 0, "shrinkB": 2})
        ax.plot(x[0], y[0], "o", mfc="white", mec=color, ms=7, mew=1.5, zorder=3)
        ax.plot(x[-1], y[-1], "s", color=color, ms=6, zorder=3)
        if run.kept is not None:
            ax.plot(run.kept["alignment"], run.kept["uniformity"], "*", color=color, mec="black", mew=0.5, ms=12,
                    zorder=4)
        handles.append(Line2D([], [], color=color, lw=2, label=run.label))
    handles += [Line2D([], [], ls="", marker="o", mfc="white", mec="gray", ms=7, label="start (before training)"),
                Line2D([], [], ls="", marker="s", color="gray", ms=6, label="last step"),
                Line2D([], [], ls="", marker="*", color="gray", mec="black", mew=0.5, ms=12,
                       label="final model (best on dev)")]
    ax.set_xlabel(r"$\ell_{align}$ (alignment; lower is better)")
    ax.set_ylabel(r"$\ell_{uniform}$ (uniformity; lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _groups(runs: list[Run], key: str) -> list[tuple[list[float], list[str]]]:
    """Runs' ``key`` spectra, identical ones (runs from one starting model) together."""
    groups: list[tuple[list[float], list[str]]] = []
    for run in runs:
        values = run.spectra.get(key)
        if not values:
            continue
        for ref, labels in groups:
            if len(ref) == len(values) and np.allclose(ref, values, rtol=1e-6, atol=1e-9):
                labels.append(run.label)
                break
        else:
            groups.append((values, [run.label]))
    return groups


def plot_spectra_before_after(runs: list[Run], path: str | Path,
                              title: str = "STS-B dev embeddings: normalized singular spectrum") -> Path:
    """Singular values of the STS-B dev embedding matrix divided by the largest: after
    training one solid line per run (its color); before training dashed, one line per
    distinct starting point (runs from one model and pooler share it). Below, each run's
    after / before ratio index by index: above 1 where training flattened the spectrum."""
    with_spectra = [r for r in runs if r.spectra.get("after") or r.spectra.get("before")]
    if not with_spectra:
        raise ValueError("no run has spectra (results.json is written when a run with evaluation finishes): "
                         + ", ".join(str(r.path) for r in runs))
    plt = _pyplot()
    fig, (ax, ratio_ax) = plt.subplots(2, 1, figsize=(7.5, 7.0), dpi=130, sharex=True,
                                       gridspec_kw={"height_ratios": [3, 2]})
    lowest = 1.0
    for n, (values, labels) in enumerate(_groups(with_spectra, "before")):
        names = labels[0] if len(labels) == 1 else (f"{len(labels)} runs" if len(labels) > 2 else " and ".join(labels))
        ax.plot(np.arange(1, len(values) + 1), values, ls=("--", ":", "-.")[n % 3], color="black", lw=1.4,
                label=f"before ({names})")
        lowest = min(lowest, min(values))
    for run, color in zip(runs, _colors(len(runs))):
        after, before = run.spectra.get("after"), run.spectra.get("before")
        if not after:
            continue
        ax.plot(np.arange(1, len(after) + 1), after, "-", color=color, lw=1.0, label=f"after: {run.label}")
        lowest = min(lowest, min(after))
        if before and len(before) == len(after):
            b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
            keep = b >= 1e-3  # the ratio of two values at rounding level says nothing
            ratio_ax.plot(np.arange(1, len(a) + 1)[keep], a[keep] / b[keep], "-", color=color, lw=1.0,
                          label=run.label)
    ax.set_yscale("log")
    ax.set_ylim(top=1.3)
    if lowest < 1e-3:  # a dimension the model never uses would stretch the axis over many decades
        ax.set_ylim(bottom=1e-3)
        ax.text(0.02, 0.03, "values below 1e-3 clipped", transform=ax.transAxes, fontsize=7)
    ax.set_ylabel("singular value / largest")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ratio_ax.axhline(1.0, color="black", lw=0.8)
    ratio_ax.set_xlabel("index (largest first)")
    ratio_ax.set_ylabel("after / before")
    ratio_ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _arrow(before, after, fmt: str) -> str:
    b = format(before, fmt) if _finite(before) else "-"
    a = format(after, fmt) if _finite(after) else "-"
    return f"{b} -> {a}"


def runs_table(runs: list[Run]) -> str:
    """One line per run: STS-B dev / test, alignment, uniformity, spectrum before -> after."""
    header = ("| run | steps | STS-B dev | STS-B test | alignment | uniformity | top-1 energy | effective rank |\n"
              "|---|---|---|---|---|---|---|---|")
    lines = [header]
    for run in runs:
        res = run.results or {}
        b, a = res.get("before") or {}, res.get("after") or {}
        if not a and run.kept is not None:
            a = run.kept
        if not b:
            b = run.points[0]
        steps = res.get("steps", run.points[-1]["step"])
        best = res.get("best_step", (run.kept or {}).get("best_step"))
        lines.append(f"| {run.label} | {steps}" + (f" (best {best})" if best is not None else "") + " | "
                     + " | ".join([_arrow(b.get("stsb_dev"), a.get("stsb_dev"), ".2f"),
                                   _arrow(b.get("stsb_test"), a.get("stsb_test"), ".2f"),
                                   _arrow(b.get("alignment"), a.get("alignment"), ".4f"),
                                   _arrow(b.get("uniformity"), a.get("uniformity"), ".4f"),
                                   _arrow(b.get("spectrum_top1_energy"), a.get("spectrum_top1_energy"), ".4f"),
                                   _arrow(b.get("spectrum_effective_rank"), a.get("spectrum_effective_rank"), ".1f")])
                     + " |")
    return "\n".join(lines)
