#!/usr/bin/env python
"""NT-Xent (SimCLR) on two views z1, z2 (N x D each): all 2N rows are anchors against the
other 2N - 1 rows, target the other view; tau 0.1.

    python benchmarks/bench_nt_xent.py --sizes 4096,16384   # = bench.py --loss nt_xent ...

Counted work 8*(2N)^2*D: the fused work over the 2N x 2N matrix of z = [z1; z2] (self
column included); the dense and compiled losses do 6*(2N)^2*D.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import Family  # noqa: E402


def _reference(spec, x64, dense: bool):
    if dense:
        from impls import dense_nt_xent

        return "dense PyTorch NT-Xent in float64", dense_nt_xent(x64[0], x64[1], temperature=spec.temperature)
    import fastcl

    return "fastcl backend='torch' (chunked PyTorch) in float64", fastcl.nt_xent(
        x64[0], x64[1], temperature=spec.temperature, backend="torch")


def _check(args) -> str | None:
    if args.hard or args.symmetric or args.hard_k or args.gte or args.margin is not None or args.guide_dim:
        return "--hard, --hard-k, --symmetric, --gte, --margin and --guide-dim are InfoNCE options, not for --loss nt_xent"
    return "--group-size goes with --loss groups" if args.group_size is not None else None


FAMILY = Family(
    name="nt_xent", tag="ntxent", temperature=0.1, cpu_sizes=[128, 512, 1024], grad_names=("z1", "z2"),
    flop_label="8(2N)^2D", flop_count="8(2N)^2 D: the same fused work over the 2N x 2N matrix of z = [z1; z2] "
    "(self column included)",
    work_note="tflops: 8*(2N)^2*D / median time, the fused work over the 2N x 2N matrix of z = [z1; z2] (self "
    "column included); the dense and compiled losses do 6*(2N)^2*D of real work (tflops_real)",
    columns=lambda n, args: 2 * n, flops=lambda s: 8.0 * (2 * s.n) ** 2 * s.d,
    dense_logits=lambda s: (2 * s.n) ** 2, reference=_reference, cost=lambda case: float(case.n) * case.m,
    check=_check)

if __name__ == "__main__":
    import bench

    sys.exit(bench.main(["--loss", "nt_xent", *sys.argv[1:]]))
