"""Stage 5: what time is left, spent on plan.EXTRA in order (benchmarks and pytest runs)."""

from __future__ import annotations

import os
import shlex
import sys
import time

from benchmarks.gpu import REPO
from benchmarks.gpu.correctness import failure_line, read_record
from benchmarks.gpu.plan import EXTRA, Pytest
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
        elif run_bench(rec, entry, budget, args.dry_run) == 130:
            break
