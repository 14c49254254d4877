"""A stage's record (its JSON, rewritten as it goes) and child processes held to a deadline."""

from __future__ import annotations

import datetime as _dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import write_json


class StageRecord:
    """``<out>/<n>-<name>.json``: what one stage did, saved after every step, so that a
    stage cut short leaves everything it finished. ``lines`` are its summary for a
    reader; ``deadline`` (time.time()) is when the stage must have ended its work."""

    def __init__(self, out: Path, number: int, name: str, deadline: float, dry_run: bool):
        self.out, self.number, self.name, self.deadline, self.dry_run = Path(out), number, name, deadline, dry_run
        self.stem = f"{number}-{name}"
        self.t0 = time.time()
        self.data = {"stage": name, "number": number, "status": "running", "dry_run": dry_run,
                     "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "budget_s": round(deadline - self.t0, 1), "elapsed_s": 0.0, "lines": []}
        self.save()

    @property
    def path(self) -> Path:
        return self.out / f"{self.stem}.json"

    def file(self, suffix: str) -> Path:
        """A file of this stage: ``<out>/<n>-<name><suffix>``."""
        return self.out / f"{self.stem}{suffix}"

    def left(self) -> float:
        return self.deadline - time.time()

    def line(self, text: str) -> None:
        """A summary line: printed (into the stage's log) and kept in the JSON."""
        print(text, flush=True)
        self.data["lines"].append(text)
        self.save()

    def save(self, status: str | None = None) -> None:
        if status:
            self.data["status"] = status
        self.data["elapsed_s"] = round(time.time() - self.t0, 1)
        write_json(self.path, self.data)


def run_until(cmd: list[str], deadline: float, log: Path | None = None, env: dict | None = None,
              cwd: Path | None = None, grace_s: float = 10.0) -> dict:
    """Run ``cmd`` in its own process group until it ends or ``deadline``; then SIGINT
    (so pytest and bench.py save what they have), and SIGKILL ``grace_s`` later.
    Returns ``{"returncode", "seconds", "cut"}``. The group (not a new session) lets the
    signals reach the command's own children, while whatever ends this process's session
    still ends them too."""
    t0 = time.time()
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    with open(log, "a") if log else open(os.devnull, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd, **group)
        cut = False
        try:
            proc.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            cut = True
            stop(proc, grace_s)
        except KeyboardInterrupt:
            stop(proc, grace_s)
            raise
    return {"returncode": proc.returncode, "seconds": round(time.time() - t0, 1), "cut": cut}


def stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGINT to the process group, then SIGKILL if it is still running after grace_s."""
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
