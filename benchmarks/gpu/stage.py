"""One stage of the GPU runner, in its own process (the runner starts it and holds it to
its time limit): ``python -m benchmarks.gpu.stage NAME --out DIR --deadline T``.

A stage that raises is recorded as failed with its traceback's last line; one that is
interrupted saves what it has. ``--fail`` and ``--hang`` (hidden) make a stage fail or
overrun on purpose, so that the runner's handling of both can be tested.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback

import importlib

from benchmarks.gpu.plan import STAGES
from benchmarks.gpu.record import StageRecord



def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.stage", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=[s.name for s in STAGES])
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline", type=float, required=True, help="time.time() by which the stage must end")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--data", default=None)
    ap.add_argument("--fail", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hang", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    number = next(s.number for s in STAGES if s.name == args.name)
    rec = StageRecord(args.out, number, args.name, args.deadline, args.dry_run)
    try:
        if args.fail:
            raise RuntimeError("failure injected with --inject-failure")
        if args.hang:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the runner's SIGKILL ends it
            rec.line("hanging on purpose (--inject-hang)")
            time.sleep(3600)
        if args.dry_run:
            import torch

            torch.set_num_threads(1)
        importlib.import_module(f"benchmarks.gpu.{args.name}").run(rec, args)
    except KeyboardInterrupt:
        rec.line("interrupted: stopped at the stage's time limit")
        rec.save("interrupted")
        return 130
    except BaseException as exc:
        rec.data["traceback"] = traceback.format_exc()
        rec.line(f"failed: {type(exc).__name__}: {exc}")
        rec.save("failed")
        traceback.print_exc()
        return 1
    rec.save("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
