"""The measuring half of the benchmarks: devices, timers, memory, inputs, errors, records.

- :class:`Device`: synchronization, cleanup, timing of calls (CUDA events around each
  call; on CPU ``time.perf_counter``) and the extra peak memory of one call (CUDA: the
  caching allocator's peak; CPU: the PyTorch profiler's allocator record);
- :func:`make_inputs`: inputs that give a realistic loss (not the near-uniform softmax of
  independent random rows); :func:`fwd_bwd`: one training step's loss work;
- :func:`relative_error` and :func:`tolerances`: agreement with a float64 reference
  (a non-finite value never agrees);
- :func:`summarize_times`: median and spread; :func:`environment`: what ran where;
- :func:`write_json`: replaced atomically, so a run killed mid-write keeps the last copy.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32", "fp64": "float64", "float64": "float64"}
SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}


# ------------------------------------------------------------------------ agreement


def tolerances(dtype_name: str, tf32: bool) -> dict:
    """Largest relative L2 errors (loss, gradients) accepted against the fp64 reference.

    From the dense loss in each dtype against fp64 on the same (rounded) inputs, D = 128
    and 768, N = 1024 and 2048: bf16 gradients 0.8e-2 to 1.9e-2 (the logits are rounded
    to bf16 before the fp32 cross-entropy), fp16 1e-3 to 3e-3, fp32 ~1e-6; the bounds
    leave 4-10x room. tf32 products round operands to 10 mantissa bits, as fp16. The
    same bounds serve NT-Xent (bf16 gradients 4.7e-3 to 5.2e-3) and groups of 128
    (bf16 gradients 2.2e-2 to 2.8e-2: in-sequence negatives are close, so the rounded
    logits matter more; 3x room).
    """
    if dtype_name == "float64":
        return {"loss": 1e-10, "grad": 1e-9}
    if dtype_name == "float32":
        return {"loss": 2e-3, "grad": 2e-2} if tf32 else {"loss": 1e-5, "grad": 1e-4}
    if dtype_name == "float16":
        return {"loss": 2e-3, "grad": 2e-2}
    return {"loss": 1e-2, "grad": 8e-2}


def relative_error(x, ref) -> float:
    """``||x - ref|| / ||ref||`` in float64; infinite for a wrong shape or any NaN / inf."""
    import torch

    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if x.shape != ref.shape or not bool(torch.isfinite(x).all()):
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


def is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def is_fatal(exc: BaseException) -> bool:
    """A CUDA error that leaves the context unusable: nothing after it can be trusted."""
    text = str(exc)
    return any(s in text for s in ("illegal memory access", "unspecified launch failure", "device-side assert",
                                   "an illegal instruction", "misaligned address"))


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------- devices


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
        if self.cuda:
            cuda = self.torch.cuda
            events = [(cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)) for _ in range(count)]
            self.sync()
            for i, (start, end) in enumerate(events):
                start.record()
                call(sets[i % len(sets)])
                end.record()
            self.sync()
            return [start.elapsed_time(end) for start, end in events]
        times = []
        for i in range(count):
            t0 = time.perf_counter()
            call(sets[i % len(sets)])
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    def extra_peak(self, call, inputs) -> dict:
        """Memory of one call above what was allocated before it: ``peak`` (the highest
        point; the gradients it returns count) and ``retained`` (what it leaves
        allocated), with the method, and on CUDA the call's milliseconds (a warm call)."""
        if not self.cuda:  # the profiler slows the call: its time is no estimate
            peak, retained = profiler_memory(lambda: call(inputs))
            return {"peak": peak, "retained": retained, "ms": None,
                    "method": "PyTorch profiler allocator record (CPU)"}
        cuda = self.torch.cuda
        self.cleanup()
        cuda.reset_peak_memory_stats(self.device)
        base = cuda.memory_allocated(self.device)
        t0 = time.perf_counter()
        out = call(inputs)
        self.sync()
        ms = (time.perf_counter() - t0) * 1e3
        result = {"peak": cuda.max_memory_allocated(self.device) - base,
                  "retained": cuda.memory_allocated(self.device) - base, "ms": ms,
                  "method": "torch.cuda.max_memory_allocated - allocated before the call (gradients count)"}
        del out
        return result


def profiler_memory(fn) -> tuple[int, int]:
    """``(peak, retained)`` bytes of torch's CPU allocations during ``fn`` above the level
    before it, from the profiler's allocator record; what ``fn`` returns is kept until
    the record ends, so it counts as retained."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with quiet_stderr():  # the profiler logs a line to stderr at start and at stop
        prof.start()
    try:
        out = fn()
    finally:
        with quiet_stderr():
            prof.stop()
    del out
    totals = allocated_above_start(allocation_records(prof))
    return max(0, max(totals)), max(0, totals[-1])


def allocation_records(prof) -> list[dict]:
    """The CPU allocation events of a finished ``torch.profiler`` session (made with
    ``profile_memory=True``), in time order: each with ``"Bytes"`` (this allocation,
    negative for a free) and ``"Total Allocated"`` (the allocator's running total after
    it). Raises RuntimeError when there is none: the measurement is broken then."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    records = sorted(((e["ts"], e["args"]) for e in events
                      if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0),
                     key=lambda record: record[0])
    if not records:
        raise RuntimeError("the profiler recorded no CPU allocations: the measurement is broken")
    return [args for _, args in records]


def allocated_above_start(records: list[dict]) -> list[int]:
    """Bytes allocated after each record, above the level before the first one. The
    profiler's running total is process-wide and carries over from earlier sessions (and
    misses frees made between sessions), so only differences within a session count."""
    baseline = records[0]["Total Allocated"] - records[0]["Bytes"]
    return [args["Total Allocated"] - baseline for args in records]


@contextlib.contextmanager
def quiet_stderr():
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


def make_inputs(n, d, dtype, device, hard: bool, seed: int, group_size: int | None = None, k: int = 1):
    """Anchors a, positives p = a + 2 noise (cosine ~0.45), hard negatives h = a + 2.5
    noise (~0.37), rows of norm ~1 (randn / sqrt(D)): a loss between 0.3 and 3 over the
    usual sizes, not the near-uniform softmax of independent random rows. NT-Xent takes
    (a, p) as its two views. With ``group_size`` (tokens), a vector shared by the G tokens
    of each sequence is added to their anchors and positives, so a token's in-sequence
    negatives are closer to it (cosine ~0.3) than random rows, as contextual token
    embeddings are. With ``k`` > 1 the hard negatives are N x k x D, each row a + 2.5
    noise. Drawn in fp32 on the device, then cast; every tensor is a leaf that requires
    grad."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    scale = 1.0 / math.sqrt(d)

    def randn(rows=n):
        return torch.randn(rows, d, device=device, dtype=torch.float32, generator=gen) * scale

    a = randn()
    p = a + 2.0 * randn()
    if group_size:
        shared = randn(n // group_size).repeat_interleave(group_size, dim=0)
        a, p = a + shared, p + shared
    if k > 1:
        hard_rows = torch.stack([a + 2.5 * randn() for _ in range(k)], dim=1)
    else:
        hard_rows = a + 2.5 * randn()
    tensors = [a, p] + ([hard_rows] if hard else [])
    return tuple(t.to(dtype).requires_grad_() for t in tensors)


def fwd_bwd(loss_fn):
    """One training step's loss work: forward, then the gradients of every input."""
    import torch

    def call(inputs):
        a, p, *rest = inputs
        loss = loss_fn(a, p, rest[0] if rest else None)
        return loss, torch.autograd.grad(loss, inputs)

    return call


# ----------------------------------------------------------------------- the records


def write_json(path: Path, data) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def git(*cmd) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device) -> dict:
    """Versions, the device and the checkout's commit."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    env = {
        "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(), "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = torch.cuda.get_device_name(device)
        env.update({"device_name": name, "gpu_name": name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "gpu_sms": props.multi_processor_count, "gpu_capability": f"{props.major}.{props.minor}",
                    "cuda": torch.version.cuda})
        tag = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-").removeprefix("nvidia-")
        env["device_tag"] = "-".join(tag.split("-")[:2]) or "cuda"
    else:
        env.update({"device_name": f"CPU ({env['cpu']}, {env['cpu_threads']} threads)", "gpu_name": None,
                    "device_tag": "cpu"})
    return env
