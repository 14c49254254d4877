#!/usr/bin/env python
"""One-directional InfoNCE (the default family): N anchors against M = N candidates, or
M = 2N with ``--hard`` (one hard negative per anchor, shared by all), cosine similarity,
tau 0.05, mean over rows; ``--symmetric`` adds the column direction (CLIP).

    python benchmarks/bench_infonce.py --sizes 16384,65536 --hard   # = bench.py --loss infonce ...

Counted work 8*N*M*D: the forward product plus a backward that recomputes it and forms
both gradients (the dense and compiled losses really do 6*N*M*D).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import Family  # noqa: E402


def _flops(spec) -> float:
    return 8.0 * spec.n * spec.m * spec.d + (8.0 * spec.n * spec.n * spec.d if spec.symmetric else 0.0)


def _reference(spec, x64, dense: bool):
    h = x64[2] if spec.hard else None
    if dense:
        from impls import dense_loss

        return "dense PyTorch in float64", dense_loss(x64[0], x64[1], h, temperature=spec.temperature,
                                                      symmetric=spec.symmetric)
    import fastcl

    return "fastcl backend='torch' (chunked PyTorch) in float64", fastcl.info_nce(
        x64[0], x64[1], h, temperature=spec.temperature, symmetric=spec.symmetric, backend="torch")


def _check(args) -> str | None:
    return "--group-size goes with --loss groups" if args.group_size is not None else None


FAMILY = Family(
    name="infonce", temperature=0.05, cpu_sizes=None, grad_names=("anchors", "positives", "hard_negatives"),
    flop_label="8NMD", flop_count="8NMD: the forward product plus a backward that recomputes it and forms both "
    "gradients",
    work_note="tflops_8nmd (and tflops): 8*N*M*D / median time (forward product + a backward that recomputes it "
    "and forms both gradients); the dense and compiled losses do 6*N*M*D of real work (tflops_real)",
    columns=lambda n, args: 2 * n if args.hard else n, flops=_flops, dense_logits=lambda s: s.n * s.m,
    reference=_reference, cost=lambda case: float(case.n) * case.m, check=_check)

if __name__ == "__main__":
    import bench

    sys.exit(bench.main(["--loss", "infonce", *sys.argv[1:]]))
