"""Stage 3 (and stage 5's benchmarks): bench.py runs, in this process, one after another.

Each run is a :class:`plan.Bench`: its bench.py options, and its share of the stage's
time, passed on as ``--time-budget-s`` (no case starts after it; bench.py predicts a
case's time from the size below it and skips one that cannot fit). Each writes
``<out>/<n>-<stage>-<name>.json`` after every case, and its markdown and plots at the
end, through benchmarks/suite.py.
"""

from __future__ import annotations

import json
import shlex
import time

from benchmarks.gpu.plan import SPEED_RUNS, TINY, TINY_IMPLS, Bench
from internals import backward_strategies

#: Shorter cases than bench.py's defaults: a stage times many of them.
GPU_COMMON = "--case-budget-s 1 --repeats 20 --warmup 3"


def bench_argv(entry: Bench, dry_run: bool) -> list[str]:
    strategies = ",".join(f"fastcl-{s}" for s in backward_strategies())
    # the entry's own options override the common ones; a dry run's tiny sizes override both
    options = f"{entry.options} {TINY} {entry.tiny}" if dry_run else f"{GPU_COMMON} {entry.options}"
    argv = shlex.split(options.replace("{strategies}", strategies))
    if dry_run:
        if "--impls" not in argv:
            argv += ["--impls", TINY_IMPLS.replace("{strategies}", strategies)]
        i = argv.index("--impls") + 1
        argv[i] = ",".join(x for x in argv[i].split(",") if x != "compiled")
    return argv


def run_bench(rec, entry: Bench, budget: float, dry_run: bool) -> int | None:
    """One bench.py run within ``budget`` seconds, recorded in the stage's JSON; returns
    bench.py's exit code (130: it was interrupted), None when it did not start."""
    import bench

    run_id = f"{rec.stem}-{entry.name}"
    record = {"name": entry.name, "run_id": run_id, "budget_s": round(budget, 1)}
    rec.data.setdefault("runs", []).append(record)
    if budget < (2 if dry_run else 15):
        record.update(status="skipped", reason=f"{max(budget, 0):.0f} s left for it")
        rec.save()
        return None
    argv = bench_argv(entry, dry_run) + ["--out", str(rec.out), "--run-id", run_id, "--time-budget-s", f"{budget:.0f}"]
    record["command"] = "python benchmarks/bench.py " + shlex.join(argv)
    rec.save()
    t0 = time.time()
    try:
        code = bench.main(argv)
        record.update(status={0: "done", 130: "interrupted"}.get(code, f"exit {code}"))
    except Exception as exc:  # one run failing must not stop the others
        record.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        code = 1
    record["seconds"] = round(time.time() - t0, 1)
    rec.line(f"{entry.name}: {record['status']} in {record['seconds']:.0f} s")
    for line in summarize(rec.out / f"{run_id}.json"):
        rec.line(f"  {line}")
    return code


def share_of_left(rec, entries: list, i: int, margin_s: float = 10.0) -> float:
    """Entry i's part of the stage's time left, by its share among the entries left."""
    return (rec.left() - margin_s) * entries[i].share / sum(e.share for e in entries[i:])


def summarize(path) -> list[str]:
    """One line per size: each implementation's median ms and extra GiB (or its status)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return ["no results"]
    lines = []
    shapes = sorted({(r["n"], r["d"]) for r in data["results"]})
    for n, d in shapes:
        cells = []
        for r in (r for r in data["results"] if (r["n"], r["d"]) == (n, d)):
            if r["status"] in ("ok", "disagrees", "unchecked"):
                mark = {"ok": "", "disagrees": " DISAGREES", "unchecked": ""}[r["status"]]
                gib = f"/{r['peak_extra_gib']:.2f} GiB" if r.get("peak_extra_gib") is not None else ""
                cells.append(f"{r['impl']} {r['time_ms']['median']:.3g} ms{gib}{mark}")
            elif r["status"] not in ("unavailable",):
                cells.append(f"{r['impl']} {r['status']}")
        lines.append(f"N={n}" + (f" D={d}" if len({d for _, d in shapes}) > 1 else "") + ": " + ", ".join(cells))
    return lines or ["no cases"]


def run(rec, args) -> None:
    for i, entry in enumerate(SPEED_RUNS):
        if run_bench(rec, entry, share_of_left(rec, SPEED_RUNS, i), args.dry_run) == 130:
            break  # the stage is being stopped: leave the rest
