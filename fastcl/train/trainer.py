"""The training loop: optimizer and schedule, evaluation on STS-B dev with the best model
kept, checkpoints, ``--resume``, Ctrl-C, logs.

Output directory layout (``--output-dir OUT``)::

    OUT/                   the final model (the best on STS-B dev when evaluating, else
                           the last): AutoModel / SentenceTransformer / fastcl.encode load it
    OUT/best/              the best model so far, replaced atomically at each improvement
    OUT/checkpoint/state.pt  one file: model, optimizer with any Child-Tuning masks and
                           generators, scheduler, scaler, MoCo key encoder and queue, every
                           rank's random states, data position (see :mod:`.checkpoint`)
    OUT/log.jsonl          one JSON object per evaluation, logging interval and
                           --geometry-steps record (alignment, uniformity on STS-B dev)
    OUT/results.json       before / after numbers, throughput, wall time, peak memory
    OUT/spectrum.png       singular spectrum of STS-B dev embeddings before and after

The directory is checked before anything is loaded (:mod:`.output`). Interrupted (Ctrl-C
or SIGTERM, :mod:`.stopping`), the run finishes its step, writes a checkpoint and exits;
a second Ctrl-C aborts at once and writes nothing, so the last checkpoint stays the one a
resumed run starts from. Killed at any instant, the last checkpoint is whole and ``--resume``
continues exactly (the log is cut back to that checkpoint's step).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..interrupts import deferred
from ..saved_model import inference_max_length, resolve_model, save_encoder
from ..sentence_model import SentenceEncoder
from .checkpoint import TMP_MARK, CheckpointError, WriteError, read_checkpoint, replace_directory
from .config import TrainConfig, check_method_options
from .data import BatchPlan, DataError, drop_duplicates, local_slice, mask_tokens, read_training_file, tokenize_rows
from .placement import choose_device, choose_precision, wrap_for_ddp
from .output import DirectoryLock, check_output_dir, remove_if_empty
from .evaluation import load_eval_sets
from .optimizer import build_optimizer
from .resume import (
    check_resume_config, check_resume_progress,
    apply_checkpoint, promote_best, save_checkpoint, start_fresh, start_from_saved_head, vocabulary_digest,
)
from .methods import LABELS, auto_pooler, build_method
from .step import LossConfig, MoCo, compute_gradients
from .stopping import AbortRun, StopSignals


class Trainer:
    """Builds everything from a :class:`TrainConfig`; :meth:`train` runs it."""

    def __init__(self, cfg: TrainConfig, log=None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir).expanduser()
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.main = self.rank == 0
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.signals = StopSignals(self.log)
        self._lock, self._created_out = None, False
        self._saved_step = None
        self.last_eval_step = None

    def log(self, message: str) -> None:
        if not self.main:
            return
        if getattr(self, "_bar", None) is not None:
            self._bar.write(message.strip("\n"), file=sys.stderr)  # on its own line, above the bar
        else:
            self._log(message)

    # ---------------------------------------------------------- set-up

    def setup(self, backbone=None, tokenizer=None) -> None:
        """Check everything that can be checked cheaply (options, the output directory,
        the training file, the checkpoint) before loading the model; then build the run."""
        cfg = self.cfg
        from ..saved_model import default_model_dir, load_backbone, pooler_from_directory
        from ..sentence_model import check_pooler, resolve_mlp

        check_method_options(cfg)
        self.device = choose_device(cfg.device)
        self.precision = precision = choose_precision(cfg.precision, self.device)

        model_path = cfg.model or (None if backbone is not None else default_model_dir())
        self.model_path = resolve_model(model_path) if model_path else None
        if self.main:
            self._created_out = check_output_dir(self.out, self.model_path, cfg.resume, cfg.overwrite)
            self._lock = DirectoryLock(self.out)
            self._lock.acquire()
        self.ckpt_dir = self.out / "checkpoint"
        self.data = read_training_file(cfg.train_file)
        state = read_checkpoint(self.ckpt_dir / "state.pt") if cfg.resume else None
        if state is not None:
            check_resume_config(state, cfg)
        if self.world > 1 and cfg.batch_size < self.world:
            raise DataError(f"batch size {cfg.batch_size} is smaller than the {self.world} processes")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.plan = BatchPlan(len(self.data), cfg.batch_size, cfg.seed, cfg.train_file)
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * self.plan.steps_per_epoch))
        self.data_size = {"rows": len(self.data), "bytes": os.path.getsize(cfg.train_file)}
        if state is not None:
            check_resume_progress(state, cfg, self.data_size, self.total_steps)
        self.eval_sets = load_eval_sets(self)

        if cfg.pooler == "auto":
            declared = pooler_from_directory(self.model_path)[0] if self.model_path and Path(
                self.model_path).is_dir() else None
            self.pooler = auto_pooler(cfg.method, declared)
        else:
            self.pooler = check_pooler(cfg.pooler)
        mlp_train, mlp_eval = resolve_mlp(cfg.mlp, self.pooler)

        torch.manual_seed(cfg.seed)  # identical head initialization on every rank
        if backbone is None:
            backbone, tokenizer = load_backbone(self.model_path)
        self.tokenizer = tokenizer
        self.tokenizer_digest = vocabulary_digest(tokenizer)
        self.max_length = inference_max_length(backbone, tokenizer, self.model_path if self.model_path and Path(
            self.model_path).is_dir() else None)
        self.encoder = SentenceEncoder(backbone, self.pooler, mlp_train, mlp_eval, cfg.do_mlm)
        start_from_saved_head(self)
        self.encoder.to(self.device).train()
        self.method = build_method(self)  # before the optimizer: a method may add a head to the encoder
        self.moco = None
        if cfg.moco_queue:
            # A copy of the encoder made before DDP wraps it; identical on every rank.
            self.moco = MoCo(self.encoder, cfg.moco_queue, cfg.moco_momentum, dim=backbone.config.hidden_size,
                             all_ranks=self.distributed).train()
        self.model = wrap_for_ddp(self.encoder, self.device) if self.distributed else self.encoder

        self.optimizer, self.scheduler, self.warmup = build_optimizer(self.encoder, cfg, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.loss_cfg = LossConfig(cfg.temperature, cfg.hard_negative_weight, cfg.gaussian_negatives,
                                   cfg.gaussian_weight, cfg.mlm_weight, cfg.loss_backend, cfg.distributed_loss)
        # Gaussian negatives: one generator with the same seed on every rank (the draws are
        # local constants; equal draws keep the ranks' losses those of one process).
        self.gauss_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.mlm_gen = torch.Generator().manual_seed(cfg.seed + 2 + self.rank)
        if self.method is not None:  # its random draws (noise, directions, layers): checkpointed with gauss_gen
            self.method.generator = self.gauss_gen

        self.step, self.epoch, self.index = 0, 0, 0
        self.best, self.best_step = -math.inf, None
        self.sentences_seen, self.train_seconds = 0, 0.0
        self.before = None

        if state is not None:
            apply_checkpoint(self, state)
        elif self.main:
            start_fresh(self)
        else:  # dropout differs per rank (seeded after the shared initialization above)
            pass
        if state is None:
            torch.manual_seed(cfg.seed + 1000 * self.rank)
            random.seed(cfg.seed + self.rank)
            np.random.seed(cfg.seed + self.rank)
        if self.distributed:
            dist.barrier()  # rank 0 has prepared the output directory
        if cfg.distributed_loss != "gather" and not self.distributed:
            self.log(f"note: --distributed-loss {cfg.distributed_loss} applies under DDP (torchrun); in one process "
                     "the loss is the plain one")
        if cfg.child_tuning == "d":
            if state is not None:
                if not self.optimizer.masks:
                    raise CheckpointError("--resume: the checkpoint's optimizer holds no Child-Tuning-D mask")
            else:
                from .fisher import child_tuning_masks

                self.optimizer.set_masks(child_tuning_masks(self))

    # ---------------------------------------------------------- checkpoints

    def save_model(self, directory: Path, training: dict | None = None) -> None:
        """The inference model, written to a temporary directory and renamed into place;
        on any failure the temporary directory goes and ``directory`` is as it was."""
        tmp = directory.with_name(f".{directory.name.lstrip('.')}{TMP_MARK}")
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            with deferred():  # a Ctrl-C waits for the model to be whole
                save_encoder(self.encoder, self.tokenizer, tmp, self.cfg.max_length, self.max_length, training)
                replace_directory(tmp, directory)
        except OSError as e:
            raise WriteError(f"could not write the model to {directory} ({e.strerror or e})") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # ---------------------------------------------------------- the loop

    def _batch(self, epoch: int | None = None, index: int | None = None,
               mlm_gen: torch.Generator | None = None) -> tuple[dict, int]:
        """This rank's share of batch ``index`` of ``epoch`` (default: where training is)."""
        epoch = self.epoch if epoch is None else epoch
        index = self.index if index is None else index
        rows = [self.data.rows[i] for i in self.plan.batch(epoch, index)]
        if self.cfg.dedup:
            rows = drop_duplicates(rows)
        n_global = len(rows)
        if n_global < self.world:
            raise DataError(f"batch {index} of epoch {epoch} has {n_global} rows after --dedup, fewer "
                            f"than the {self.world} processes")
        rows = rows[local_slice(len(rows), self.rank, self.world)]
        batch = tokenize_rows(rows, self.tokenizer, self.cfg.max_length, self.data.views)
        if self.cfg.do_mlm:
            masked, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], self.tokenizer,
                                         self.cfg.mlm_probability, mlm_gen or self.mlm_gen)
            batch["mlm_input_ids"], batch["mlm_labels"] = masked, labels
        if self.method is not None:
            batch = self.method.prepare(batch, mlm_gen or self.mlm_gen)
        return batch, n_global

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _stop_agreed(self) -> bool:
        if not self.distributed:
            return self.signals.requested
        flag = torch.tensor([1.0 if self.signals.requested else 0.0],
                            device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _agreed(self, value: bool) -> bool:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])

    def train(self) -> dict:
        """Run to the last step (or an interruption); the output directory is released after."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict:
        from .evaluation import evaluate_before, finish, log_geometry, maybe_evaluate

        cfg = self.cfg
        wall0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.eval_sets is not None and self.before is None and self.step == 0:
            evaluate_before(self)
        kind = {"unsupervised": "unsupervised", "pairs": "supervised (pairs)", "triplets": "supervised (triplets)"}
        self.log(f"training {kind[self.data.kind]} {LABELS[cfg.method]} on {len(self.data)} rows of {cfg.train_file}: "
                 f"{self.total_steps} steps of batch {cfg.batch_size}"
                 + (f" in chunks of {cfg.chunk_size}" if cfg.chunk_size else "")
                 + (f" over {self.world} processes" if self.world > 1 else "")
                 + (" (ring loss)" if self.world > 1 and cfg.distributed_loss == "ring" else "")
                 + (f", MoCo (queue {cfg.moco_queue}, momentum {cfg.moco_momentum})" if self.moco is not None else "")
                 + (f", Child-Tuning-{cfg.child_tuning.upper()} (p {cfg.child_tuning_p})" if cfg.child_tuning else "")
                 + (f", {self.method.describe()}" if self.method is not None else "")
                 + f", pooler {self.pooler}, {self.precision}, device {self.device}")

        bar = None
        if self.main and cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
            self._bar = bar
        self.signals.install()
        interval_loss, interval_n, interval_t, interval_sent = 0.0, 0, 0.0, 0
        interrupted = aborted = False
        try:
            while self.step < self.total_steps:
                if self._stop_agreed():
                    interrupted = True
                    break
                if self.index >= self.plan.steps_per_epoch:
                    self.epoch, self.index = self.epoch + 1, 0
                t0 = time.perf_counter()
                batch, n_global = self._batch()
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                stats = compute_gradients(self.model, batch, self.loss_cfg, chunk_size=cfg.chunk_size,
                                          generator=self.gauss_gen if cfg.gaussian_negatives else None,
                                          autocast=self._autocast, scaler=self.scaler if self.precision == "fp16"
                                          else None, device=self.device, moco=self.moco, method=self.method)
                if self.precision == "fp16":
                    self.scaler.unscale_(self.optimizer)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                                   cfg.max_grad_norm)
                if self.precision == "fp16":
                    self.scaler.step(self.optimizer)
                else:
                    self.optimizer.step()
                self.scaler.update()
                self.scheduler.step()
                if self.moco is not None:  # EMA towards the updated encoder; this step's keys into the queue
                    self.moco.after_step(self.encoder)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                self.step += 1
                self.index += 1
                sentences = n_global * self.data.sentences_per_row()
                self.sentences_seen += sentences
                self.train_seconds += dt
                interval_loss += stats["loss"]
                interval_n += 1
                interval_t += dt
                interval_sent += sentences
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                    sent_s=f"{sentences / dt:.0f}", refresh=False)
                if cfg.logging_steps and self.step % cfg.logging_steps == 0:
                    self.write_log({"event": "train", "step": self.step, "epoch": self.epoch, "rows": n_global,
                                    "loss": interval_loss / interval_n, **{k: v for k, v in stats.items() if k != "loss"},
                                    "lr": self.scheduler.get_last_lr()[0],
                                    "sentences_per_s": interval_sent / interval_t, "elapsed_s": self.train_seconds})
                    loss_avg = interval_loss / interval_n
                    interval_loss, interval_n, interval_t, interval_sent = 0.0, 0, 0.0, 0
                else:
                    loss_avg = stats["loss"]
                eval_now = bool(cfg.eval_steps and self.step % cfg.eval_steps == 0)
                if cfg.geometry_steps and self.step % cfg.geometry_steps == 0 and not eval_now:
                    log_geometry(self)  # an evaluation at this step records the same numbers
                improved = eval_now and maybe_evaluate(self, loss_avg)
                save_every = cfg.save_steps or cfg.eval_steps
                if improved or (save_every and self.step % save_every == 0):
                    save_checkpoint(self)  # the checkpoint that names a new best comes before it is installed
                promote_best(self)
        except (AbortRun, KeyboardInterrupt):
            aborted = True
        finally:
            self.signals.restore()
            if bar is not None:
                bar.close()
                self._bar = None
        if aborted:
            last = self._saved_step
            if last is not None and last == self.best_step:  # its checkpoint is written: install it (a rename)
                promote_best(self)
            self.log("\naborted: nothing written" + (f"; --resume continues from the checkpoint of step {last}"
                                                     if last is not None else " (no checkpoint yet)"))
            return {"interrupted": True, "aborted": True, "step": last}
        if self._saved_step != self.step:
            save_checkpoint(self)
        if interrupted:
            self.log(f"checkpoint saved at step {self.step} in {self.ckpt_dir}; continue with --resume")
            return {"interrupted": True, "step": self.step}
        return finish(self, time.perf_counter() - wall0)

    def write_log(self, record: dict) -> None:
        if not self.main:
            return
        import json

        record = {k: v for k, v in record.items() if not k.startswith("_")}
        try:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise WriteError(f"could not write {self.out / 'log.jsonl'} ({e.strerror or e})") from None

    def close(self) -> None:
        """Release the output directory (a directory this run created and left empty, after
        an error in set-up, is removed). :meth:`train` calls it when it returns."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
            if self._created_out:
                remove_if_empty(self.out)
