"""Tables (markdown, also printed) and plots (PNG, log-log) of one bench.py run's JSON.

``python benchmarks/report.py RESULTS.json`` redraws them from a saved run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: Why plots were not drawn (set when matplotlib cannot be imported).
PLOT_SKIP_REASON: str | None = None

TIMED = ("ok", "disagrees", "unchecked")
MARK = {"ok": "", "disagrees": " ✗", "unchecked": " ?"}
SHORT = {"unsupported": "unsupported", "unavailable": "not installed", "oom": "out of memory",
         "error": "error", "skipped": "skipped", "pending": "not run"}
TITLES = {"infonce": "InfoNCE", "nt_xent": "NT-Xent", "groups": "Token-level InfoNCE"}


def _loss(data) -> str:
    """The benchmarked loss (runs before --loss existed were all InfoNCE)."""
    return data["config"].get("loss") or "infonce"


def _rate(r):
    """The counted work per second (older runs recorded only tflops_8nmd)."""
    return r.get("tflops") if r.get("tflops") is not None else r.get("tflops_8nmd")


def _impls(data) -> list[str]:
    seen = []
    for r in data["results"]:
        if r["impl"] not in seen:
            seen.append(r["impl"])
    return seen


def _shapes(data) -> list[tuple[int, int, int]]:
    seen = []
    for r in data["results"]:
        key = (r["n"], r["m"], r["d"])
        if key not in seen:
            seen.append(key)
    return seen


def _lookup(data):
    return {(r["impl"], r["n"], r["d"]): r for r in data["results"]}


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_gib(gib: float | None) -> str:
    if gib is None:
        return "-"
    return f"{gib:.3g}" if gib >= 0.001 else f"{gib:.1e}"


def _cell_time(r) -> str:
    if r is None:
        return ""
    if r["status"] not in TIMED:
        return SHORT.get(r["status"], r["status"])
    return f"{_fmt_ms(r['time_ms']['median'])} / {_fmt_gib(r['peak_extra_gib'])}{MARK[r['status']]}"


def _cell_rate(r) -> str:
    if r is None or r["status"] not in TIMED:
        return ""
    rate = _rate(r)
    a = r.get("agreement") or {}
    err = f"{a['max_grad_rel_err']:.0e}" if a.get("checked") else "unchecked"
    text = f"{rate:.3g}" if rate is not None else "-"
    if r.get("tflops_real") is not None:
        text += f" ({r['tflops_real']:.3g})"
    return f"{text} / {err}{MARK[r['status']]}"


def _table(data, cell) -> list[str]:
    impls = _impls(data)
    look = _lookup(data)
    dims = sorted({d for _, _, d in _shapes(data)})
    loss = _loss(data)
    size_cols = {"infonce": ["N", "M"], "nt_xent": ["N", "rows 2N"], "groups": ["N tokens", "sequences"]}[loss]
    lead = size_cols + (["D"] if len(dims) > 1 else [])
    group_size = data["config"].get("group_size")
    lines = ["| " + " | ".join(lead + impls) + " |", "|" + "---|" * (len(lead) + len(impls))]
    for n, m, d in _shapes(data):
        second = str(n // group_size) if loss == "groups" else str(m)
        row = [str(n), second] + ([str(d)] if len(dims) > 1 else [])
        row += [cell(look.get((name, n, d))) for name in impls]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def markdown(data) -> str:
    env, cfg = data["environment"], data["config"]
    cpu = env["device_type"] != "cuda"
    dims = ", ".join(str(d) for d in cfg["dims"])
    loss = _loss(data)
    title = f"# Benchmark {data['run_id']}" + (" (CPU run)" if cpu else "")
    shape = {
        "infonce": "InfoNCE",
        "nt_xent": "NT-Xent (SimCLR): N pairs z1, z2, all 2N rows anchors against the other 2N - 1",
        "groups": f"token-level InfoNCE: N tokens in sequences of G = {cfg.get('group_size')}, negatives "
                  "within the sequence",
    }[loss]
    rate_title = {
        "infonce": "TFLOP/s against 8NMD (real work, dense and compiled: 6NMD)",
        "nt_xent": "TFLOP/s against 8(2N)²D (real work, dense and compiled: 6(2N)²D)",
        "groups": "TFLOP/s against the useful work 8NGD (real work where known, in parentheses)",
    }[loss]
    lines = [title, ""]
    if cpu:
        lines += ["**CPU run**: no GPU was used; these numbers say nothing about GPU performance.", ""]
    lines += [
        f"- date: {data['date']} (elapsed {data['elapsed_s']} s){'' if data['complete'] else ' **INCOMPLETE**'}",
        f"- device: {env['device_name']}" + (f", CUDA {env.get('cuda')}" if not cpu else "")
        + (f"; load average {env['load_avg_start'][0]} at start, {env['load_avg_end'][0]} at end"
           if cpu and env.get("load_avg_start") and env.get("load_avg_end") else ""),
        f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}; fastcl at "
        f"{(env.get('git_commit') or 'unknown')[:12]}{' (dirty)' if env.get('git_dirty') else ''}",
        f"- command: `{data['command']}`",
        (f"- shape: D = {dims}, {cfg['dtype']}, M = {_columns(cfg)}, "
         if loss == "infonce" else f"- shape: {shape}; D = {dims}, {cfg['dtype']}, ")
        + f"tau = {cfg['temperature']}{', symmetric' if cfg['symmetric'] else ''}, fp32 matmul precision "
        f"'{cfg['fp32_matmul_precision']}'",
        f"- tolerance (relative L2 vs float64): loss {cfg['tolerances']['loss']:.0e}, "
        f"gradients {cfg['tolerances']['grad']:.0e}",
        "",
        "## Forward + backward: median ms / extra peak GiB",
        "",
        *_table(data, _cell_time),
        "",
        f"## {rate_title} / worst gradient error",
        "",
        *_table(data, _cell_rate),
        "",
        "✗: disagrees with the reference (timed, but not a valid result); ?: not checked.",
        "",
    ]
    issues = {}
    for r in data["results"]:
        if r["status"] != "ok":
            issues.setdefault((r["impl"], r["status"], r["reason"]), []).append(
                f"{r['n']}" + (f" (D={r['d']})" if len(cfg["dims"]) > 1 else ""))
    if issues:
        lines += ["## Not run, or not valid", ""]
        for (impl, status, reason), where in issues.items():
            lines.append(f"- {impl} at N = {', '.join(where)}: {status}: {reason}")
        lines.append("")
    lines += ["## Implementations", ""]
    for name, info in data["implementations"].items():
        version = f" {info['version']}" if info.get("version") else ""
        lines.append(f"- {name}{version}: {info['description']}")
    spread = [(r["impl"], r["n"], r["time_ms"]["spread"]) for r in data["results"]
              if r["status"] in TIMED and r["time_ms"].get("spread") is not None]
    if spread:
        worst = max(spread, key=lambda x: x[2])
        lines += ["", f"Largest spread (p90 - p10) / median: {worst[2]:.1%} ({worst[0]} at N={worst[1]})."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ plots


def plots(data, out: Path) -> list[Path]:
    """time.png and memory.png against N (or D when only D varies), log-log."""
    global PLOT_SKIP_REASON
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        PLOT_SKIP_REASON = f"matplotlib not importable ({type(exc).__name__}: {exc})"
        return []
    cfg, env = data["config"], data["environment"]
    by_n = len(cfg["sizes"]) > 1 or len(cfg["dims"]) == 1
    loss = _loss(data)
    n_label = {"infonce": f"N (anchors; M = {_columns(cfg)})" if cfg["hard"] else "N = M",
               "nt_xent": "N (pairs; 2N rows)",
               "groups": f"N (tokens, in sequences of G = {cfg.get('group_size')})"}[loss]
    xkey, xlabel = ("n", n_label) if by_n else ("d", "D")
    series = {}
    for r in data["results"]:
        if r["status"] not in TIMED:
            continue
        label = r["impl"] + (f" D={r['d']}" if by_n and len(cfg["dims"]) > 1 else "")
        if not by_n and len(cfg["sizes"]) > 1:
            label += f" N={r['n']}"
        series.setdefault(label, []).append(r)
    if not series:
        PLOT_SKIP_REASON = "no implementation was timed"
        return []
    where = "CPU" if env["device_type"] != "cuda" else env["gpu_name"]
    dims = ",".join(str(d) for d in cfg["dims"])
    subtitle = (f"{where}, {cfg['dtype']}, D={dims}{', hard negatives' if cfg['hard'] else ''}"
                + (", GTE directions" if cfg.get("gte") else "")
                + (f", margin {cfg['margin']:g}" if cfg.get("margin") is not None else "")
                + (f", guide Dg={cfg['guide_dim']}" if cfg.get("guide_dim") else "")
                + (f", G={cfg.get('group_size')}" if loss == "groups" else ""))
    paths = []
    for kind, ylabel, value in (
            ("time", "forward + backward, median ms (bars: p10 to p90)", lambda r: r["time_ms"]["median"]),
            ("memory", "extra peak memory, GiB", lambda r: r["peak_extra_gib"])):
        fig, ax = plt.subplots(figsize=(7, 5))
        drawn = 0
        for label, rows in series.items():
            pts = sorted((r[xkey], value(r), r) for r in rows if value(r) is not None and value(r) > 0)
            if not pts:
                continue
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            line, = ax.plot(xs, ys, marker="o", label=label)
            if kind == "time":
                lo = [max(y - p[2]["time_ms"]["p10"], 0) for y, p in zip(ys, pts)]
                hi = [max(p[2]["time_ms"]["p90"] - y, 0) for y, p in zip(ys, pts)]
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor=line.get_color(), capsize=3)
            bad = [(x, y) for x, y, r in pts if r["status"] == "disagrees"]
            if bad:
                ax.plot(*zip(*bad), "x", color="red", markersize=12)
            drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{TITLES[loss]} {kind}: {subtitle}" + (" (CPU RUN)" if env["device_type"] != "cuda" else ""),
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{data['run_id']}-{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _columns(cfg: dict) -> str:
    """M in words: N, 2N with one hard negative per anchor, (K + 1) N with K; and the
    loss-family options of the run."""
    k = cfg.get("hard_k") or 1
    text = f"{k + 1}N ({k} hard negative{'s' if k > 1 else ''} per anchor)" if cfg["hard"] else "N"
    if cfg.get("gte"):
        text += "; all four directions in one softmax (GTE)"
    if cfg.get("margin") is not None:
        text += f"; false-negative margin {cfg['margin']:g}"
    if cfg.get("guide_dim"):
        text += f"; a guide model's mask (Dg = {cfg['guide_dim']}, threshold near 0.1)"
    return text


def main(argv: list[str]) -> int:
    for name in argv:
        path = Path(name)
        data = json.loads(path.read_text())
        (path.parent / f"{data['run_id']}.md").write_text(markdown(data))
        made = plots(data, path.parent)
        print(f"{path}: wrote {data['run_id']}.md and {', '.join(p.name for p in made) or 'no plots'}"
              + (f" ({PLOT_SKIP_REASON})" if PLOT_SKIP_REASON else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
