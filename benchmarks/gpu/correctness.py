"""Stage 2: the CUDA tests at real sizes, with every relative error on record.

pytest runs the tests marked ``gpu`` (tests/test_memory.py's peak memory at N = 65536,
tests/test_at_scale.py: N = 4096, 16384, 65536, D = 768, bf16, fp16, fp32 with tf32
and in full precision, every option set, every backward strategy, against the chunked
path in float64). Each test's outcome and printed errors are recorded as it ends
(pytest_record.py), JUnit XML at the end. A printed error that is NaN or infinite fails
its case here whatever the test said: NaN never passes. A dry run runs the CPU versions
of the same checks, at small sizes in the interpreter.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter

from benchmarks.gpu import REPO
from benchmarks.gpu.record import run_until

GPU_TESTS = ["tests/test_memory.py", "tests/test_at_scale.py", "-m", "gpu"]
DRY_TESTS = ["tests/test_at_scale.py", "-k", "test_scale_check_on_cpu and unsupervised and bf16"]
# "N=65536 D=768 bf16/highest everything slab: loss 1.2e-03, anchors 3.4e-03, ..."
ERROR_LINE = re.compile(r"^(N=\d+.*?): (.*)$")


def parse_errors(stdout: str) -> dict[str, dict[str, float]]:
    """The relative errors a test printed, by the case its line names."""
    cases = {}
    for line in (stdout or "").splitlines():
        match = ERROR_LINE.match(line.strip())
        if not match:
            continue
        errors = {}
        for part in match.group(2).split(","):
            name, _, value = part.strip().rpartition(" ")
            try:
                errors[name] = float(value)
            except ValueError:
                continue
        if errors:
            cases[match.group(1)] = errors
    return cases


def failure_line(message: str | None) -> str:
    """The assertion or exception line of a failure report (pytest's "E " lines)."""
    lines = (message or "").strip().splitlines()
    return next((x[1:].strip() for x in lines if x.startswith("E ")), lines[-1] if lines else "")


def read_record(path) -> list[dict]:
    """The tests recorded so far, each with its parsed errors; NaN or inf fails it."""
    tests = []
    if not os.path.exists(path):
        return tests
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut by the stop
                continue
            entry["errors"] = parse_errors(entry.pop("stdout", ""))
            bad = [f"{case}: {name} {value}" for case, errs in entry["errors"].items()
                   for name, value in errs.items() if not math.isfinite(value)]
            if bad and entry["outcome"] == "passed":
                entry["outcome"], entry["message"] = "failed", "non-finite error: " + "; ".join(bad)
            tests.append(entry)
    return tests


def run(rec, args, pytest_args: list[str] | None = None) -> None:
    record = rec.file(".tests.jsonl")
    record.unlink(missing_ok=True)
    selection = pytest_args or (DRY_TESTS if args.dry_run else GPU_TESTS)
    cmd = [sys.executable, "-m", "pytest", *selection, "-p", "no:cacheprovider", "-p", "benchmarks.gpu.pytest_record",
           "-o", "junit_logging=system-out", f"--junitxml={rec.file('.junit.xml')}", "-rfE", "--durations=10"]
    env = dict(os.environ, FASTCL_TEST_RECORD=str(record))
    rec.data["command"] = " ".join(cmd[1:])
    rec.save()
    # pytest stops on SIGINT and still writes its XML: leave it 15 s before the deadline
    outcome = run_until(cmd, rec.deadline - 15, log=rec.file(".pytest.log"), env=env, cwd=REPO)
    tests = read_record(record)
    counts = Counter(t["outcome"] for t in tests)
    rec.data.update(pytest=outcome, counts=dict(counts), tests=tests)
    worst: dict[str, float] = {}
    for t in tests:
        for case, errors in t["errors"].items():
            key = " ".join(case.split()[2:])  # dtype/precision, option set, strategy
            worst[key] = max(worst.get(key, 0.0), max(errors.values()))
    rec.data["worst_error_by_case"] = worst
    cut = " (cut at the stage's time limit)" if outcome["cut"] else ""
    rec.line(f"tests: {counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
             f"{counts.get('skipped', 0)} skipped in {outcome['seconds']:.0f} s{cut}; "
             f"{sum(len(t['errors']) for t in tests)} cases with their errors")
    for t in [t for t in tests if t["outcome"] == "failed"][:20]:
        rec.line(f"  FAILED {t['test']}: {failure_line(t.get('message'))}")
    if not tests:
        rec.line(f"no test recorded (pytest exit {outcome['returncode']}; see {rec.file('.pytest.log').name})")
