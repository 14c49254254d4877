"""One benchmark run: a loss family's cases (sizes x implementations), measured and recorded.

For each size and implementation, in this order:

1. agreement: one call's loss and input gradients against a float64 reference
   (agreement.py; relative L2 error, tolerance by dtype); one that disagrees is flagged
   everywhere;
2. extra peak memory of one call (:meth:`harness.Device.extra_peak`);
3. warm-up, then timing of forward + backward: several input sets in rotation when one
   set would sit in cache, the median and spread of many calls;
4. TFLOP/s against the family's counted work, and against the work really done where
   it differs.

A configuration an implementation cannot run (not installed, unsupported, out of
memory, a failing kernel) is recorded with its reason, and the run goes on. The JSON is
rewritten after every case, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import harness
import report
from agreement import Reference, agreement
from harness import Device, first_line, is_fatal, is_oom, make_inputs
from impls import Spec, Unsupported, fastcl_backend, registry
from internals import chosen_backward

SCHEMA = "fastcl-bench/1"
TIMED_STATUSES = ("ok", "disagrees", "unchecked")


@dataclass(frozen=True)
class Family:
    """What one benchmarked loss needs beyond its implementations (bench_<name>.py)."""

    name: str  # the --loss value
    temperature: float
    cpu_sizes: list[int] | None  # CPU default sizes, when not the common ones
    grad_names: tuple[str, ...]
    flop_label: str
    flop_count: str
    work_note: str
    columns: Callable[[int, object], int]  # M from N and the options
    flops: Callable[[Spec], float]  # the counted work of one forward + backward
    dense_logits: Callable[[Spec], int]  # elements of one logit matrix of the dense form
    reference: Callable[[Spec, tuple, bool], tuple[str, object]]  # (name, float64 loss)
    cost: Callable[[object], float]  # what a case's time grows with
    tag: str | None = None  # run id part
    reference_flops: Callable[[Spec, bool], float] | None = None
    check: Callable[[object], str | None] = lambda args: None


@dataclass
class Case:
    impl: str
    n: int
    m: int
    d: int
    dtype: str
    hard: bool
    symmetric: bool
    loss: str = "infonce"
    group_size: int | None = None
    status: str = "pending"  # ok | disagrees | unchecked | unsupported | unavailable | oom | error | skipped
    reason: str | None = None
    backend: str | None = None
    agreement: dict | None = None
    time_ms: dict | None = None
    first_call_s: float | None = None
    peak_extra_bytes: int | None = None
    peak_extra_gib: float | None = None
    retained_bytes: int | None = None
    peak_method: str | None = None
    flops: float | None = None
    tflops: float | None = None  # the counted work (flops) / median time
    tflops_8nmd: float | None = None  # the same, InfoNCE only
    tflops_real: float | None = None
    input_sets: int | None = None
    extra: dict = field(default_factory=dict)


class Run:
    """The cases of one family at every size, run in order and recorded."""

    def __init__(self, args, family: Family):
        import torch

        self.args, self.family, self.torch = args, family, torch
        self.device = torch.device(args.device)
        self.dev = Device(self.device)
        self.cases: list[Case] = []
        self.t_start = time.perf_counter()
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.fatal: str | None = None
        self.interrupted = False
        self.plots: list[Path] = []
        self.environment = harness.environment(self.device)
        self.run_id = args.run_id or "-".join(self._id_parts())
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def _id_parts(self) -> list[str]:
        a = self.args
        parts = [self.started.strftime("%Y%m%d-%H%M%S"), self.environment["device_tag"],
                 harness.SHORT_DTYPES[a.dtype], "d" + "-".join(str(d) for d in a.dims)]
        parts += [self.family.tag] if self.family.tag else []
        parts += [f"g{a.group_size}"] if a.loss == "groups" else []
        parts += ([f"hard{a.hard_k}"] if getattr(a, "hard_k", None) else ["hard"]) if a.hard else []
        parts += ["gte"] if getattr(a, "gte", False) else []
        parts += [f"margin{a.margin:g}"] if getattr(a, "margin", None) is not None else []
        parts += [f"guide{a.guide_dim}"] if getattr(a, "guide_dim", None) else []
        parts += ["sym"] if a.symmetric else []
        return parts + ([a.tag] if a.tag and a.tag not in parts else [])

    @property
    def tf32(self) -> bool:
        return self.args.dtype == "float32" and self.args.fp32_precision != "highest" and self.dev.cuda

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def log(self, text: str):
        print(text, flush=True)

    # ------------------------------------------------------------------ the record

    def to_json(self) -> dict:
        a, impls = self.args, registry(self.args.loss)
        config = {k: getattr(a, k) for k in (
            "loss", "group_size", "sizes", "dims", "dtype", "hard", "symmetric", "temperature", "impls", "repeats",
            "min_repeats", "warmup", "case_budget_s", "max_call_s", "time_budget_s", "max_input_sets",
            "ref_max_flops", "ref_dense_max_gib", "seed")}
        config.update({k: getattr(a, k, None) for k in ("hard_k", "gte", "margin", "guide_dim")})
        config.update(flop_count=self.family.flop_count, fp32_matmul_precision=a.fp32_precision,
                      compile_mode=a.compile_mode, check=not a.no_check, memory=not a.no_memory,
                      tolerances=harness.tolerances(a.dtype, self.tf32))
        return {
            "schema": SCHEMA, "run_id": self.run_id, "date": self.started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(self.elapsed(), 1), "complete": not self.interrupted and self.fatal is None,
            "interrupted": self.interrupted, "fatal": self.fatal,
            "command": " ".join(shlex.quote(x) for x in a.argv), "environment": self.environment, "config": config,
            "implementations": {name: {"description": impls[name].description, "version": impls[name].version(),
                                       "real_work": impls[name].real_work_formula} for name in a.impls},
            "notes": ["time: forward + backward (gradients of every input) of one call, from the raw embeddings "
                      "(normalization included)", self.family.work_note,
                      "peak_extra: memory above what was allocated before the call, with the inputs resident; the "
                      "returned gradients count (retained_bytes: what the call leaves allocated)",
                      "agreement: relative L2 error of the loss and of each input's gradient against a float64 "
                      "reference on the same inputs"],
            "results": [dict(c.__dict__) for c in self.cases],
        }

    def save(self, final: bool = False):
        data = self.to_json()
        path = self.out / f"{self.run_id}.json"
        if not final:
            harness.write_json(path, data)
            return data, None
        if hasattr(os, "getloadavg"):
            data["environment"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
        md = report.markdown(data)
        (self.out / f"{self.run_id}.md").write_text(md)
        self.plots = [] if self.args.no_plots else report.plots(data, self.out)
        if self.args.no_plots or not self.plots:
            data["plots"] = "skipped: " + ("--no-plots" if self.args.no_plots else
                                           report.PLOT_SKIP_REASON or "nothing to plot")
        else:
            data["plots"] = [p.name for p in self.plots]
        harness.write_json(path, data)
        return data, md

    # ------------------------------------------------------------------- the cases

    def run(self):
        a = self.args
        self.torch.set_float32_matmul_precision(a.fp32_precision)
        shapes = [(n, d) for d in a.dims for n in a.sizes]
        total, index = len(shapes) * len(a.impls), 0
        self.log(self._banner())
        try:
            for n, d in shapes:
                m = self.family.columns(n, a)
                cases = [Case(name, n, m, d, a.dtype, a.hard, a.symmetric, loss=a.loss, group_size=a.group_size)
                         for name in a.impls]
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
        columns = f" (M={(getattr(a, 'hard_k', None) or 1) + 1}N)" if a.hard else ""
        lines.append(f"loss {a.loss}{f' (G={a.group_size})' if a.group_size else ''}: sizes N={a.sizes}"
                     f"{columns} D={a.dims} {a.dtype} tau={a.temperature}"
                     f"{' symmetric' if a.symmetric else ''} fp32 matmul precision={a.fp32_precision}")
        lines.append(f"implementations: {', '.join(a.impls)}")
        load = env.get("load_avg_start")
        if not self.dev.cuda and load and load[0] >= (os.cpu_count() or 1) and self.torch.get_num_threads() > 1:
            lines.append(f"WARNING: load average {load[0]} on {os.cpu_count()} cores with "
                         f"{self.torch.get_num_threads()} torch threads: oversubscribed thread pools can "
                         "slow CPU ops by 100x; consider --threads 1")
        return "\n".join(lines)

    def _run_shape(self, cases, n, m, d, index, total):
        a = self.args
        spec = Spec(n=n, m=m, d=d, dtype=getattr(self.torch, a.dtype), device=self.device,
                    temperature=a.temperature, hard=a.hard, symmetric=a.symmetric, compile_mode=a.compile_mode,
                    loss=a.loss, group_size=a.group_size, k=getattr(a, "hard_k", None) or 1,
                    gte=getattr(a, "gte", False), margin=getattr(a, "margin", None),
                    guide_dim=getattr(a, "guide_dim", None) or 0)
        flops, sets, reference = self.family.flops(spec), None, None
        try:
            for i, case in enumerate(cases):
                case.flops = flops
                impl = registry(a.loss)[case.impl]
                case.backend = fastcl_backend(impl, spec)
                label = f"[{index + i + 1:>3}/{total}] N={n} M={m} D={d} {case.impl}"
                skip = self._skip_reason(case)
                if skip:
                    case.status, case.reason = skip
                    self.log(f"{label}: {case.status}: {case.reason}")
                    continue
                if sets is None:
                    sets = self._make_input_sets(spec)
                    if sets is None:  # the inputs themselves do not fit
                        for c in cases[i:]:
                            c.status, c.reason = "oom", "the inputs do not fit in memory"
                        self.log(f"N={n} D={d}: inputs do not fit; skipping this size")
                        return
                    reference = Reference(self, spec, sets[0])
                with impl.context():
                    self._run_case(case, impl, spec, sets, reference)
                self.log(f"{label}: {_one_line(case, self.family)}")
                self.save()
        finally:
            del sets, reference
            self.dev.cleanup()

    def _skip_reason(self, case):
        if self.fatal:
            return "skipped", f"an earlier CUDA error left the device unusable ({self.fatal})"
        a = self.args
        if a.time_budget_s is not None and self.elapsed() > a.time_budget_s:
            return "skipped", f"time budget of {a.time_budget_s:.0f} s used up"
        ok, why = registry(a.loss)[case.impl].available()
        if not ok:
            return "unavailable", why
        # Predict from the largest smaller size this implementation ran at (time ~ its cost).
        previous = [c for c in self.cases if c.impl == case.impl and c.d == case.d and c.n < case.n]
        if not previous:
            return None
        last = max(previous, key=lambda c: c.n)
        if last.status == "oom":
            return "oom", f"out of memory already at N={last.n}"
        if last.status in ("unsupported", "unavailable"):
            return last.status, last.reason
        if last.status in TIMED_STATUSES and last.time_ms:
            predicted = last.time_ms["median"] * self.family.cost(case) / self.family.cost(last) / 1e3
            case.extra["predicted_call_s"] = round(predicted, 3)
            if predicted > a.max_call_s:
                return "skipped", (f"predicted {predicted:.1f} s per call from N={last.n}, over "
                                   f"--max-call-s {a.max_call_s:g}")
            if a.time_budget_s is not None:
                left = a.time_budget_s - self.elapsed()
                needed = predicted * (a.min_repeats + 3)
                if needed > left:
                    return "skipped", f"predicted {needed:.0f} s for the case, {max(left, 0):.0f} s left of the budget"
        return None

    def _make_input_sets(self, spec):
        a = self.args
        per_set = (2 + (spec.k if spec.hard else 0)) * spec.n * spec.d * self.torch.empty((), dtype=spec.dtype).element_size()
        count = max(1, min(a.max_input_sets, math.ceil(4 * self.dev.cache_bytes() / per_set)))
        try:
            return [make_inputs(spec.n, spec.d, spec.dtype, spec.device, spec.hard, a.seed * 1000 + k,
                                group_size=spec.group_size, k=spec.k) for k in range(count)]
        except Exception as exc:
            if is_oom(exc):
                return None
            raise

    def _run_case(self, case, impl, spec, sets, reference):
        a, dev = self.args, self.dev
        case.input_sets = len(sets)
        if case.backend == "triton":
            case.extra["triton_backward"] = chosen_backward(spec.dtype, spec.d, spec.device,
                                                            grouped=spec.loss == "groups")
        call = None
        try:
            call = harness.fwd_bwd(impl.make(spec))
            # 1. first call (compilation, autotuning), and the agreement check on it
            t0 = time.perf_counter()
            loss, grads = call(sets[0])
            dev.sync()
            case.first_call_s = round(time.perf_counter() - t0, 4)
            case.agreement = ({"checked": False, "reason": "--no-check"} if a.no_check
                              else agreement(loss, grads, reference, a.dtype, self.tf32, self.family.grad_names))
            del loss, grads
            # 2. extra peak memory of one call
            warm_ms = None
            if not a.no_memory:
                mem = dev.extra_peak(call, sets[0])
                case.peak_extra_bytes, case.retained_bytes = mem["peak"], mem["retained"]
                case.peak_method, warm_ms = mem["method"], mem["ms"]
                case.peak_extra_gib = case.peak_extra_bytes / 2**30
            # 3. warm-up (bounded to about a second), then the timed calls
            estimate_ms = self._warmup(call, sets, case, warm_ms)
            repeats = int(min(a.repeats, max(a.min_repeats, a.case_budget_s * 1e3 / max(estimate_ms, 1e-3))))
            case.time_ms = harness.summarize_times(dev.time_calls(call, sets, repeats))
            seconds = case.time_ms["median"] / 1e3
            case.tflops = case.flops / seconds / 1e12 if seconds > 0 else None
            if a.loss == "infonce":
                case.tflops_8nmd = case.tflops
            real = impl.real_flops(spec) if impl.real_flops else None
            if real is not None and seconds > 0:
                case.tflops_real = real / seconds / 1e12
            verdict = case.agreement or {}
            if not verdict.get("checked"):
                case.status, case.reason = "unchecked", verdict.get("reason")
            elif verdict.get("ok"):
                case.status = "ok"
            else:
                case.status, case.reason = "disagrees", verdict.get("summary")
        except Unsupported as exc:
            case.status, case.reason = "unsupported", str(exc)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            if is_oom(exc):
                case.status, case.reason = "oom", first_line(exc, 200)
            else:
                case.status, case.reason = "error", first_line(exc)
                if dev.cuda and is_fatal(exc):
                    self.fatal = f"{case.impl} at N={case.n}: {case.reason}"
        finally:
            del call
            dev.cleanup()

    def _warmup(self, call, sets, case, warm_ms: float | None) -> float:
        """Untimed calls (at most --warmup, about a second in all, counting a warm call
        already made); returns the estimated milliseconds of one call."""
        times = [warm_ms] if warm_ms is not None else []
        count = 0
        while count < self.args.warmup and sum(times) <= 1000.0 or not times:
            times.extend(self.dev.time_calls(call, [sets[(count + 1) % len(sets)]], 1))
            count += 1
        case.extra["warmup_calls"] = count
        return min(times)


def _one_line(c: Case, family: Family) -> str:
    if c.status not in TIMED_STATUSES:
        return f"{c.status}: {c.reason}"
    t = c.time_ms
    parts = [f"{t['median']:.3f} ms (min {t['min']:.3f}, max {t['max']:.3f}, {t['runs']} runs"
             f"{', ' + str(c.input_sets) + ' input sets' if c.input_sets and c.input_sets > 1 else ''})"]
    if c.peak_extra_gib is not None:
        parts.append(f"extra {c.peak_extra_gib:.4f} GiB")
    if c.tflops is not None:
        parts.append(f"{c.tflops:.2f} TFLOP/s({family.flop_label})")
    a = c.agreement or {}
    if a.get("checked"):
        parts.append(f"err loss {a['loss_rel_err']:.1e} grad {a['max_grad_rel_err']:.1e}")
    parts.append({"ok": "agrees", "disagrees": f"DISAGREES: {c.reason}", "unchecked": f"unchecked: {c.reason}"}[c.status])
    if c.backend:
        parts.append(f"backend {c.backend}")
    return ", ".join(parts)
