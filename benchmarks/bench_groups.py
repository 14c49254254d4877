#!/usr/bin/env python
"""Token-level InfoNCE in groups (TaCL): N tokens in N / G sequences of G tokens, sorted by
sequence; a token's candidates are the positives of its own sequence; tau 0.05.

    python benchmarks/bench_groups.py --group-size 128   # = bench.py --loss groups ...

Counted work 8*N*G*D, the useful work within the sequences; the work really done is
recorded where known (6*N*G*D per sequence, 6*N^2*D for the masked dense loss, 8*N^2*D
for fastcl's chunked path, which computes every logit and masks).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import Family  # noqa: E402

GROUP_SIZE_DEFAULT = {"cuda": 128, "cpu": 32}


def _reference(spec, x64, dense: bool):
    from impls import dense_grouped, sequence_ids

    if dense:
        return "dense PyTorch per sequence (torch.bmm) in float64", dense_grouped(
            x64[0], x64[1], group_size=spec.group_size, temperature=spec.temperature)
    import fastcl

    return "fastcl backend='torch' (chunked PyTorch) in float64", fastcl.info_nce(
        x64[0], x64[1], temperature=spec.temperature, groups=sequence_ids(spec), backend="torch")


def _cost(case) -> float:
    """N*G where only the sequences are computed (the per-sequence dense losses, the
    Triton kernels), N^2 where the whole matrix is."""
    linear = case.impl in ("dense", "compiled", "planted-error") or case.backend == "triton"
    return float(case.n) * (case.group_size if linear else case.n)


def _check(args) -> str | None:
    if args.hard or args.symmetric or args.hard_k or args.gte or args.margin is not None or args.guide_dim:
        return "--hard, --hard-k, --symmetric, --gte, --margin and --guide-dim are InfoNCE options, not for --loss groups"
    if args.group_size < 2:
        return f"--group-size must be at least 2 (a token needs a negative), got {args.group_size}"
    bad = [n for n in args.sizes if n % args.group_size]
    if bad:
        return f"--loss groups: every size must be a multiple of --group-size {args.group_size}; {bad} are not"
    return None


FAMILY = Family(
    name="groups", tag="groups", temperature=0.05, cpu_sizes=[256, 1024, 4096], grad_names=("anchors", "positives"),
    flop_label="8NGD", flop_count="8NGD: the useful work only, within the sequences (N tokens x G candidates each)",
    work_note="tflops: 8*N*G*D / median time, the useful work within the sequences only; tflops_real: the work "
    "really done where known: 6*N*G*D for the per-sequence dense and compiled losses, 6*N^2*D for the masked "
    "dense loss, 8*N^2*D for fastcl's chunked path (it computes every logit and masks); the Triton kernels skip "
    "the tiles that share no sequence, so theirs is 8*N*G*D up to the rounding of sequences to tiles",
    columns=lambda n, args: n, flops=lambda s: 8.0 * s.n * s.group_size * s.d,
    dense_logits=lambda s: s.n * s.group_size, reference=_reference, cost=_cost,
    # the fallback reference (fastcl's chunked path) computes the whole N x N matrix
    reference_flops=lambda s, dense: 8.0 * s.n * (s.group_size if dense else s.n) * s.d, check=_check)

if __name__ == "__main__":
    import bench

    sys.exit(bench.main(["--loss", "groups", *sys.argv[1:]]))
