"""CPU benchmark of the native extension against the dense PyTorch loss.

    python benchmarks/cpu_native.py                 # N = M = 4096, D = 768, fp32, 7 repeats
    python benchmarks/cpu_native.py --n 8192 --repeats 5 --tiles 256x512,512x512

For each implementation, forward + backward of one-directional InfoNCE over normalized
rows (temperature 0.05), timed as the median of repeated runs (implementations are
interleaved, so load from other processes hits all of them alike), and memory from the
PyTorch profiler's allocator record (every CPU allocation with the running total), as
tests/test_memory.py reads it:

- dense: ``F.cross_entropy(normalize(a) @ normalize(p).T / tau, arange(N))``, backward;
- native: ``info_nce(a, p, backend="native")``, backward (torch.ops.fastcl.*);
- chunked: ``info_nce(a, p, backend="torch")``, the pure-PyTorch CPU path it replaces.

Memory is reported two ways, each relative to what was allocated before the call:
``peak`` is the highest total during the step; ``transient`` is that peak minus what the
step leaves allocated (the gradients, which every implementation must return). Both are
measured end to end (normalization included) and, separately, for the loss alone on
already-normalized leaves (``--no-normalize`` rows below), where the gradients are the
only O((N + M) D) tensors left.

Writes benchmarks/results/cpu_native.json and cpu_native.md (date, CPU, torch, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from fastcl import info_nce, native  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TAU = 0.05
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_steps(normalize: bool):
    def dense(a, p):
        q, k = (F.normalize(a, dim=-1), F.normalize(p, dim=-1)) if normalize else (a, p)
        logits = q @ k.T / TAU
        F.cross_entropy(logits.float(), torch.arange(a.shape[0])).backward()

    def fused(backend):
        def step(a, p):
            info_nce(a, p, temperature=TAU, normalize=normalize, backend=backend).backward()

        return step

    return {"dense": dense, "native": fused("native"), "chunked": fused("torch")}


def allocator_trace(fn) -> tuple[int, int]:
    """(peak, retained) bytes above the level before ``fn``, from the profiler's record."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    records = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                     key=lambda e: e["ts"])
    if not records:
        raise RuntimeError("the profiler recorded no allocations: the measurement is broken")
    memory = [e["args"] for e in records]
    baseline = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    totals = [m["Total Allocated"] for m in memory]
    return max(totals) - baseline, totals[-1] - baseline


def run(args) -> dict:
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    a0 = torch.randn(args.n, args.d, dtype=dtype)
    p0 = torch.randn(args.m, args.d, dtype=dtype)

    def fresh():
        return a0.clone().requires_grad_(), p0.clone().requires_grad_()

    tilings = args.tiles.split(",") if args.tiles else [None]
    results = {}
    for normalize in (True, False):
        steps = make_steps(normalize)
        names = [n for n in args.impls.split(",") if n in steps]
        variants = []
        for name in names:
            for tiling in (tilings if name == "native" else [None]):
                variants.append((name, tiling))

        def call(name, tiling, a, p):
            if tiling is not None:
                rows, cols = tiling.split("x")
                os.environ["FASTCL_CPU_TILE_ROWS"], os.environ["FASTCL_CPU_TILE_COLS"] = rows, cols
            try:
                steps[name](a, p)
            finally:
                os.environ.pop("FASTCL_CPU_TILE_ROWS", None)
                os.environ.pop("FASTCL_CPU_TILE_COLS", None)

        label = "" if normalize else " --no-normalize"
        times = {v: [] for v in variants}
        repeats = args.repeats if normalize else max(1, args.repeats // 2)
        for r in range(args.warmup + repeats):
            for v in variants:
                a, p = fresh()
                start = time.perf_counter()
                call(*v, a, p)
                elapsed = time.perf_counter() - start
                if r >= args.warmup:
                    times[v].append(elapsed)
            print(f"[{'normalize' if normalize else 'no-normalize'}] run {r + 1}/{args.warmup + repeats}: "
                  + ", ".join(f"{n}{'@' + t if t else ''} {ts[-1]:.3f}s" for (n, t), ts in times.items() if ts),
                  flush=True)
        for v in variants:
            a, p = fresh()
            call(*v, a, p)  # warm, so lazy set-up stays out of the measurement
            a, p = fresh()
            peak, retained = allocator_trace(lambda: call(*v, a, p))
            key = v[0] + (f"@{v[1]}" if v[1] else "") + label
            results[key] = {
                "median_s": statistics.median(times[v]), "min_s": min(times[v]), "times_s": times[v],
                "peak_bytes": peak, "retained_bytes": retained, "transient_bytes": peak - retained,
            }
    return results


def summarize(results: dict, args) -> dict:
    summary = {}
    for label in ("", " --no-normalize"):
        dense = results.get("dense" + label)
        # The native row, or with --tiles the first tiling's.
        ours = results.get("native" + label) or next(
            (r for key, r in results.items() if key.startswith("native@") and key.endswith(label)
             and (label or not key.endswith("--no-normalize"))), None)
        if dense is None or ours is None:
            continue
        summary["normalize" if not label else "no-normalize"] = {
            "time_ratio": ours["median_s"] / dense["median_s"],
            "peak_ratio": ours["peak_bytes"] / dense["peak_bytes"],
            "transient_ratio": ours["transient_bytes"] / dense["transient_bytes"],
        }
    return summary


def write(results: dict, summary: dict, args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "native": f"{native.status().source} {native.status().path}" if native.available() else None,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        # Other processes share these cores: the 1-minute load average before and after.
        "load_average": [round(args.load_before, 2), round(os.getloadavg()[0], 2)],
        "config": {"n": args.n, "m": args.m, "d": args.d, "dtype": args.dtype, "tau": TAU,
                   "repeats": args.repeats, "warmup": args.warmup},
    }
    stem = RESULTS / args.name
    stem.with_suffix(".json").write_text(json.dumps({**meta, "results": results, "summary": summary}, indent=2) + "\n")
    mib = 2 ** 20
    lines = [
        "# CPU: native extension vs dense PyTorch loss (forward + backward)",
        "",
        f"{meta['date']}; {meta['cpu']}, {meta['cores']} cores ({meta['torch_threads']} torch threads); "
        f"torch {meta['torch']}; N = {args.n}, M = {args.m}, D = {args.d}, {args.dtype}; "
        f"median of {args.repeats} runs (no-normalize rows: {max(1, args.repeats // 2)}); "
        f"1-minute load average {meta['load_average'][0]} before, {meta['load_average'][1]} after "
        "(other processes on the same cores).",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| implementation | median s | min s | peak MiB | left allocated MiB | transient MiB |",
        "|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        lines.append(f"| {key} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['peak_bytes'] / mib:.1f} | "
                     f"{r['retained_bytes'] / mib:.1f} | {r['transient_bytes'] / mib:.1f} |")
    lines += ["", "native / dense:", ""]
    for label, s in summary.items():
        lines.append(f"- {label}: time {s['time_ratio']:.2f}x (target <= 1.5x), peak memory "
                     f"{100 * s['peak_ratio']:.1f}%, transient memory {100 * s['transient_ratio']:.1f}% "
                     "(target < 5%)")
    lines += ["", "peak: highest allocation total during the step above the level before it; left allocated: "
              "what the step leaves (the input gradients); transient = peak - left allocated.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--m", type=int, default=None, help="candidate rows (default: N)")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impls", default="dense,native,chunked")
    parser.add_argument("--tiles", default="", help="native tilings to compare, e.g. 256x512,512x512")
    parser.add_argument("--name", default="cpu_native", help="file stem under benchmarks/results/")
    args = parser.parse_args(argv)
    args.m = args.m or args.n
    if not native.available():
        print(f"the native extension is unavailable: {native.status().reason}", file=sys.stderr)
        return 1
    args.load_before = os.getloadavg()[0]
    results = run(args)
    write(results, summarize(results, args), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
