"""Tune the kernels' launch configurations by measurement, in two steps.

1. ``static`` (any machine, no GPU): compile every candidate of a grid for the target
   architecture with Triton's own ptxas and keep those with no register spills and
   shared memory within the limit. Writes the candidate list (JSON).

       python benchmarks/tune.py static --arch 90 --out benchmarks/results/tune_candidates_sm90.json

2. ``measure`` (on the GPU): compile the candidates in parallel (warming Triton's cache),
   time each with ``triton.testing.do_bench`` (median) at one size, check its outputs
   against the default configuration's, and write the fastest correct one per
   (kernel, dtype family, D) into ``fastcl/ops/tuned/<arch>.json``, the table
   ``fastcl.ops.configs`` reads.

       python benchmarks/tune.py measure --candidates benchmarks/results/tune_candidates_sm90.json \\
           --n 16384 --write fastcl/ops/tuned/sm90.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import itertools
import json
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastcl.ops.configs import KERNELS, KernelConfig, override_config  # noqa: E402
from harness import first_line, write_json  # noqa: E402

FAMILIES = {"half": torch.bfloat16, "fp32": torch.float32}
#: The loss's default normalization eps: kernels are tuned as the default loss runs them.
EPS = 1e-12
#: The compile_report option sets the static screen compiles: the default loss, with and
#: without the fused normalization, the launches a tuned configuration serves (launches
#: with more rules take their own, fastcl/ops/configs.py).
STATIC_VARIANTS = ("plain", "normalized")


def candidate_grid(kernel: str, family: str, dim: int):
    """The configurations worth trying for one kernel (before the static filter)."""
    d_steps = (64, 128) if family == "half" else (32, 64)
    if kernel in ("forward", "backward_ds", "one_pass_logits"):
        for bm, bn, bd, warps, stages in itertools.product((64, 128), (32, 64, 128, 256), d_steps, (4, 8), (3, 4)):
            yield KernelConfig(bm, bn, bd, 64, warps, stages)
    else:
        # A slab of 1024 would hold, at 64 rows on 8 warps, 256 fp32 accumulator
        # registers per thread: more than a thread has.
        widest = max(64, 1 << max(dim - 1, 0).bit_length())
        outs = sorted({o for o in (128, 256, 512, widest) if o <= min(widest, 512)})
        for bm, bn, bd_out, warps, stages in itertools.product((32, 64, 128), (32, 64, 128), outs, (4, 8), (1, 2)):
            yield KernelConfig(bm, bn, d_steps[0], bd_out, warps, stages)


def _static_check(args):
    kernel, family, dim, arch, cfg = args
    from fastcl.ops import compile_report

    reports, problems = [], []
    # fp32 in both precisions: tf32 (the default matmul precision) and full fp32.
    precisions = ("tf32", "ieee") if family == "fp32" else ("ieee",)
    for variant, precision in itertools.product(STATIC_VARIANTS, precisions):
        try:
            report = compile_report.compile_one(kernel, FAMILIES[family], precision, variant, cfg, arch)
        except Exception as exc:  # a config Triton cannot compile is simply not a candidate
            return kernel, family, dim, cfg, None, first_line(exc, 120)
        reports.append(report)
        problems += [f"{variant}/{precision}: {p}" for p in report.problems()]
    return kernel, family, dim, cfg, reports[0], "; ".join(problems)


def run_static(args) -> None:
    jobs = [(kernel, family, dim, args.arch, cfg)
            for kernel in args.kernels
            for family in args.families for dim in args.dims
            for cfg in candidate_grid(kernel, family, dim)]
    print(f"compiling {len(jobs)} candidates for sm_{args.arch} with {args.jobs} processes")
    kept: dict = {}
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        results = pool.map(_static_check, jobs, chunksize=4)
        for kernel, family, dim, cfg, report, problems in tqdm(results, total=len(jobs), unit="config",
                                                                file=sys.stderr):
            if report is None or problems:
                continue
            kept.setdefault(kernel, {}).setdefault(family, {}).setdefault(str(dim), []).append(
                dict(config=cfg.as_dict(), registers=report.registers, shared_bytes=report.shared_bytes))
    total = sum(len(v) for k in kept.values() for f in k.values() for v in f.values())
    print(f"{total} of {len(jobs)} compile without spills within the shared-memory limit")
    with open(args.out, "w") as f:
        json.dump(dict(arch=f"sm{args.arch}", triton=_triton_version(), date=str(datetime.date.today()),
                       variants=STATIC_VARIANTS, candidates=kept), f, indent=1)
    print(f"wrote {args.out}")


def _triton_version() -> str:
    import triton

    return triton.__version__


# ---------------------------------------------------------------------------- measure


def _problem(kernel: str, dtype: torch.dtype, n: int, dim: int, device: str = "cuda", seed: int = 0):
    """Inputs of one kernel launch at N = M = n: raw rows, normalized in the kernels, as
    the loss's default (normalize=True) runs them."""
    from fastcl.ops.function import kernel_params
    from fastcl.ops.infonce_fwd import infonce_forward
    from fastcl.ops.layout import ColumnLayout

    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n, dim, device=device, generator=gen).to(dtype)
    k = torch.randn(n, dim, device=device, generator=gen).to(dtype)
    layout = ColumnLayout.plain(n)
    params = kernel_params(torch.tensor(20.0, device=device), layout, dtype)
    lse, _ = infonce_forward(q, k, params, None, layout, normalize_eps=EPS)
    grad_rows = torch.full((n,), 1.0 / n, device=device, dtype=lse.dtype)
    return q, k, params, layout, lse, grad_rows


def _runner(kernel: str, problem):
    from fastcl.ops.infonce_bwd_slab import infonce_backward_slab
    from fastcl.ops.infonce_bwd_workspace import infonce_backward_workspace
    from fastcl.ops.infonce_fwd import infonce_forward

    q, k, params, layout, lse, grad_rows = problem
    if kernel == "forward":
        return lambda: infonce_forward(q, k, params, None, layout, normalize_eps=EPS)[0]
    if kernel == "one_pass_logits":  # timed with the rest of the one pass: the loss and both gradients
        from fastcl.ops.infonce_one_pass import infonce_forward_grad

        return lambda: infonce_forward_grad(q, k, params, None, layout, 1.0 / q.shape[0], normalize_eps=EPS)[1]
    if kernel == "backward_ds":  # timed with the two products it feeds: the whole workspace backward
        return lambda: infonce_backward_workspace(q, k, params, None, layout, lse, grad_rows, normalize_eps=EPS)[0]
    if kernel == "backward_dq":
        return lambda: infonce_backward_slab(q, k, params, None, layout, lse, grad_rows, need_dq=True, need_dk=False,
                                             normalize_eps=EPS)[0]
    return lambda: infonce_backward_slab(q, k, params, None, layout, lse, grad_rows, need_dq=False, need_dk=True,
                                         normalize_eps=EPS)[1]


def _warm(args):
    """Compile one candidate in a worker process (fills Triton's on-disk cache)."""
    kernel, family, dim, cfg_dict, device = args
    try:
        problem = _problem(kernel, FAMILIES[family], 256, dim, device)
        with override_config({kernel: KernelConfig(**cfg_dict)}):
            _runner(kernel, problem)()
        if device == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001 - reported, and the candidate is tried again in-process
        return first_line(exc, 200)


def _median_ms(fn, device: str) -> float:
    """Median time of ``fn`` in ms: Triton's do_bench on CUDA, the wall clock elsewhere."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    import time

    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def _measure_candidate(kernel: str, family: str, cfg_dict: dict, problem, baseline, device: str) -> dict:
    """One candidate's time and its output's relative error against the default
    configuration's; a candidate that fails to compile or run is recorded, not fatal."""
    try:
        with override_config({kernel: KernelConfig(**cfg_dict)}):
            fn = _runner(kernel, problem)
            out = fn().float()
            err = ((out - baseline).norm() / baseline.norm()).item()
            ok = err < (2e-2 if family == "half" else 2e-3) and bool(torch.isfinite(out).all())
            ms = _median_ms(fn, device) if ok else float("nan")
    except Exception as exc:  # noqa: BLE001 - a candidate this GPU cannot run is not a choice
        return dict(config=cfg_dict, ms=float("nan"), rel_err=None, correct=False, error=first_line(exc, 200))
    return dict(config=cfg_dict, ms=ms, rel_err=err, correct=ok)


def run_measure(args) -> None:
    with open(args.candidates) as f:
        candidates = json.load(f)["candidates"]
    jobs = [(kernel, family, dim, c["config"], args.device) for kernel, by_family in candidates.items()
            for family, by_dim in by_family.items() for dim, cs in by_dim.items() for c in cs
            if family in args.families and int(dim) in args.dims and kernel in args.kernels]
    if args.jobs > 1:  # the pool only warms Triton's cache; every candidate is measured below either way
        print(f"warming {len(jobs)} candidates in {args.jobs} processes", flush=True)
        ctx = torch.multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            errors = [err for err in pool.map(_warm, jobs) if err]
        print(f"{len(errors)} of {len(jobs)} failed to warm; the first distinct errors:", flush=True)
        for err in sorted(set(errors))[:5]:
            print(f"  {err}", flush=True)

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.device} (Triton interpreter)"
    stamp = dict(gpu=gpu, torch=torch.__version__, triton=_triton_version(), date=str(datetime.date.today()),
                 n=args.n, command=" ".join(sys.argv))
    table, log = {}, []
    # In the order the kernels were asked for; the table and the log are written after each
    # kernel, so that a run cut short keeps what it measured.
    order = {kernel: i for i, kernel in enumerate(args.kernels)}
    jobs.sort(key=lambda j: (order[j[0]], j[1], int(j[2])))
    for (kernel, family, dim), group in itertools.groupby(jobs, key=lambda j: j[:3]):
        problem = _problem(kernel, FAMILIES[family], args.n, int(dim), args.device)
        baseline = _runner(kernel, problem)().float()
        results = [_measure_candidate(kernel, family, job[3], problem, baseline, args.device) for job in group]
        default_ms = _median_ms(_runner(kernel, problem), args.device)
        correct = [r for r in results if r["correct"]]
        entry = dict(kernel=kernel, family=family, dim=int(dim), n=args.n, default_ms=default_ms, results=results)
        log.append(entry)
        if not correct:
            failed = sorted({r.get("error", "disagrees with the default") for r in results})
            print(f"{kernel:<12} {family:<5} D={dim:<5} no candidate ran correctly: {failed[:3]}", flush=True)
        else:
            best = min(correct, key=lambda r: r["ms"])
            print(f"{kernel:<12} {family:<5} D={dim:<5} default {default_ms:8.3f} ms  best {best['ms']:8.3f} ms "
                  f"{best['config']}  ({len(correct)}/{len(results)} correct)", flush=True)
            table.setdefault(kernel, {}).setdefault(family, {})[str(dim)] = best["config"]
        if args.log:
            write_json(args.log, dict(measured=stamp, runs=log))
        if table:
            os.makedirs(os.path.dirname(os.path.abspath(args.write)), exist_ok=True)
            write_json(args.write, dict(measured=stamp, configs=table))
    if not table:
        print("nothing measured correctly: no table written", flush=True)
        return
    print(f"wrote {args.write}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    static = sub.add_parser("static", help="compile the candidate grid without a GPU; keep those that fit")
    static.add_argument("--arch", type=int, default=90)
    static.add_argument("--out", default="benchmarks/results/tune_candidates_sm90.json")
    measure = sub.add_parser("measure", help="time the candidates on the GPU; write the tuned table")
    measure.add_argument("--candidates", default="benchmarks/results/tune_candidates_sm90.json")
    measure.add_argument("--n", type=int, default=16384, help="N = M of the timed launch")
    measure.add_argument("--write", default="fastcl/ops/tuned/sm90.json")
    measure.add_argument("--log", default=None, help="JSON with every candidate's time and error")
    measure.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                         help="cpu: a check of the measuring code itself, in Triton's interpreter (tiny sizes)")
    for p in (static, measure):
        p.add_argument("--dims", type=int, nargs="+", default=[768])
        p.add_argument("--families", nargs="+", default=["half", "fp32"], choices=list(FAMILIES))
        p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
        p.add_argument("--jobs", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if interpreting != (args.step == "measure" and args.device == "cpu"):
        parser.error("measure --device cpu runs in Triton's interpreter (TRITON_INTERPRET=1); everything else "
                     "compiles real kernels (unset TRITON_INTERPRET)")
    run_static(args) if args.step == "static" else run_measure(args)


if __name__ == "__main__":
    main()
