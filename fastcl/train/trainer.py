"""The training loop: optimizer and schedule, evaluation on STS-B dev with the best model
kept, checkpoints written atomically, ``--resume``, Ctrl-C, logs.

Output directory layout (``--output-dir OUT``)::

    OUT/                   the final model (the best on STS-B dev when evaluating, else
                           the last): AutoModel / SentenceTransformer / fastcl.encode load it
    OUT/best/              the best model so far, replaced atomically at each improvement
    OUT/checkpoint/        state.pt (model, optimizer with any Child-Tuning masks and
                           generators, scheduler, scaler, MoCo key encoder and queue, RNG,
                           data position) and rng-rank<R>.pt, written atomically
    OUT/log.jsonl          one JSON object per evaluation and per logging interval
    OUT/results.json       before / after numbers, throughput, wall time, peak memory
    OUT/spectrum.png       singular spectrum of STS-B dev embeddings before and after
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data import BatchPlan, DataError, drop_duplicates, local_slice, mask_tokens, read_training_file, tokenize_rows
from ..saved_model import inference_max_length, save_encoder
from ..sentence_model import SentenceEncoder
from .step import DISTRIBUTED_LOSSES, LossConfig, MoCo, compute_gradients


@dataclass
class TrainConfig:
    train_file: str
    output_dir: str
    model: str | None = None
    pooler: str = "auto"
    mlp: str = "auto"
    temperature: float = 0.05
    hard_negative_weight: float = 1.0
    gaussian_negatives: int = 0
    gaussian_weight: float = 1.0
    max_length: int = 32
    do_mlm: bool = False
    mlm_weight: float = 0.1
    mlm_probability: float = 0.15
    learning_rate: float = 3e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 64
    chunk_size: int = 0
    dedup: bool = False
    seed: int = 42
    precision: str = "auto"
    max_grad_norm: float = 1.0
    eval_steps: int = 125
    eval_data_dir: str | None = None
    eval_batch_size: int = 128
    no_eval: bool = False
    save_steps: int = 0
    logging_steps: int = 50
    resume: bool = False
    overwrite: bool = False
    device: str | None = None
    loss_backend: str = "auto"
    distributed_loss: str = "gather"
    moco_queue: int = 0
    moco_momentum: float = 0.999
    child_tuning: str | None = None
    child_tuning_p: float = 0.3
    child_tuning_fisher_batches: int = 32
    progress: bool = True
    extra: dict = field(default_factory=dict)


#: Options a resumed run must share with its checkpoint (anything else may change).
RESUME_MUST_MATCH = ("train_file", "batch_size", "seed", "pooler", "mlp", "do_mlm", "moco_queue", "moco_momentum",
                     "child_tuning", "child_tuning_p")


def check_method_options(cfg: TrainConfig) -> None:
    """Ranges of the MoCo, Child-Tuning and distributed-loss options (ValueError naming the flag)."""
    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not isinstance(cfg.moco_queue, int) or isinstance(cfg.moco_queue, bool) or cfg.moco_queue < 0:
        raise ValueError(f"--moco-queue must be an int >= 0 (0: no MoCo), got {cfg.moco_queue!r}")
    if not number(cfg.moco_momentum) or not 0.0 <= cfg.moco_momentum < 1.0:
        raise ValueError(f"--moco-momentum must be in [0, 1) (1 would freeze the key encoder), got "
                         f"{cfg.moco_momentum!r}")
    if cfg.child_tuning not in (None, "f", "d"):
        raise ValueError(f"--child-tuning must be 'f' (task-free) or 'd' (task-driven), got {cfg.child_tuning!r}")
    if not number(cfg.child_tuning_p) or not 0.0 < cfg.child_tuning_p <= 1.0:
        raise ValueError(f"--child-tuning-p must be in (0, 1], got {cfg.child_tuning_p!r}")
    if (not isinstance(cfg.child_tuning_fisher_batches, int) or isinstance(cfg.child_tuning_fisher_batches, bool)
            or cfg.child_tuning_fisher_batches < 1):
        raise ValueError(f"--child-tuning-fisher-batches must be an int >= 1, got {cfg.child_tuning_fisher_batches!r}")
    if cfg.distributed_loss not in DISTRIBUTED_LOSSES:
        raise ValueError(f"--distributed-loss must be one of {', '.join(DISTRIBUTED_LOSSES)}, got "
                         f"{cfg.distributed_loss!r}")


def parameter_groups(encoder) -> list[tuple[list[str], list[torch.nn.Parameter], bool]]:
    """The optimizer's two groups of trainable parameters, ``(names, params, decay)``:
    weight decay for weights, none for biases and norms. Their concatenation is the
    order in which optimizer state dicts number the parameters."""
    decay, no_decay = ([], []), ([], [])
    for name, p in encoder.named_parameters():
        if not p.requires_grad:
            continue
        group = no_decay if name.endswith("bias") or "LayerNorm" in name or "norm" in name.lower() else decay
        group[0].append(name)
        group[1].append(p)
    return [(decay[0], decay[1], True), (no_decay[0], no_decay[1], False)]


# ------------------------------------------------------------------ files


def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then os.replace: a reader
    (or a resume after a crash) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_directory(src: Path, dst: Path) -> None:
    """Make ``src`` appear as ``dst`` (two renames; a crash in between leaves
    ``dst.old``, which :func:`recover_directory` puts back)."""
    old = dst.with_name(dst.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def recover_directory(dst: Path) -> None:
    old = dst.with_name(dst.name + ".old")
    if not dst.exists() and old.exists():
        os.replace(old, dst)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ trainer


class Trainer:
    """Builds everything from a :class:`TrainConfig`; :meth:`train` runs it."""

    def __init__(self, cfg: TrainConfig, log=None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.main = self.rank == 0
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self._stop = False

    def log(self, message: str) -> None:
        if not self.main:
            return
        if getattr(self, "_bar", None) is not None:
            self._bar.write(message.strip("\n"), file=sys.stderr)  # on its own line, above the bar
        else:
            self._log(message)

    # ---------------------------------------------------------- set-up

    def setup(self, backbone=None, tokenizer=None) -> None:
        cfg = self.cfg
        from ..saved_model import default_model_dir, load_backbone, pooler_from_directory
        from ..sentence_model import check_pooler, resolve_mlp

        check_method_options(cfg)

        if cfg.device:
            self.device = torch.device(cfg.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        precision = cfg.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        if precision in ("bf16", "fp16") and self.device.type != "cuda":
            raise ValueError(f"--precision {precision} needs a CUDA device (autocast on GPU); use fp32 on CPU")
        self.precision = precision

        self.data = read_training_file(cfg.train_file)
        if not cfg.resume and not cfg.overwrite and (self.out / "checkpoint" / "state.pt").exists():
            raise FileExistsError(f"{self.out} already holds a checkpoint: pass --resume to continue it or "
                                  "--overwrite to start again")
        if self.world > 1 and cfg.batch_size < self.world:
            raise DataError(f"batch size {cfg.batch_size} is smaller than the {self.world} processes")
        self.plan = BatchPlan(len(self.data), cfg.batch_size, cfg.seed, cfg.train_file)
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * self.plan.steps_per_epoch))

        model_path = cfg.model or (None if backbone is not None else default_model_dir())
        self.model_path = model_path
        if cfg.pooler == "auto":
            declared = pooler_from_directory(model_path)[0] if model_path and Path(model_path).is_dir() else None
            self.pooler = declared or "cls"
        else:
            self.pooler = check_pooler(cfg.pooler)
        mlp_train, mlp_eval = resolve_mlp(cfg.mlp, self.pooler)

        torch.manual_seed(cfg.seed)  # identical head initialization on every rank
        if backbone is None:
            backbone, tokenizer = load_backbone(model_path)
        self.tokenizer = tokenizer
        self.encoder = SentenceEncoder(backbone, self.pooler, mlp_train, mlp_eval, cfg.do_mlm).to(self.device)
        self.encoder.train()
        self.moco = None
        if cfg.moco_queue:
            # A copy of the encoder made before DDP wraps it; identical on every rank.
            self.moco = MoCo(self.encoder, cfg.moco_queue, cfg.moco_momentum, dim=backbone.config.hidden_size,
                             all_ranks=self.distributed).train()
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers (position ids) are constants: no per-forward sync. The flag's name changed in torch 2.13.
            import inspect
            quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                     else {"broadcast_buffers": False})
            self.model = DDP(self.encoder, device_ids=ids, **quiet)
        else:
            self.model = self.encoder

        groups = [{"params": params, "weight_decay": cfg.weight_decay if decay else 0.0}
                  for _, params, decay in parameter_groups(self.encoder)]
        if cfg.child_tuning:
            from ..optim import ChildTuningAdamW

            # The same seed on every rank: the task-free masks must agree across DDP ranks.
            # Task-driven masks are set after the Fisher estimate (or loaded on --resume).
            self.optimizer = ChildTuningAdamW(
                groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                mode=cfg.child_tuning, reserve_p=cfg.child_tuning_p, masks={} if cfg.child_tuning == "d" else None,
                seed=cfg.seed)
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.total_steps)
        total = self.total_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup  # the first step trains at lr / warmup, not 0
            return max(0.0, (total - step) / max(1, total - warmup))

        self.warmup = warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.loss_cfg = LossConfig(cfg.temperature, cfg.hard_negative_weight, cfg.gaussian_negatives,
                                   cfg.gaussian_weight, cfg.mlm_weight, cfg.loss_backend, cfg.distributed_loss)
        # Gaussian negatives: one generator with the same seed on every rank (the draws are
        # local constants; equal draws keep the ranks' losses those of one process).
        self.gauss_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.mlm_gen = torch.Generator().manual_seed(cfg.seed + 2 + self.rank)

        self.step, self.epoch, self.index = 0, 0, 0
        self.best, self.best_step = -math.inf, None
        self.sentences_seen, self.train_seconds = 0, 0.0
        self.before = None
        self.eval_sets = self._eval_sets()

        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.out / "checkpoint"
        recover_directory(self.out / "best")
        if cfg.resume:
            self._load_checkpoint()
        elif self.main:  # a fresh start: nothing of an earlier run may mix with this one
            for name in ("checkpoint", "best", "last", "log.jsonl", "results.json", "spectrum.png"):
                stale = self.out / name
                if stale.is_dir():
                    shutil.rmtree(stale)
                elif stale.exists():
                    stale.unlink()
        # Dropout differs per rank (seeded after the shared initialization above).
        if not cfg.resume:
            torch.manual_seed(cfg.seed + 1000 * self.rank)
            random.seed(cfg.seed + self.rank)
            np.random.seed(cfg.seed + self.rank)
        if self.distributed:
            dist.barrier()  # rank 0 has cleaned the output directory
        if cfg.distributed_loss != "gather" and not self.distributed:
            self.log(f"note: --distributed-loss {cfg.distributed_loss} applies under DDP (torchrun); in one process "
                     "the loss is the plain one")
        if cfg.child_tuning == "d":
            if cfg.resume:
                if not self.optimizer.masks:
                    raise ValueError("--resume: the checkpoint's optimizer holds no Child-Tuning-D mask")
            else:
                self.optimizer.set_masks(self.child_tuning_masks())

    def _eval_sets(self):
        from ..evaluate import default_data_dir, find_tasks, load_stsb_split

        if self.cfg.no_eval:
            return None
        data_dir = Path(self.cfg.eval_data_dir) if self.cfg.eval_data_dir else default_data_dir()
        tasks = find_tasks(data_dir) if data_dir.is_dir() else {}
        if "STSBenchmark" not in tasks:
            if self.cfg.eval_data_dir:
                raise FileNotFoundError(f"no STSBenchmark/sts-dev.csv under {data_dir} (also looked in STS/, sts/)")
            self.log(f"warning: STS-B not found under {data_dir}: training without evaluation "
                     "(pass --eval-data-dir DIR with STSBenchmark/sts-{dev,test}.csv)")
            return None
        d = tasks["STSBenchmark"]
        return {"dev": load_stsb_split(d / "sts-dev.csv"), "test": load_stsb_split(d / "sts-test.csv")}

    # ---------------------------------------------------------- evaluation

    def _encode_fn(self):
        from ..encoder import Encoder

        enc = Encoder(self.encoder, self.tokenizer, self.device, inference_max_length(self.encoder.backbone,
                                                                                      self.tokenizer))
        from ..evaluate import memoize

        return memoize(lambda s: enc.encode(s, batch_size=self.cfg.eval_batch_size))

    def evaluate(self, splits=("dev",), geometry: bool = True) -> dict:
        """STS-B Spearman x100 on ``splits`` (+ alignment / uniformity on dev) with the live model."""
        from ..evaluate import embedding_geometry, score_sets

        was_training = self.encoder.training
        self.encoder.eval()
        try:
            encode_fn = self._encode_fn()
            result = {}
            for split in splits:
                result[f"stsb_{split}"] = score_sets(encode_fn, [self.eval_sets[split]])["all"]["spearman"]
            if geometry:
                g = embedding_geometry(encode_fn, self.eval_sets["dev"])
                result.update(alignment=g["alignment"], uniformity=g["uniformity"],
                              spectrum_top1_energy=g["spectrum"]["top1_energy"],
                              spectrum_effective_rank=g["spectrum"]["effective_rank"],
                              _spectrum=g["spectrum"]["normalized"])  # for results.json's plot, not the log
        finally:
            self.encoder.train(was_training)
        return result

    def write_log(self, record: dict) -> None:
        if not self.main:
            return
        record = {k: v for k, v in record.items() if not k.startswith("_")}
        with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------- Child-Tuning-D

    def child_tuning_masks(self) -> dict[torch.Tensor, torch.Tensor]:
        """Child-Tuning-D's fixed gradient mask, from the Fisher information of the training
        loss on the first ``--child-tuning-fisher-batches`` batches of the first epoch.

        Each batch's gradient is computed by the training step itself (same loss, MLM,
        gradient caching, MoCo keys, and under DDP the global-batch gradient, so every
        rank gets the same mask); as in the paper's code, each scored parameter's gradient
        is clipped to ``--max-grad-norm`` and squared, the squares are averaged over the
        batches, and the top p fraction of all scored entries (one global ranking,
        :func:`fastcl.optim.top_fraction_mask`) is kept. Scored: the parameters whose
        name contains "layer" (the transformer layers, the paper's choice; embeddings and
        heads train fully), or every trainable parameter if no name does. Uses its own
        generators for MLM masking and Gaussian negatives, so training draws what it would
        have drawn; dropout draws from the global generator, which checkpoints save.
        """
        from ..optim import top_fraction_mask

        cfg = self.cfg
        named = [(n, p) for n, p in self.encoder.named_parameters() if p.requires_grad]
        scored = [(n, p) for n, p in named if "layer" in n] or named
        n_batches = min(cfg.child_tuning_fisher_batches, self.plan.steps_per_epoch)
        fisher = {n: torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
                  for n, p in scored}
        gauss = torch.Generator(device=self.device).manual_seed(cfg.seed + 3)
        mlm = torch.Generator().manual_seed(cfg.seed + 4 + self.rank)
        self.log(f"Child-Tuning-D: Fisher information of the training loss over {n_batches} batches of "
                 f"{cfg.batch_size} ({sum(p.numel() for _, p in scored):,} entries of {len(scored)} parameters "
                 f"scored, keeping {cfg.child_tuning_p:g} of them)")
        bar = None
        if self.main and cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_batches, unit="batch", desc="Fisher information", dynamic_ncols=True, file=sys.stderr)
        t0 = time.perf_counter()
        self.model.train()
        try:
            for index in range(n_batches):
                batch, _ = self._batch(0, index, mlm_gen=mlm)
                for _, p in named:
                    p.grad = None
                compute_gradients(self.model, batch, self.loss_cfg, chunk_size=cfg.chunk_size,
                                  generator=gauss if cfg.gaussian_negatives else None, autocast=self._autocast,
                                  device=self.device, moco=self.moco)
                with torch.no_grad():
                    for name, p in scored:
                        if p.grad is None:
                            continue
                        grad = p.grad.to(fisher[name].dtype)
                        if cfg.max_grad_norm > 0:
                            grad = grad * torch.clamp(cfg.max_grad_norm / (grad.norm() + 1e-6), max=1.0)
                        fisher[name] += grad * grad
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for _, p in named:
                p.grad = None
            if self.moco is not None:
                self.moco.pending = None  # estimation keys never enter the queue
        masks = top_fraction_mask({n: f / n_batches for n, f in fisher.items()}, cfg.child_tuning_p)
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        self.log(f"Child-Tuning-D: mask of {kept:,} / {total:,} entries ({kept / total:.3f}) in "
                 f"{time.perf_counter() - t0:.1f} s")
        by_name = dict(named)
        return {by_name[n]: m for n, m in masks.items()}

    # ---------------------------------------------------------- checkpoints

    def save_model(self, directory: Path) -> None:
        """The inference model, written to a temporary directory and renamed into place."""
        tmp = directory.with_name(f".{directory.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        save_encoder(self.encoder, self.tokenizer, tmp, self.cfg.max_length)
        replace_directory(tmp, directory)

    def save_checkpoint(self) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"step": self.step, "rng": _rng_state(), "mlm_gen": self.mlm_gen.get_state()},
                          self.ckpt_dir / f"rng-rank{self.rank}.pt")
        if self.main:
            state = {
                "step": self.step, "epoch": self.epoch, "index": self.index, "world": self.world,
                "model": self.encoder.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "gauss_gen": self.gauss_gen.get_state(), "best": self.best, "best_step": self.best_step,
                "before": self.before, "sentences_seen": self.sentences_seen,
                "train_seconds": self.train_seconds, "config": asdict(self.cfg),
                "moco": self.moco.state_dict() if self.moco is not None else None,
                # which parameter each optimizer state index (and Child-Tuning-D mask) belongs to
                "optimizer_param_names": [n for names, _, _ in parameter_groups(self.encoder) for n in names],
            }
            atomic_torch_save(state, self.ckpt_dir / "state.pt")

    def _load_checkpoint(self) -> None:
        path = self.ckpt_dir / "state.pt"
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        old = state["config"]
        defaults = TrainConfig(train_file="", output_dir="")
        for key in RESUME_MUST_MATCH:
            then = old.get(key, getattr(defaults, key))  # older checkpoints lack the newer options
            if then != getattr(self.cfg, key):
                raise ValueError(f"--resume: the checkpoint was made with {key}={then!r}, "
                                 f"now {getattr(self.cfg, key)!r}")
        self.encoder.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.moco is not None:
            if state.get("moco") is None:
                raise ValueError(f"--resume: {path} holds no MoCo state (key encoder and queue)")
            self.moco.load_state_dict(state["moco"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.gauss_gen.set_state(state["gauss_gen"])
        self.step, self.epoch, self.index = state["step"], state["epoch"], state["index"]
        self.best, self.best_step, self.before = state["best"], state["best_step"], state["before"]
        self.sentences_seen, self.train_seconds = state["sentences_seen"], state["train_seconds"]
        rng_path = self.ckpt_dir / f"rng-rank{self.rank}.pt"
        if rng_path.exists() and state["world"] == self.world:
            rng = torch.load(rng_path, map_location="cpu", weights_only=False)
            if rng["step"] == self.step:
                _set_rng_state(rng["rng"])
                self.mlm_gen.set_state(rng["mlm_gen"])
            else:
                self.log(f"warning: {rng_path} is from step {rng['step']}, the checkpoint from {self.step}: "
                         "random states reseeded")
                torch.manual_seed(self.cfg.seed + 1000 * self.rank + self.step)
        else:
            torch.manual_seed(self.cfg.seed + 1000 * self.rank + self.step)
        self.log(f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.index})")

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
        return batch, n_global

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _install_signals(self):
        previous = {}

        def handler(signum, frame):
            if self._stop:  # second Ctrl-C: stop at once
                raise KeyboardInterrupt
            self._stop = True
            self.log(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then exiting "
                     "(again to abort without saving)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    def _stop_agreed(self) -> bool:
        if not self.distributed:
            return self._stop
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _maybe_evaluate(self, loss_avg: float | None) -> None:
        if self.eval_sets is None:
            return
        if self.main:
            t0 = time.perf_counter()
            r = self.evaluate(("dev",))
            improved = r["stsb_dev"] > self.best
            if improved:
                self.best, self.best_step = r["stsb_dev"], self.step
                self.save_model(self.out / "best")
            record = {"event": "eval", "step": self.step, "epoch": self.epoch, **r, "train_loss": loss_avg,
                      "lr": self.scheduler.get_last_lr()[0], "best": improved, "eval_seconds":
                      time.perf_counter() - t0}
            self.write_log(record)
            self.log(f"step {self.step}: STS-B dev {r['stsb_dev']:.2f} (best {self.best:.2f} at step "
                     f"{self.best_step}), alignment {r['alignment']:.4g}, uniformity {r['uniformity']:.4g}")
        if self.distributed:
            dist.barrier()

    def train(self) -> dict:
        cfg = self.cfg
        wall0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.eval_sets is not None and self.before is None and self.step == 0:
            if self.main:
                self.before = self.evaluate(("dev", "test"))
                self.write_log({"event": "eval", "step": 0, "when": "before", **self.before})
                self.log(f"before training: STS-B dev {self.before['stsb_dev']:.2f}, test "
                         f"{self.before['stsb_test']:.2f}, alignment {self.before['alignment']:.4g}, "
                         f"uniformity {self.before['uniformity']:.4g}")
            if self.distributed:
                dist.barrier()
        kind = {"unsupervised": "unsupervised", "pairs": "supervised (pairs)", "triplets": "supervised (triplets)"}
        self.log(f"training {kind[self.data.kind]} SimCSE on {len(self.data)} rows of {cfg.train_file}: "
                 f"{self.total_steps} steps of batch {cfg.batch_size}"
                 + (f" in chunks of {cfg.chunk_size}" if cfg.chunk_size else "")
                 + (f" over {self.world} processes" if self.world > 1 else "")
                 + (" (ring loss)" if self.world > 1 and cfg.distributed_loss == "ring" else "")
                 + (f", MoCo (queue {cfg.moco_queue}, momentum {cfg.moco_momentum})" if self.moco is not None else "")
                 + (f", Child-Tuning-{cfg.child_tuning.upper()} (p {cfg.child_tuning_p})" if cfg.child_tuning else "")
                 + f", pooler {self.pooler}, {self.precision}, device {self.device}")

        bar = None
        if self.main and cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)
            self._bar = bar
        previous = self._install_signals()
        interval_loss, interval_n, interval_t, interval_sent = 0.0, 0, 0.0, 0
        interrupted = False
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
                                          else None, device=self.device, moco=self.moco)
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
                if cfg.eval_steps and self.step % cfg.eval_steps == 0:
                    self._maybe_evaluate(loss_avg)
                save_every = cfg.save_steps or cfg.eval_steps
                if save_every and self.step % save_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            interrupted = True
            self.log("\ninterrupted: saving the checkpoint of the last completed step")
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)
            if bar is not None:
                bar.close()
                self._bar = None
        self.save_checkpoint()
        if interrupted:
            self.log(f"checkpoint saved at step {self.step} in {self.ckpt_dir}; continue with --resume")
            return {"interrupted": True, "step": self.step}
        return self.finish(time.perf_counter() - wall0)

    def _plot_spectra(self, after: dict) -> None:
        """OUT/spectrum.png: the normalized singular spectrum of the STS-B dev embeddings,
        before and after training (SimCSE section 5)."""
        from ..metrics import plot_spectra

        spectra = {}
        if self.before and self.before.get("_spectrum"):
            spectra["before"] = self.before["_spectrum"]
        spectra[f"after (step {self.best_step})"] = after["_spectrum"]
        try:
            plot_spectra(spectra, self.out / "spectrum.png", title="STS-B dev embeddings: singular spectrum")
        except ImportError as e:
            self.log(f"note: no spectrum plot ({e})")

    def finish(self, wall_seconds: float) -> dict:
        """Last evaluation, the final model into OUT, STS-B test with it, results.json."""
        if self.eval_sets is not None and (not self.cfg.eval_steps or self.step % self.cfg.eval_steps):
            self._maybe_evaluate(None)  # the last steps count too
        results = {}
        if self.main:
            if self.eval_sets is not None:
                source = self.out / "best"  # evaluated at least once above, so it exists
            else:
                source = self.out / "last"  # nothing to choose by: the last model
                self.save_model(source)
            for entry in source.iterdir():  # the final model into OUT itself, entry by entry
                target = self.out / entry.name
                tmp = self.out / f".{entry.name}.tmp"
                if tmp.exists():
                    shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
                shutil.copytree(entry, tmp) if entry.is_dir() else shutil.copy2(entry, tmp)
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            after = None
            if self.eval_sets is not None:
                from ..encoder import load_encoder
                from ..evaluate import embedding_geometry, score_sets

                enc = load_encoder(self.out, device=self.device, verbose=False)  # exactly what users load
                from ..evaluate import memoize

                fn = memoize(lambda s: enc.encode(s, batch_size=self.cfg.eval_batch_size))
                # Same order of encoding as evaluate(): batches (and so rounding) are identical.
                after = {"stsb_dev": score_sets(fn, [self.eval_sets["dev"]])["all"]["spearman"],
                         "stsb_test": score_sets(fn, [self.eval_sets["test"]])["all"]["spearman"]}
                g = embedding_geometry(fn, self.eval_sets["dev"])
                after.update({"alignment": g["alignment"], "uniformity": g["uniformity"],
                              "spectrum_top1_energy": g["spectrum"]["top1_energy"],
                              "spectrum_effective_rank": g["spectrum"]["effective_rank"],
                              "_spectrum": g["spectrum"]["normalized"]})
                self._plot_spectra(after)
                self.write_log({"event": "eval", "step": self.step, "when": "after (best model)",
                                "best_step": self.best_step, **after})
                self.log(f"after training (best model, step {self.best_step}): STS-B dev {after['stsb_dev']:.2f}, "
                         f"test {after['stsb_test']:.2f}, alignment {after['alignment']:.4g}, "
                         f"uniformity {after['uniformity']:.4g}")
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
            results = {
                "config": asdict(self.cfg), "model": self.model_path, "pooler": self.pooler, "kind": self.data.kind,
                "device": str(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else "cpu",
                "world_size": self.world, "precision": self.precision, "steps": self.step,
                "best_step": self.best_step,
                "before": {k: v for k, v in (self.before or {}).items() if not k.startswith("_")} or None,
                "after": {k: v for k, v in (after or {}).items() if not k.startswith("_")} or None,
                "spectrum_normalized": {"before": (self.before or {}).get("_spectrum"),
                                        "after": (after or {}).get("_spectrum")},
                "sentences_per_s": self.sentences_seen / self.train_seconds if self.train_seconds else None,
                "train_seconds": self.train_seconds, "wall_seconds_this_run": wall_seconds,
                "peak_gpu_memory_gib": peak,
            }
            (self.out / "results.json").write_text(json.dumps(results, indent=2))
        if self.distributed:
            dist.barrier()
        return results
