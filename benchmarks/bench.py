#!/usr/bin/env python
"""Benchmark fastcl's contrastive losses against the dense loss, torch.compile and the peers.

    python benchmarks/bench.py                       # defaults for the device found
    python benchmarks/bench.py --sizes 4096,16384,65536 --dim 768 --dtype bf16
    python benchmarks/bench.py --hard --sizes 16384   # supervised shape: M = 2N
    python benchmarks/bench.py --impls fastcl,dense --dim 128,384,768 --sizes 16384
    python benchmarks/bench.py --loss nt_xent         # SimCLR's NT-Xent on two views
    python benchmarks/bench.py --loss groups --group-size 128   # token-level, per sequence

Every implementation (``--list``; benchmarks/impls.py) computes the same loss forward and
backward, from the raw embeddings to their gradients, on identical inputs. ``--loss``
picks the family: ``infonce`` (bench_infonce.py), ``nt_xent`` (bench_nt_xent.py) or
``groups`` (bench_groups.py); each family script takes these same options. What is
measured, and how, is in benchmarks/suite.py.

Results go to ``--out`` (default benchmarks/results/) as ``<run id>.json`` (rewritten
after every case, so an interrupted run keeps what it measured), ``<run id>.md`` and
``<run id>-time.png`` / ``-memory.png`` (log-log against N); ``python
benchmarks/report.py RUN.json`` redraws the last two from the JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (str(HERE.parent), str(HERE)):  # fastcl from the checkout, and the sibling modules
    if _path not in sys.path:
        sys.path.insert(0, _path)

from harness import DTYPES  # noqa: E402

CUDA_DEFAULTS = dict(sizes=[4096, 16384, 65536], dims=[768], dtype="bf16", repeats=30, warmup=5, case_budget_s=3.0)
CPU_DEFAULTS = dict(sizes=[256, 1024, 2048], dims=[128], dtype="fp32", repeats=10, warmup=2, case_budget_s=2.0)
LOSSES = ("infonce", "nt_xent", "groups")


def families() -> dict:
    import bench_groups
    import bench_infonce
    import bench_nt_xent

    return {f.FAMILY.name: f.FAMILY for f in (bench_infonce, bench_nt_xent, bench_groups)}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(float(x)) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    return [x for x in text.replace(" ", "").split(",") if x]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--device", default=None, help="cuda or cpu (default: cuda if available)")
    add("--loss", choices=LOSSES, default="infonce",
        help="the loss: one-directional InfoNCE (default), NT-Xent (SimCLR: N pairs, 2N rows), or token-level "
             "groups (N tokens in sequences of --group-size)")
    add("--group-size", type=int, default=None,
        help="G, tokens per sequence for --loss groups (every size a multiple of it). Default CUDA 128, CPU 32")
    add("--sizes", type=_int_list, default=None,
        help="N, the anchors per batch (comma list). M = N, or 2N with --hard; NT-Xent: N pairs (2N rows); "
             f"groups: N tokens. Default CUDA {CUDA_DEFAULTS['sizes']}, CPU {CPU_DEFAULTS['sizes']} (NT-Xent "
             "[128, 512, 1024], groups [256, 1024, 4096])")
    add("--dim", "--dims", dest="dims", type=_int_list, default=None,
        help="embedding dim D (a comma list sweeps it). Default CUDA 768, CPU 128")
    add("--dtype", default=None, choices=sorted(DTYPES), help="input dtype. Default CUDA bf16, CPU fp32")
    add("--hard", action="store_true", help="supervised shape: one hard negative per anchor, shared by all (M = 2N)")
    add("--symmetric", action="store_true", help="average with the column direction of the in-batch block (CLIP)")
    add("--hard-k", type=int, default=None,
        help="K hard negatives per anchor (N x K x D; each also a negative for every other anchor, "
             "sentence-transformers' layout): implies --hard, M = (K + 1) N")
    add("--gte", action="store_true",
        help="all four directions in one softmax (GTE's improved contrastive loss; queries against queries and "
             "documents against documents too), with the false-negative margin --margin")
    add("--margin", type=float, default=None,
        help="false-negative margin (Qwen3-Embedding: 0.1): drop candidates more similar than the positive plus "
             "this; default 0.1 with --gte, else none")
    add("--guide-dim", type=int, default=None, metavar="DG",
        help="GISTEmbed's / DCLR's guide mask: a guide model's rows (DG wide) for the anchors and the candidates, "
             "random +-1, and a threshold near 0.1 that every precision decides alike (about 2%% of the entries "
             "dropped at DG = 384); fastcl forms the guide's products in its kernels, the dense loss as a matrix")
    add("--temperature", type=float, default=None, help="tau (default 0.05; NT-Xent 0.1)")
    add("--impls", type=_str_list, default=None,
        help="comma list of implementations (default: all for the device); see --list")
    add("--list", action="store_true", help="list the implementations (of --loss) and exit")
    add("--repeats", type=int, default=None,
        help="timed calls per case, at most (fewer when --case-budget-s runs out, never fewer than "
             "--min-repeats). Default CUDA 30, CPU 10")
    add("--min-repeats", type=int, default=5)
    add("--warmup", type=int, default=None,
        help="untimed calls before timing, at most (bounded to about a second). Default CUDA 5, CPU 2")
    add("--case-budget-s", type=float, default=None, help="seconds of timed calls per case (default CUDA 3, CPU 2)")
    add("--max-call-s", type=float, default=30.0,
        help="skip a case whose one call is predicted (from a smaller N) to take longer")
    add("--time-budget-s", type=float, default=None,
        help="start no case after this many seconds (the rest is recorded as skipped)")
    add("--max-input-sets", type=int, default=8, help="input sets rotated while timing when one set would fit in cache")
    add("--fp32-precision", choices=["highest", "high"], default=None,
        help="torch.set_float32_matmul_precision for fp32 inputs: 'high' allows tf32. Default: 'high' on CUDA, "
             "'highest' on CPU")
    add("--compile-mode", default="default",
        help="torch.compile mode of the compiled dense loss (default, max-autotune, ...)")
    add("--no-check", action="store_true", help="skip the agreement check (not recommended)")
    add("--ref-max-flops", type=float, default=None,
        help="largest work for which a float64 reference is computed (default CUDA 1e15, CPU 2e11); above it the "
             "agreement is recorded as unchecked")
    add("--ref-dense-max-gib", type=float, default=None,
        help="the reference is the dense loss in float64 while its logit matrices (4 of them) fit in this many "
             "GiB, else fastcl's chunked path in float64 (default CUDA: a third of free memory, CPU 2)")
    add("--no-memory", action="store_true", help="skip the peak-memory measurement")
    add("--no-plots", action="store_true")
    add("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs (default: torch's own choice)")
    add("--seed", type=int, default=0)
    add("--out", default=str(HERE / "results"), help="output directory")
    add("--tag", default="", help="appended to the run id")
    add("--run-id", default=None, help="the run id (default: date-device-dtype-D...)")
    add("--plant-error", action="store_true", help=argparse.SUPPRESS)  # test hook: a planted gradient error
    args = ap.parse_args(argv)
    args.argv = list(sys.argv if argv is None else ["benchmarks/bench.py", *argv])
    return args


def apply_defaults(args, device, family) -> None:
    defaults = dict(CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS, temperature=family.temperature)
    if device.type != "cuda" and family.cpu_sizes:
        defaults["sizes"] = family.cpu_sizes
    if family.name == "groups":
        from bench_groups import GROUP_SIZE_DEFAULT

        defaults["group_size"] = GROUP_SIZE_DEFAULT[device.type if device.type == "cuda" else "cpu"]
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if getattr(args, "hard_k", None):
        args.hard = True
    if getattr(args, "gte", False) and args.margin is None:
        args.margin = 0.1
    if args.fp32_precision is None:
        args.fp32_precision = "high" if device.type == "cuda" else "highest"
    if args.ref_max_flops is None:
        args.ref_max_flops = 1e15 if device.type == "cuda" else 2e11
    args.dtype = DTYPES[args.dtype]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if device.type == "cpu" and any(_runs_triton(name) for name in args.impls or []):
        # The Triton kernels run on CPU only in the interpreter, which must be switched on
        # before anything imports triton. It also makes fastcl's "auto" pick them.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from impls import default_impls, registry

    family = families()[args.loss]
    impls = registry(args.loss)
    if args.list:
        for name, impl in impls.items():
            if not impl.hidden:
                ok, why = impl.available()
                print(f"{name:17s} {impl.description}{'' if ok else '  [' + why + ']'}")
        return 0
    apply_defaults(args, device, family)
    problem = family.check(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args.impls = args.impls or default_impls(device, args.loss)
    unknown = [n for n in args.impls if n not in impls]
    if unknown:
        print(f"error: unknown implementation(s) {unknown} for --loss {args.loss}; known: "
              f"{[n for n in impls if not impls[n].hidden]}", file=sys.stderr)
        return 2
    if args.plant_error and "planted-error" not in args.impls:
        args.impls.append("planted-error")
    from suite import Run

    run = Run(args, family)
    _, md = run.run()
    print()
    print(md)
    print(f"results: {run.out / (run.run_id + '.json')} (+ .md"
          f"{', ' + ', '.join(p.name for p in run.plots) if run.plots else ''})")
    return 130 if run.interrupted else 0


def _runs_triton(name: str) -> bool:
    """fastcl-triton and the fastcl-<backward strategy> implementations (told by name:
    nothing that imports triton may run before the interpreter is switched on)."""
    return name.startswith("fastcl-") and name not in ("fastcl-torch", "fastcl-dense") \
        and not name.startswith("fastcl-native")


if __name__ == "__main__":
    sys.exit(main())
