#!/usr/bin/env python
"""One-directional InfoNCE (the default family): N anchors against M = N candidates, or
M = 2N with ``--hard`` (one hard negative per anchor, shared by all), cosine similarity,
tau 0.05, mean over rows; ``--symmetric`` adds the column direction (CLIP). The loss
family's cases: ``--hard-k K`` (K hard negatives per anchor, M = (K + 1) N), ``--gte``
(all four directions in one softmax, GTE) and ``--margin m`` (the false-negative margin,
Qwen3-Embedding's 0.1 by default with ``--gte``) and ``--guide-dim Dg`` (GISTEmbed's and
DCLR's guide mask: a guide model's rows for every anchor and candidate; an entry other
than the positive is dropped when the guide's cosine exceeds the threshold).

    python benchmarks/bench_infonce.py --sizes 16384,65536 --hard   # = bench.py --loss infonce ...
    python benchmarks/bench_infonce.py --hard-k 7                   # K = 7: M = 8N
    python benchmarks/bench_infonce.py --gte --hard                 # Qwen3 / GTE: 4 directions, margin 0.1
    python benchmarks/bench_infonce.py --hard --guide-dim 384       # GISTEmbed / DCLR: the guide mask

Counted work 8*N*M*D: the forward product plus a backward that recomputes it and forms
both gradients (the dense and compiled losses really do 6*N*M*D); with ``--gte`` the
other three directions add 8*N*(N + N + M)*D. The guide's products (2*N*M*Dg per pass
over the logits) are not counted.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import Family  # noqa: E402


def _flops(spec) -> float:
    extra = spec.n * spec.n if spec.symmetric else 0
    if spec.gte:  # query_to_query (N), doc_to_query (N), doc_to_doc (M) columns per row
        extra = spec.n * (2 * spec.n + spec.m)
    return 8.0 * spec.n * spec.m * spec.d + 8.0 * extra * spec.d


def _reference(spec, x64, dense: bool):
    h = x64[2] if spec.hard else None
    if not spec.plain:  # the loss family: the dense reference (sentence-transformers' equal) or chunked
        import fastcl

        if dense:
            return "fastcl.info_nce_reference (dense) in float64", fastcl.info_nce_reference(
                x64[0], x64[1], h, temperature=spec.temperature, **spec.family_options)
        return "fastcl backend='torch' (chunked PyTorch) in float64", fastcl.info_nce(
            x64[0], x64[1], h, temperature=spec.temperature, backend="torch", **spec.family_options)
    if dense:
        from impls import dense_loss

        return "dense PyTorch in float64", dense_loss(x64[0], x64[1], h, temperature=spec.temperature,
                                                      symmetric=spec.symmetric)
    import fastcl

    return "fastcl backend='torch' (chunked PyTorch) in float64", fastcl.info_nce(
        x64[0], x64[1], h, temperature=spec.temperature, symmetric=spec.symmetric, backend="torch")


def _check(args) -> str | None:
    if args.hard_k is not None and args.hard_k < 1:
        return "--hard-k must be >= 1"
    if args.symmetric and (args.gte or args.margin is not None or (args.hard_k or 1) > 1):
        return "--symmetric is one direction pair: not with --gte, --margin or --hard-k > 1"
    if args.guide_dim is not None:
        if args.guide_dim < 1:
            return "--guide-dim must be >= 1"
        if args.gte or args.symmetric:
            return "--guide-dim is measured on the query_to_doc direction: not with --gte or --symmetric"
    return "--group-size goes with --loss groups" if args.group_size is not None else None


FAMILY = Family(
    name="infonce", temperature=0.05, cpu_sizes=None, grad_names=("anchors", "positives", "hard_negatives"),
    flop_label="8NMD", flop_count="8NMD: the forward product plus a backward that recomputes it and forms both "
    "gradients",
    work_note="tflops_8nmd (and tflops): 8*N*M*D / median time (forward product + a backward that recomputes it "
    "and forms both gradients); the dense and compiled losses do 6*N*M*D of real work (tflops_real)",
    columns=lambda n, args: (1 + (args.hard_k or 1)) * n if args.hard else n, flops=_flops,
    dense_logits=lambda s: s.n * s.m + (s.n * (2 * s.n + s.m) if s.gte else 0),
    reference=_reference, cost=lambda case: float(case.n) * case.m, check=_check)

if __name__ == "__main__":
    import bench

    sys.exit(bench.main(["--loss", "infonce", *sys.argv[1:]]))
