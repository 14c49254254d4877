"""A pytest plugin: one JSON line per test into ``$FASTCL_TEST_RECORD`` as it ends.

pytest writes its JUnit XML only at the end of the session; a run stopped by a time
limit would leave nothing. This record is appended test by test (outcome, duration,
what the test printed, the first lines of a failure).

    FASTCL_TEST_RECORD=out.jsonl python -m pytest -p benchmarks.gpu.pytest_record ...
"""

import json
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("FASTCL_TEST_RECORD")
    # one line per test: its call, or the setup / teardown that failed or skipped it
    if not path or (report.when != "call" and report.passed):
        return
    entry = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
             "seconds": round(report.duration, 3), "stdout": report.capstdout}
    if report.failed or report.skipped:
        entry["message"] = str(report.longrepr)[-2000:] if report.longrepr else None
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
