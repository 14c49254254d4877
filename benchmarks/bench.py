#!/usr/bin/env python
"""Benchmark fastcl's InfoNCE loss against the dense loss, torch.compile and the peers.

    python benchmarks/bench.py                       # defaults for the device found
    python benchmarks/bench.py --sizes 4096,16384,65536 --dim 768 --dtype bf16
    python benchmarks/bench.py --hard --sizes 16384   # supervised shape: M = 2N
    python benchmarks/bench.py --impls fastcl,dense --dim 128,384,768 --sizes 16384

Every implementation computes the same one-directional InfoNCE (cosine similarity,
temperature tau, mean over rows; see implementations.py) forward and backward, from the
raw embeddings to their gradients, on identical inputs. For each size and
implementation, in this order:

1. agreement: one call's loss and input gradients against a float64 reference (the
   dense loss where N x M fits, else fastcl's chunked PyTorch backend; relative L2
   error, tolerance by dtype); one that disagrees is flagged in every output;
2. extra peak memory of one call: on CUDA ``max_memory_allocated`` minus what was
   allocated before it (inputs resident; the gradients it returns count); on CPU the
   PyTorch profiler's allocator record;
3. warm-up, then timing of forward + backward: CUDA events around each call (CPU:
   ``time.perf_counter``), several input sets in rotation when one set would sit in
   cache, the median and spread of many calls;
4. TFLOP/s against 8*N*M*D (the forward product plus a backward that recomputes it and
   forms both gradients; the dense and compiled losses really do 6*N*M*D).

A configuration an implementation cannot run (not installed, unsupported dtype or D,
out of memory, a failing kernel) is recorded with its reason, and the run goes on.
Results go to ``--out`` (default benchmarks/results/) as ``<run id>.json`` (rewritten
after every case, so an interrupted run keeps what it measured), ``<run id>.md`` and
``<run id>-time.png`` / ``-memory.png`` (log-log against N).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):  # fastcl is run from the checkout, not installed
    if path not in sys.path:
        sys.path.insert(0, path)

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32", "fp64": "float64", "float64": "float64"}

CUDA_DEFAULTS = dict(sizes=[4096, 16384, 65536], dims=[768], dtype="bf16", repeats=30, warmup=5, case_budget_s=3.0)
CPU_DEFAULTS = dict(sizes=[256, 1024, 2048], dims=[128], dtype="fp32", repeats=10, warmup=2, case_budget_s=2.0)

SCHEMA = "fastcl-bench/1"


# --------------------------------------------------------------------------- options


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
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--sizes", type=_int_list, default=None,
                    help="N, the anchors per batch (comma list). M = N, or 2N with --hard. "
                         f"Default CUDA {CUDA_DEFAULTS['sizes']}, CPU {CPU_DEFAULTS['sizes']}")
    ap.add_argument("--dim", "--dims", dest="dims", type=_int_list, default=None,
                    help="embedding dim D (a comma list sweeps it). Default CUDA 768, CPU 128")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="input dtype. Default CUDA bf16, CPU fp32")
    ap.add_argument("--hard", action="store_true",
                    help="supervised shape: one hard negative per anchor, shared by all (M = 2N)")
    ap.add_argument("--symmetric", action="store_true",
                    help="average with the column direction of the in-batch block (CLIP)")
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--impls", type=_str_list, default=None,
                    help="comma list of implementations (default: all for the device); see --list")
    ap.add_argument("--list", action="store_true", help="list the implementations and exit")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per case, at most (fewer when --case-budget-s runs out, never "
                         "fewer than --min-repeats). Default CUDA 30, CPU 10")
    ap.add_argument("--min-repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls before timing, at most (bounded to about a second). "
                         "Default CUDA 5, CPU 2")
    ap.add_argument("--case-budget-s", type=float, default=None,
                    help="seconds of timed calls per case (default CUDA 3, CPU 2)")
    ap.add_argument("--max-call-s", type=float, default=30.0,
                    help="skip a case whose one call is predicted (from a smaller N) to take longer")
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="start no case after this many seconds (the rest is recorded as skipped)")
    ap.add_argument("--max-input-sets", type=int, default=8,
                    help="input sets rotated while timing when one set would fit in cache")
    ap.add_argument("--fp32-precision", choices=["highest", "high"], default=None,
                    help="torch.set_float32_matmul_precision for fp32 inputs: 'high' allows tf32. "
                         "Default: 'high' on CUDA (tf32, as the issue's fp32 target), 'highest' on CPU")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode of the compiled dense loss (default, max-autotune, ...)")
    ap.add_argument("--no-check", action="store_true", help="skip the agreement check (not recommended)")
    ap.add_argument("--ref-max-flops", type=float, default=None,
                    help="largest 8*N*M*D for which a float64 reference is computed (default CUDA 1e15, "
                         "CPU 2e11); above it the agreement is recorded as unchecked")
    ap.add_argument("--ref-dense-max-gib", type=float, default=None,
                    help="the reference is the dense loss in float64 while its N x M matrices (4 of "
                         "them) fit in this many GiB, else fastcl's chunked path in float64 (default "
                         "CUDA: a third of free memory, CPU 2)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for CPU runs (default: torch's own choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results"), help="output directory")
    ap.add_argument("--tag", default="", help="appended to the run id")
    ap.add_argument("--run-id", default=None, help="the run id (default: date-device-dtype-D...)")
    # Test hook: adds an implementation with a planted gradient error.
    ap.add_argument("--plant-error", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv if argv is None else ["benchmarks/bench.py", *argv])
    return args


def _apply_defaults(args, device) -> None:
    defaults = CUDA_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.fp32_precision is None:
        args.fp32_precision = "high" if device.type == "cuda" else "highest"
    if args.ref_max_flops is None:
        args.ref_max_flops = 1e15 if device.type == "cuda" else 2e11
    args.dtype = DTYPES[args.dtype]


# ---------------------------------------------------------------------- measurement


def tolerances(dtype_name: str, tf32: bool) -> dict:
    """Largest relative L2 errors (loss, gradients) accepted against the fp64 reference.

    From the dense loss in each dtype against fp64 on the same (rounded) inputs, D = 128
    and 768, N = 1024 and 2048: bf16 gradients 0.8e-2 to 1.9e-2 (the logits are rounded
    to bf16 before the fp32 cross-entropy), fp16 1e-3 to 3e-3, fp32 ~1e-6; the bounds
    leave 4-10x room. tf32 products round operands to 10 mantissa bits, as fp16.
    """
    if dtype_name == "float64":
        return {"loss": 1e-10, "grad": 1e-9}
    if dtype_name == "float32":
        return {"loss": 2e-3, "grad": 2e-2} if tf32 else {"loss": 1e-5, "grad": 1e-4}
    if dtype_name == "float16":
        return {"loss": 2e-3, "grad": 2e-2}
    return {"loss": 1e-2, "grad": 8e-2}


def relative_error(x, ref) -> float:
    import torch

    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if x.shape != ref.shape:
        return math.inf
    if not bool(torch.isfinite(x).all()):
        return math.inf
    scale = float(ref.norm())
    diff = float((x - ref).norm())
    return diff / scale if scale > 0 else diff


def summarize_times(times_ms: list[float]) -> dict:
    import numpy as np

    t = np.asarray(times_ms, dtype=np.float64)
    median = float(np.median(t))
    p10, p90 = (float(v) for v in np.percentile(t, [10, 90]))
    return {"median": median, "min": float(t.min()), "max": float(t.max()), "mean": float(t.mean()),
            "std": float(t.std(ddof=1)) if t.size > 1 else 0.0, "p10": p10, "p90": p90,
            "spread": (p90 - p10) / median if median > 0 else None, "runs": int(t.size)}


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text or isinstance(exc, MemoryError))


def _is_fatal(exc: BaseException) -> bool:
    """A CUDA error that leaves the context unusable: nothing after it can be trusted."""
    text = str(exc)
    return any(s in text for s in ("illegal memory access", "unspecified launch failure",
                                   "device-side assert", "CUDA error: an illegal instruction",
                                   "misaligned address"))


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Device:
    """Synchronization, timers, memory and cleanup for one device."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def cleanup(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.empty_cache()

    def cache_bytes(self) -> int:
        """Input sets are rotated until they span several times the last-level cache."""
        if self.cuda:
            props = self.torch.cuda.get_device_properties(self.device)
            return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
        return 32 * 2**20

    def time_calls(self, call, sets, count: int) -> list[float]:
        """Milliseconds of ``count`` calls, rotating over the input sets."""
        times = []
        if self.cuda:
            torch = self.torch
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(count)]
            self.sync()
            for i, (start, end) in enumerate(events):
                start.record()
                call(sets[i % len(sets)])
                end.record()
            self.sync()
            return [start.elapsed_time(end) for start, end in events]
        for i in range(count):
            t0 = time.perf_counter()
            call(sets[i % len(sets)])
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def extra_peak_bytes(self, call, inputs) -> tuple[int, str, float | None]:
        """Peak memory of one call above what was allocated before it, and on CUDA the
        call's milliseconds (a warm call: the first one came before)."""
        if self.cuda:
            torch = self.torch
            self.cleanup()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            t0 = time.perf_counter()
            out = call(inputs)
            self.sync()
            ms = (time.perf_counter() - t0) * 1e3
            peak = torch.cuda.max_memory_allocated(self.device) - base
            del out
            return peak, "torch.cuda.max_memory_allocated - allocated before the call (gradients count)", ms
        # the profiler slows the call: its time is no estimate
        return _cpu_peak_bytes(lambda: call(inputs)), "PyTorch profiler allocator record (CPU)", None


def _cpu_peak_bytes(fn) -> int:
    """Largest running total of torch's CPU allocations during ``fn`` (the profiler's
    record counts from its start, so tensors allocated before it are the baseline)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler logs a line to stderr at start and at stop
        prof.start()
    try:
        out = fn()
        del out
    finally:
        with _quiet_stderr():
            prof.stop()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    if not totals:
        raise RuntimeError("the profiler recorded no CPU allocations")
    return max(0, max(totals))


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ------------------------------------------------------------------------ the inputs


def make_inputs(n, d, dtype, device, hard: bool, seed: int):
    """Anchors a, positives p = a + 2 noise (cosine ~0.45), hard negatives h = a + 2.5
    noise (~0.37), rows of norm ~1 (randn / sqrt(D)): a loss between 0.3 and 3 over the
    sizes here, not the degenerate near-uniform softmax of independent random rows.
    Drawn in fp32 on the device, then cast; every tensor is a leaf that requires grad."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    scale = 1.0 / math.sqrt(d)

    def randn():
        return torch.randn(n, d, device=device, dtype=torch.float32, generator=gen) * scale

    a = randn()
    p = a + 2.0 * randn()
    tensors = [a, p] + ([a + 2.5 * randn()] if hard else [])
    return tuple(t.to(dtype).requires_grad_() for t in tensors)


def fwd_bwd(loss_fn):
    """One training step's loss work: forward, then the gradients of every input."""
    import torch

    def call(inputs):
        a, p, *rest = inputs
        loss = loss_fn(a, p, rest[0] if rest else None)
        grads = torch.autograd.grad(loss, inputs)
        return loss, grads

    return call


# -------------------------------------------------------------------------- the run


@dataclass
class Case:
    impl: str
    n: int
    m: int
    d: int
    dtype: str
    hard: bool
    symmetric: bool
    status: str = "pending"  # ok | disagrees | unchecked | unsupported | unavailable | oom | error | skipped
    reason: str | None = None
    backend: str | None = None
    agreement: dict | None = None
    time_ms: dict | None = None
    first_call_s: float | None = None
    peak_extra_bytes: int | None = None
    peak_extra_gib: float | None = None
    peak_method: str | None = None
    flops: float | None = None
    tflops_8nmd: float | None = None
    tflops_real: float | None = None
    input_sets: int | None = None
    extra: dict = field(default_factory=dict)

    def key(self):
        return (self.impl, self.n, self.d)


TIMED_STATUSES = ("ok", "disagrees", "unchecked")


class Reference:
    """The float64 loss and gradients one size's checks compare against (lazily computed
    once per size, kept on the host)."""

    def __init__(self, run, spec, inputs):
        self.run, self.spec, self.inputs = run, spec, inputs
        self._done = False
        self.loss = self.grads = self.name = self.skip_reason = None

    def get(self):
        if not self._done:
            self._done = True
            self._compute()
        return self

    def _compute(self):
        import torch

        spec = self.spec
        work = _flops(spec)
        if work > self.run.args.ref_max_flops:
            self.skip_reason = (f"no reference: 8NMD = {work:.2e} is over --ref-max-flops "
                                f"{self.run.args.ref_max_flops:.1e}")
            return
        dev = self.run.dev
        x64 = tuple(t.detach().to(torch.float64).requires_grad_() for t in self.inputs)
        # Dense in fp64 holds a few N x M matrices; fall back to fastcl's chunked path.
        dense_bytes = 4 * spec.n * spec.m * 8
        if self.run.args.ref_dense_max_gib is not None:
            budget = int(self.run.args.ref_dense_max_gib * 2**30)
        else:
            budget = (torch.cuda.mem_get_info(spec.device)[0] // 3) if dev.cuda else 2 * 2**30
        t0 = time.perf_counter()
        saved_chunk = os.environ.get("FASTCL_CHUNK_ELEMENTS")
        if dev.cuda:  # larger chunks than fastcl's default: fewer, larger fp64 products
            os.environ["FASTCL_CHUNK_ELEMENTS"] = str(min(1 << 27, max(1 << 22, budget // 32)))
        try:
            result = None
            if dense_bytes <= budget:
                try:
                    result = self._run(x64, "dense")
                except Exception as exc:
                    if not _is_oom(exc):
                        raise
                if result is None:  # out of memory: free it, then the chunked path
                    dev.cleanup()
            if result is None:
                result = self._run(x64, "chunked")
            self.name, self.loss, self.grads = result
            dev.sync()
        except Exception as exc:  # an OOM here must not end the run
            self.skip_reason = f"reference failed: {_first_line(exc)}"
            self.loss = self.grads = None
        finally:
            if saved_chunk is None:
                os.environ.pop("FASTCL_CHUNK_ELEMENTS", None)
            else:
                os.environ["FASTCL_CHUNK_ELEMENTS"] = saved_chunk
            del x64
            dev.cleanup()
        self.seconds = time.perf_counter() - t0

    def _run(self, x64, how: str):
        import torch

        spec = self.spec
        h = x64[2] if spec.hard else None
        if how == "dense":
            from implementations import dense_loss

            name = "dense PyTorch in float64"
            loss = dense_loss(x64[0], x64[1], h, temperature=spec.temperature, symmetric=spec.symmetric)
        else:
            import fastcl

            name = "fastcl backend='torch' (chunked PyTorch) in float64"
            loss = fastcl.info_nce(x64[0], x64[1], h, temperature=spec.temperature, symmetric=spec.symmetric,
                                   backend="torch")
        grads = torch.autograd.grad(loss, x64)
        return name, float(loss.detach()), [g.detach().cpu() for g in grads]


def _flops(spec) -> float:
    flops = 8.0 * spec.n * spec.m * spec.d
    if spec.symmetric:
        flops += 8.0 * spec.n * spec.n * spec.d
    return flops


class Run:
    def __init__(self, args):
        import torch

        self.args = args
        self.torch = torch
        self.device = torch.device(args.device)
        self.dev = Device(self.device)
        self.cases: list[Case] = []
        self.t_start = time.perf_counter()
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.fatal: str | None = None
        self.interrupted = False
        self.environment = collect_environment(self.device, args)
        dtype_short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}[args.dtype]
        dims = "-".join(str(d) for d in args.dims)
        if args.run_id:
            self.run_id = args.run_id
        else:
            parts = [self.started.strftime("%Y%m%d-%H%M%S"), self.environment["device_tag"], dtype_short,
                     f"d{dims}"]
            parts += ["hard"] if args.hard else []
            parts += ["sym"] if args.symmetric else []
            parts += [args.tag] if args.tag and args.tag not in parts else []
            self.run_id = "-".join(parts)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ bookkeeping

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def to_json(self) -> dict:
        from implementations import IMPLS

        args = self.args
        return {
            "schema": SCHEMA,
            "run_id": self.run_id,
            "date": self.started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(self.elapsed(), 1),
            "complete": not self.interrupted and self.fatal is None,
            "interrupted": self.interrupted,
            "fatal": self.fatal,
            "command": " ".join(shlex.quote(a) for a in args.argv),
            "environment": self.environment,
            "config": {
                "sizes": args.sizes, "dims": args.dims, "dtype": args.dtype, "hard": args.hard,
                "symmetric": args.symmetric, "temperature": args.temperature, "impls": args.impls,
                "repeats": args.repeats, "min_repeats": args.min_repeats, "warmup": args.warmup,
                "case_budget_s": args.case_budget_s, "max_call_s": args.max_call_s,
                "time_budget_s": args.time_budget_s, "max_input_sets": args.max_input_sets,
                "fp32_matmul_precision": args.fp32_precision, "compile_mode": args.compile_mode,
                "check": not args.no_check, "ref_max_flops": args.ref_max_flops,
                "ref_dense_max_gib": args.ref_dense_max_gib,
                "memory": not args.no_memory, "seed": args.seed,
                "tolerances": tolerances(args.dtype, self.tf32),
            },
            "implementations": {name: {"description": IMPLS[name].description,
                                       "version": IMPLS[name].version(),
                                       "real_work_per_nmd": IMPLS[name].real_work}
                                for name in args.impls},
            "notes": [
                "time: forward + backward (gradients of every input) of one call, from the raw "
                "embeddings (normalization included)",
                "tflops_8nmd: 8*N*M*D / median time (forward product + a backward that recomputes it "
                "and forms both gradients); the dense and compiled losses do 6*N*M*D of real work "
                "(tflops_real)",
                "peak_extra: memory above what was allocated before the call, with the inputs "
                "resident; the returned gradients count",
                "agreement: relative L2 error of the loss and of each input's gradient against a "
                "float64 reference on the same inputs",
            ],
            "results": [_case_json(c) for c in self.cases],
        }

    def save(self, final: bool = False):
        data = self.to_json()
        if final and hasattr(os, "getloadavg"):
            data["environment"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        path = self.out / f"{self.run_id}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        os.replace(tmp, path)
        if final:
            import report

            md = report.markdown(data)
            (self.out / f"{self.run_id}.md").write_text(md)
            self.plots = [] if self.args.no_plots else report.plots(data, self.out)
            if self.args.no_plots:
                data["plots"] = "skipped: --no-plots"
            elif not self.plots:
                data["plots"] = f"skipped: {report.PLOT_SKIP_REASON or 'nothing to plot'}"
            else:
                data["plots"] = [p.name for p in self.plots]
            tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
            os.replace(tmp, path)
            return data, md
        return data, None

    # ------------------------------------------------------------------ the cases

    @property
    def tf32(self) -> bool:
        return self.args.dtype == "float32" and self.args.fp32_precision != "highest" and self.dev.cuda

    def log(self, text: str):
        print(text, flush=True)

    def run(self):
        args = self.args
        self.torch.set_float32_matmul_precision(args.fp32_precision)
        shapes = [(n, d) for d in args.dims for n in args.sizes]
        total = len(shapes) * len(args.impls)
        index = 0
        self.log(self._banner())
        try:
            for n, d in shapes:
                m = 2 * n if args.hard else n
                cases = [Case(name, n, m, d, args.dtype, args.hard, args.symmetric) for name in args.impls]
                self.cases.extend(cases)
                self._run_shape(cases, n, m, d, index, total)
                index += len(cases)
                self.save()
        except KeyboardInterrupt:
            self.interrupted = True
            for c in self.cases:
                if c.status == "pending":
                    c.status, c.reason = "skipped", "interrupted"
            self.log("\ninterrupted: saving what was measured")
        return self.save(final=True)

    def _banner(self) -> str:
        env, a = self.environment, self.args
        lines = [f"fastcl benchmark {self.run_id}"]
        if not self.dev.cuda:
            lines.append("CPU RUN: no CUDA device; CPU timings say nothing about GPU performance")
        lines.append(f"device: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
                     f"python {env['python']}")
        lines.append(f"sizes N={a.sizes} (M={'2N' if a.hard else 'N'}) D={a.dims} {a.dtype} "
                     f"tau={a.temperature}{' symmetric' if a.symmetric else ''} "
                     f"fp32 matmul precision={a.fp32_precision}")
        lines.append(f"implementations: {', '.join(a.impls)}")
        load = env.get("load_avg_start")
        if not self.dev.cuda and load and load[0] >= (os.cpu_count() or 1) and self.torch.get_num_threads() > 1:
            lines.append(f"WARNING: load average {load[0]} on {os.cpu_count()} cores with "
                         f"{self.torch.get_num_threads()} torch threads: oversubscribed thread pools can "
                         "slow CPU ops by 100x here; consider --threads 1")
        return "\n".join(lines)

    def _run_shape(self, cases, n, m, d, index, total):
        from implementations import Spec

        torch = self.torch
        args = self.args
        spec = Spec(n=n, m=m, d=d, dtype=getattr(torch, args.dtype), device=self.device,
                    temperature=args.temperature, hard=args.hard, symmetric=args.symmetric,
                    compile_mode=args.compile_mode)
        flops = _flops(spec)
        inputs_sets = None
        reference = None
        try:
            for i, case in enumerate(cases):
                case.flops = flops
                label = f"[{index + i + 1:>3}/{total}] N={n} M={m} D={d} {case.impl}"
                skip = self._skip_reason(case, spec)
                if skip:
                    case.status, case.reason = skip
                    self.log(f"{label}: {case.status}: {case.reason}")
                    continue
                if inputs_sets is None:
                    inputs_sets = self._make_input_sets(spec)
                    if inputs_sets is None:  # the inputs themselves do not fit
                        for c in cases[i:]:
                            c.status, c.reason = "oom", "the inputs do not fit in memory"
                        self.log(f"N={n} D={d}: inputs do not fit; skipping this size")
                        return
                    reference = Reference(self, spec, inputs_sets[0])
                self._run_case(case, spec, inputs_sets, reference)
                self.log(f"{label}: {_one_line(case)}")
                self.save()
        finally:
            del inputs_sets, reference
            self.dev.cleanup()

    def _skip_reason(self, case, spec):
        from implementations import IMPLS

        if self.fatal:
            return "skipped", f"an earlier CUDA error left the device unusable ({self.fatal})"
        args = self.args
        if args.time_budget_s is not None and self.elapsed() > args.time_budget_s:
            return "skipped", f"time budget of {args.time_budget_s:.0f} s used up"
        ok, why = IMPLS[case.impl].available()
        if not ok:
            return "unavailable", why
        # Predict from the largest smaller size this implementation ran at (time ~ N*M).
        previous = [c for c in self.cases if c.impl == case.impl and c.d == case.d and c.n < case.n]
        if previous:
            last = max(previous, key=lambda c: c.n)
            if last.status == "oom":
                return "oom", f"out of memory already at N={last.n}"
            if last.status in ("unsupported", "unavailable"):
                return last.status, last.reason
            if last.status in TIMED_STATUSES and last.time_ms:
                predicted = last.time_ms["median"] * (case.n * case.m) / (last.n * last.m) / 1e3
                case.extra["predicted_call_s"] = round(predicted, 3)
                if predicted > args.max_call_s:
                    return "skipped", (f"predicted {predicted:.1f} s per call from N={last.n}, over "
                                       f"--max-call-s {args.max_call_s:g}")
                if args.time_budget_s is not None:
                    left = args.time_budget_s - self.elapsed()
                    needed = predicted * (args.min_repeats + 3)
                    if needed > left:
                        return "skipped", (f"predicted {needed:.0f} s for the case, {max(left, 0):.0f} s "
                                           "left of the time budget")
        return None

    def _make_input_sets(self, spec):
        torch = self.torch
        args = self.args
        per_set = (3 if spec.hard else 2) * spec.n * spec.d * torch.empty((), dtype=spec.dtype).element_size()
        count = max(1, min(args.max_input_sets, math.ceil(4 * self.dev.cache_bytes() / per_set)))
        try:
            return [make_inputs(spec.n, spec.d, spec.dtype, spec.device, spec.hard, args.seed * 1000 + k)
                    for k in range(count)]
        except Exception as exc:
            if _is_oom(exc):
                return None
            raise

    def _run_case(self, case, spec, sets, reference):
        from implementations import IMPLS, Unsupported, resolved_fastcl_backend

        impl = IMPLS[case.impl]
        args = self.args
        dev = self.dev
        case.input_sets = len(sets)
        if case.impl.startswith("fastcl"):
            backend = {"fastcl": "auto"}.get(case.impl, case.impl.removeprefix("fastcl-"))
            try:
                case.backend = resolved_fastcl_backend(backend, spec)
            except Exception:
                case.backend = None
        loss_fn = call = None
        try:
            loss_fn = impl.make(spec)
            call = fwd_bwd(loss_fn)
            # 1. first call (compilation, autotuning), and the agreement check on it
            t0 = time.perf_counter()
            loss, grads = call(sets[0])
            dev.sync()
            case.first_call_s = round(time.perf_counter() - t0, 4)
            if args.no_check:
                case.agreement = {"checked": False, "reason": "--no-check"}
            else:
                case.agreement = self._agreement(loss, grads, reference)
            del loss, grads
            # 2. extra peak memory of one call
            warm_ms = None
            if not args.no_memory:
                case.peak_extra_bytes, case.peak_method, warm_ms = dev.extra_peak_bytes(call, sets[0])
                case.peak_extra_gib = case.peak_extra_bytes / 2**30
            # 3. warm-up (bounded to about a second), then the timed calls
            estimate_ms = self._warmup(call, sets, case, warm_ms)
            repeats = int(min(args.repeats, max(args.min_repeats, args.case_budget_s * 1e3 / max(estimate_ms, 1e-3))))
            times = dev.time_calls(call, sets, repeats)
            case.time_ms = summarize_times(times)
            seconds = case.time_ms["median"] / 1e3
            case.tflops_8nmd = case.flops / seconds / 1e12 if seconds > 0 else None
            if impl.real_work:
                case.tflops_real = case.tflops_8nmd * impl.real_work / 8 if case.tflops_8nmd else None
            agreement = case.agreement or {}
            if not agreement.get("checked"):
                case.status, case.reason = "unchecked", agreement.get("reason")
            elif agreement.get("ok"):
                case.status = "ok"
            else:
                case.status = "disagrees"
                case.reason = agreement.get("summary")
        except Unsupported as exc:
            case.status, case.reason = "unsupported", str(exc)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            if _is_oom(exc):
                case.status, case.reason = "oom", _first_line(exc, 200)
            else:
                case.status, case.reason = "error", _first_line(exc)
                if dev.cuda and _is_fatal(exc):
                    self.fatal = f"{case.impl} at N={case.n}: {case.reason}"
        finally:
            del loss_fn, call
            dev.cleanup()

    def _warmup(self, call, sets, case, warm_ms: float | None) -> float:
        """Untimed calls (at most --warmup, about a second in all, counting a warm call
        already made); returns the estimated milliseconds of one call."""
        times = [warm_ms] if warm_ms is not None else []
        budget_ms = 1000.0
        count = 0
        while count < self.args.warmup and sum(times) <= budget_ms or not times:
            times.extend(self.dev.time_calls(call, [sets[(count + 1) % len(sets)]], 1))
            count += 1
        case.extra["warmup_calls"] = count
        return min(times)

    def _agreement(self, loss, grads, reference) -> dict:
        ref = reference.get()
        if ref.loss is None:
            return {"checked": False, "reason": ref.skip_reason}
        tol = tolerances(self.args.dtype, self.tf32)
        names = ["anchors", "positives", "hard_negatives"]
        value = float(loss.detach())
        loss_err = abs(value - ref.loss) / max(abs(ref.loss), 1e-30) if math.isfinite(value) else math.inf
        grad_err = {names[k]: relative_error(g, r) for k, (g, r) in enumerate(zip(grads, ref.grads))}
        worst = max(grad_err.values())
        ok = loss_err <= tol["loss"] and worst <= tol["grad"]
        bad = ([f"loss {loss_err:.2e} > {tol['loss']:.0e}"] if not loss_err <= tol["loss"] else []) + \
              [f"d{name} {err:.2e} > {tol['grad']:.0e}" for name, err in grad_err.items() if not err <= tol["grad"]]
        return {"checked": True, "reference": ref.name, "reference_loss": ref.loss,
                "reference_s": round(getattr(ref, "seconds", 0.0), 3),
                "loss": value, "loss_rel_err": loss_err, "grad_rel_err": grad_err,
                "max_grad_rel_err": worst, "tolerance": tol, "ok": ok,
                "summary": None if ok else "disagrees with the reference: " + ", ".join(bad)}


def _case_json(c: Case) -> dict:
    return {k: v for k, v in c.__dict__.items()}


def _one_line(c: Case) -> str:
    if c.status not in TIMED_STATUSES:
        return f"{c.status}: {c.reason}"
    t = c.time_ms
    parts = [f"{t['median']:.3f} ms (min {t['min']:.3f}, max {t['max']:.3f}, {t['runs']} runs"
             f"{', ' + str(c.input_sets) + ' input sets' if c.input_sets and c.input_sets > 1 else ''})"]
    if c.peak_extra_gib is not None:
        parts.append(f"extra {c.peak_extra_gib:.4f} GiB")
    if c.tflops_8nmd is not None:
        parts.append(f"{c.tflops_8nmd:.2f} TFLOP/s(8NMD)")
    a = c.agreement or {}
    if a.get("checked"):
        parts.append(f"err loss {a['loss_rel_err']:.1e} grad {a['max_grad_rel_err']:.1e}")
    parts.append({"ok": "agrees", "disagrees": "DISAGREES: " + str(c.reason), "unchecked": "unchecked: "
                  + str(c.reason)}[c.status])
    if c.backend:
        parts.append(f"backend {c.backend}")
    return ", ".join(parts)


# ------------------------------------------------------------------------ environment


def _git(*cmd) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_environment(device, args) -> dict:
    import re

    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    env = {
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "device_name": torch.cuda.get_device_name(device),
            "gpu_name": torch.cuda.get_device_name(device),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sms": props.multi_processor_count,
            "gpu_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        })
        tag = re.sub(r"[^a-z0-9]+", "-", env["gpu_name"].lower()).strip("-").removeprefix("nvidia-")
        env["device_tag"] = "-".join(tag.split("-")[:2]) or "cuda"
    else:
        env.update({"device_name": f"CPU ({env['cpu']}, {env['cpu_threads']} threads)", "gpu_name": None,
                    "device_tag": "cpu"})
    return env


# ------------------------------------------------------------------------------- main


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
    requested = set(args.impls or [])
    if device.type == "cpu" and "fastcl-triton" in requested:
        # The Triton kernels run on CPU only in the interpreter, which must be switched on
        # before anything imports triton. Note it also makes fastcl's "auto" pick them.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from implementations import IMPLS, default_impls

    if args.list:
        for name, impl in IMPLS.items():
            if not impl.hidden:
                ok, why = impl.available()
                print(f"{name:14s} {impl.description}{'' if ok else '  [' + why + ']'}")
        return 0
    _apply_defaults(args, device)
    if args.impls is None:
        args.impls = default_impls(device)
    unknown = [n for n in args.impls if n not in IMPLS]
    if unknown:
        print(f"error: unknown implementation(s) {unknown}; known: {[n for n in IMPLS if not IMPLS[n].hidden]}",
              file=sys.stderr)
        return 2
    if args.plant_error and "planted-error" not in args.impls:
        args.impls.append("planted-error")
    run = Run(args)
    data, md = run.run()
    print()
    print(md)
    print(f"results: {run.out / (run.run_id + '.json')} (+ .md"
          f"{', ' + ', '.join(p.name for p in run.plots) if run.plots else ''})")
    return 130 if run.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
