"""The trainer's STS-B evaluations (before training, every ``--eval-steps``, after) and the
end of a run: the final model into the output directory, its scores, ``results.json``.

The "after training" scores are taken from the saved final model loaded with
:func:`fastcl.load_encoder`, exactly what users load; they equal the live model's scores
at the best step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..saved_model import FASTCL_CONFIG, atomic_write_text
from .checkpoint import TMP_MARK, WriteError, fsync_directory
from .resume import PENDING, promote_best, save_checkpoint

#: Copied last into the output directory: they declare the model whole.
MARKERS = ("modules.json", FASTCL_CONFIG)


def load_eval_sets(trainer):
    """The STS-B dev and test sets the run evaluates on, or None (``--no-eval``, or not found
    without ``--eval-data-dir``)."""
    from ..evaluate import default_data_dir, find_tasks, load_stsb_split

    if trainer.cfg.no_eval:
        return None
    data_dir = Path(trainer.cfg.eval_data_dir) if trainer.cfg.eval_data_dir else default_data_dir()
    tasks = find_tasks(data_dir) if data_dir.is_dir() else {}
    if "STSBenchmark" not in tasks or not (tasks["STSBenchmark"] / "sts-dev.csv").is_file():
        if trainer.cfg.eval_data_dir:
            raise FileNotFoundError(f"no STSBenchmark/sts-dev.csv and sts-test.csv under {data_dir} "
                                    "(also looked in STS/, sts/)")
        trainer.log(f"warning: STS-B not found under {data_dir}: training without evaluation "
                 "(pass --eval-data-dir DIR with STSBenchmark/sts-{dev,test}.csv)")
        return None
    d = tasks["STSBenchmark"]
    return {"dev": load_stsb_split(d / "sts-dev.csv"), "test": load_stsb_split(d / "sts-test.csv")}


def evaluate_live(trainer, splits=("dev",), geometry: bool = True) -> dict:
    """STS-B Spearman x100 on ``splits`` (+ alignment / uniformity on dev) with the live model."""
    from ..encoder import Encoder
    from ..evaluate import embedding_geometry, memoize, score_sets

    was_training = trainer.encoder.training
    trainer.encoder.eval()
    try:
        enc = Encoder(trainer.encoder, trainer.tokenizer, trainer.device, trainer.max_length)
        encode_fn = memoize(lambda s: enc.encode(s, batch_size=trainer.cfg.eval_batch_size))
        result = {}
        for split in splits:
            result[f"stsb_{split}"] = score_sets(encode_fn, [trainer.eval_sets[split]])["all"]["spearman"]
        if geometry:
            g = embedding_geometry(encode_fn, trainer.eval_sets["dev"])
            result.update(alignment=g["alignment"], uniformity=g["uniformity"],
                          spectrum_top1_energy=g["spectrum"]["top1_energy"],
                          spectrum_effective_rank=g["spectrum"]["effective_rank"],
                          _spectrum=g["spectrum"]["normalized"])  # for results.json's plot, not the log
    finally:
        trainer.encoder.train(was_training)
    return result


def evaluate_before(trainer) -> None:
    if trainer.main:
        trainer.before = evaluate_live(trainer, ("dev", "test"))
        trainer.write_log({"event": "eval", "step": 0, "when": "before", **trainer.before})
        b = trainer.before
        trainer.log(f"before training: STS-B dev {b['stsb_dev']:.2f}, test {b['stsb_test']:.2f}, alignment "
                    f"{b['alignment']:.4g}, uniformity {b['uniformity']:.4g}")
    if trainer.distributed:
        dist.barrier()


def log_geometry(trainer) -> None:
    """``--geometry-steps``: alignment, uniformity, the spectrum's summary and the STS-B dev
    score of the live model (one encoding of STS-B dev), as a ``geometry`` record of the
    log; nothing else changes (no best model, no checkpoint). The last step is left to the
    final evaluation, which records the same numbers from its own encoding."""
    if trainer.eval_sets is None or not trainer.main or trainer.step >= trainer.total_steps:
        return
    t0 = time.perf_counter()
    r = evaluate_live(trainer, ("dev",))
    trainer.write_log({"event": "geometry", "step": trainer.step, "epoch": trainer.epoch, **r,
                       "geometry_seconds": time.perf_counter() - t0})
    trainer.log(f"step {trainer.step}: alignment {r['alignment']:.4g}, uniformity {r['uniformity']:.4g} "
                f"(STS-B dev {r['stsb_dev']:.2f})")


def maybe_evaluate(trainer, loss_avg: float | None) -> bool:
    """Evaluate on STS-B dev (rank 0); a new best is written as the pending best model.
    Returns, on every rank, whether it improved (then the caller writes a checkpoint
    and installs the pending model)."""
    if trainer.eval_sets is None:
        return False
    improved = False
    if trainer.main:
        t0 = time.perf_counter()
        r = evaluate_live(trainer, ("dev",))
        improved = r["stsb_dev"] > trainer.best
        if improved:
            trainer.best, trainer.best_step = r["stsb_dev"], trainer.step
            trainer.save_model(trainer.out / PENDING, training={"step": trainer.step, "stsb_dev": r["stsb_dev"]})
        trainer.last_eval_step = trainer.step
        record = {"event": "eval", "step": trainer.step, "epoch": trainer.epoch, **r, "train_loss": loss_avg,
                  "lr": trainer.scheduler.get_last_lr()[0], "best": improved,
                  "eval_seconds": time.perf_counter() - t0}
        trainer.write_log(record)
        trainer.log(f"step {trainer.step}: STS-B dev {r['stsb_dev']:.2f} (best {trainer.best:.2f} at step "
                    f"{trainer.best_step}), alignment {r['alignment']:.4g}, uniformity {r['uniformity']:.4g}")
    return trainer._agreed(improved)


def install_final_model(out, source) -> list[str]:
    """Copy the model in ``source`` into ``out`` entry by entry (each one atomically),
    the files that declare it whole last. Returns the names."""
    entries = sorted(source.iterdir(), key=lambda e: (e.name in MARKERS, MARKERS.index(e.name)
                                                      if e.name in MARKERS else 0, e.name))
    try:
        for entry in entries:
            target, tmp = out / entry.name, out / f".{entry.name}{TMP_MARK}"
            if tmp.exists():
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            shutil.copytree(entry, tmp) if entry.is_dir() else shutil.copy2(entry, tmp)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(tmp, target)
        fsync_directory(out)
    except OSError as e:
        raise WriteError(f"could not write the final model into {out} ({e.strerror or e}); --resume writes it "
                         "again") from None
    return [e.name for e in entries]


def _plot_spectra(trainer, after: dict) -> None:
    """OUT/spectrum.png: the normalized singular spectrum of the STS-B dev embeddings,
    before and after training (SimCSE section 5)."""
    from ..metrics import plot_spectra

    spectra = {}
    if trainer.before and trainer.before.get("_spectrum"):
        spectra["before"] = trainer.before["_spectrum"]
    spectra[f"after (step {trainer.best_step})"] = after["_spectrum"]
    try:
        plot_spectra(spectra, trainer.out / "spectrum.png", title="STS-B dev embeddings: singular spectrum")
    except ImportError as e:
        trainer.log(f"note: no spectrum plot ({e})")
    except OSError as e:
        raise WriteError(f"could not write {trainer.out / 'spectrum.png'} ({e.strerror or e})") from None


def _after(trainer) -> dict:
    from ..encoder import load_encoder
    from ..evaluate import embedding_geometry, memoize, score_sets

    enc = load_encoder(trainer.out, device=trainer.device, verbose=False)  # exactly what users load
    fn = memoize(lambda s: enc.encode(s, batch_size=trainer.cfg.eval_batch_size))
    # Same order of encoding as the live evaluation: batches (and so rounding) are identical.
    after = {"stsb_dev": score_sets(fn, [trainer.eval_sets["dev"]])["all"]["spearman"],
             "stsb_test": score_sets(fn, [trainer.eval_sets["test"]])["all"]["spearman"]}
    g = embedding_geometry(fn, trainer.eval_sets["dev"])
    after.update({"alignment": g["alignment"], "uniformity": g["uniformity"],
                  "spectrum_top1_energy": g["spectrum"]["top1_energy"],
                  "spectrum_effective_rank": g["spectrum"]["effective_rank"],
                  "_spectrum": g["spectrum"]["normalized"]})
    return after


def finish(trainer, wall_seconds: float) -> dict:
    """Last evaluation, the final model into OUT, STS-B test with it, results.json."""
    cfg, out = trainer.cfg, trainer.out
    if trainer.eval_sets is not None:
        best_missing = not (out / "best").is_dir() and not (out / PENDING).is_dir()
        if trainer._agreed(trainer.last_eval_step != trainer.step or best_missing):
            if best_missing:
                trainer.best = -math.inf  # the best model is gone: the last one is evaluated afresh
            if maybe_evaluate(trainer, None):  # the last steps count too
                save_checkpoint(trainer)
                promote_best(trainer)
    results = {}
    if trainer.main:
        staging = None
        if trainer.eval_sets is not None:
            source = out / "best"
        else:  # nothing to choose by: the last model
            source = staging = out / f".final{TMP_MARK}"
            trainer.save_model(staging)
        model_files = install_final_model(out, source)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        after = None
        if trainer.eval_sets is not None:
            after = _after(trainer)
            _plot_spectra(trainer, after)
            trainer.write_log({"event": "eval", "step": trainer.step, "when": "after (best model)",
                               "best_step": trainer.best_step, **after})
            trainer.log(f"after training (best model, step {trainer.best_step}): STS-B dev {after['stsb_dev']:.2f}, "
                        f"test {after['stsb_test']:.2f}, alignment {after['alignment']:.4g}, "
                        f"uniformity {after['uniformity']:.4g}")
        device = trainer.device
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        results = {
            "config": asdict(cfg), "model": trainer.model_path, "pooler": trainer.pooler, "kind": trainer.data.kind,
            "device": str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu",
            "world_size": trainer.world, "precision": trainer.precision, "steps": trainer.step,
            "best_step": trainer.best_step,
            "before": {k: v for k, v in (trainer.before or {}).items() if not k.startswith("_")} or None,
            "after": {k: v for k, v in (after or {}).items() if not k.startswith("_")} or None,
            "spectrum_normalized": {"before": (trainer.before or {}).get("_spectrum"),
                                    "after": (after or {}).get("_spectrum")},
            "sentences_per_s": trainer.sentences_seen / trainer.train_seconds if trainer.train_seconds else None,
            "train_seconds": trainer.train_seconds, "wall_seconds_this_run": wall_seconds,
            "peak_gpu_memory_gib": peak, "model_files": model_files,
        }
        try:
            atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        except OSError as e:
            raise WriteError(f"could not write {out / 'results.json'} ({e.strerror or e})") from None
    if trainer.distributed:
        dist.barrier()
    return results
