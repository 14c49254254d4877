"""Stage 5: what time is left, spent on plan.EXTRA in order (benchmarks, benchmark scripts
and pytest runs)."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from benchmarks.gpu import REPO
from benchmarks.gpu.correctness import failure_line, read_record
from benchmarks.gpu.plan import EXTRA, Pytest, Script
from benchmarks.gpu.record import run_until
from benchmarks.gpu.speed import run_bench, share_of_left


def run_pytest(rec, entry: Pytest, budget: float) -> None:
    record_path = rec.file(f".{entry.name}.jsonl")
    record_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *shlex.split(entry.options), "-p", "no:cacheprovider",
           "-p", "benchmarks.gpu.pytest_record"]
    entry_record = {"name": entry.name, "budget_s": round(budget, 1), "command": "python " + shlex.join(cmd[1:])}
    rec.data.setdefault("runs", []).append(entry_record)
    rec.save()
    outcome = run_until(cmd, time.time() + budget, log=rec.file(f".{entry.name}.log"), cwd=REPO,
                        env=dict(os.environ, FASTCL_TEST_RECORD=str(record_path)))
    tests = read_record(record_path)
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    entry_record.update(outcome, counts=counts, failed=[{"test": t["test"], "message": failure_line(t.get("message"))}
                                                        for t in tests if t["outcome"] == "failed"])
    rec.line(f"{entry.name}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped in "
             f"{outcome['seconds']:.0f} s{' (cut at its time limit)' if outcome['cut'] else ''}")
    for failure in entry_record["failed"][:10]:
        rec.line(f"  FAILED {failure['test']}: {failure['message']}")


def run_script(rec, entry: Script, budget: float, dry_run: bool, model: str | None = None) -> None:
    """One benchmark script in its own process, cut at ``budget`` seconds (SIGINT: what
    it has written stays); its report is rewritten from its JSON when it was cut.
    ``model``: the runner's ``--model``, passed on to scripts that take one."""
    out = rec.file(f"-{entry.name}")
    script = REPO / "benchmarks" / entry.script
    options = shlex.split(entry.tiny if dry_run else entry.options)
    if entry.model and model:
        options += ["--model", str(Path(model).resolve())]
    cmd = [sys.executable, str(script), *options, "--out", str(out)]
    entry_record = {"name": entry.name, "budget_s": round(budget, 1),
                    "command": f"python benchmarks/{entry.script} " + shlex.join(cmd[2:])}
    rec.data.setdefault("runs", []).append(entry_record)
    if budget < (2 if dry_run else 15):
        entry_record.update(status="skipped", reason=f"{max(budget, 0):.0f} s left for it")
        rec.save()
        return
    rec.save()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    outcome = run_until(cmd, time.time() + budget, log=rec.file(f".{entry.name}.log"), cwd=REPO, env=env)
    results = sorted(out.glob("*.json"))
    if outcome["returncode"] != 0 and results:  # cut or failed: the markdown and plot from what was measured
        run_until([*cmd, "--report-only"], time.time() + 60, log=rec.file(f".{entry.name}.log"), cwd=REPO, env=env)
    status = "done" if outcome["returncode"] == 0 else ("cut at its time limit" if outcome["cut"]
                                                         else f"exit {outcome['returncode']}")
    entry_record.update(outcome, status=status, results=[str(p.relative_to(rec.out)) for p in results])
    rec.save()
    rec.line(f"{entry.name}: {status} in {outcome['seconds']:.0f} s")
    for path in results:
        try:
            rows = json.loads(path.read_text())["results"]
        except (OSError, ValueError, KeyError):
            continue
        for r in rows:
            what = (f"{r['seconds'] * 1e3:,.0f} ms, {r['peak_bytes'] / 2 ** 20:,.0f} MiB" if r.get("status") == "ok"
                    else r.get("status", "?"))
            rec.line(f"  N={r['n']} D={r['d']} K={r['k']} {r['impl']}: {what}")


def run(rec, args) -> None:
    entries = EXTRA
    if args.dry_run:  # the test suite has its own CPU run
        rec.data["runs"] = [{"name": e.name, "status": "skipped: GPU only"} for e in EXTRA if isinstance(e, Pytest)]
        entries = [e for e in EXTRA if not isinstance(e, Pytest)]
    for i, entry in enumerate(entries):
        budget = share_of_left(rec, entries, i, margin_s=5.0)
        if isinstance(entry, Pytest):
            if budget >= 20:
                run_pytest(rec, entry, budget)
        elif isinstance(entry, Script):
            run_script(rec, entry, budget, args.dry_run, args.model)
        elif run_bench(rec, entry, budget, args.dry_run) == 130:
            break
