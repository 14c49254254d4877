"""What a run keeps across an interruption: writing and applying the checkpoint
(:mod:`.checkpoint` holds the file format), installing the best model it names, putting
the output directory back in the state of the checkpoint's step, and clearing an
earlier run for a fresh start."""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..interrupts import deferred
from ..saved_model import read_json
from .checkpoint import (
    FORMAT, CheckpointError, atomic_torch_save, recover_directory, remove_temporaries, replace_directory, rng_state,
    set_rng_state,
)
from .config import RESUME_MUST_MATCH, resume_mismatches
from .optimizer import parameter_groups
from .output import remove_earlier_run

PENDING = ".best.pending"


def check_resume_config(state: dict, cfg) -> None:
    """--resume: the options that shape the run must be those the checkpoint was made with."""
    mismatches = resume_mismatches(state["config"], cfg)
    if mismatches:
        raise CheckpointError(f"--resume: the checkpoint was made with {'; '.join(mismatches)} "
                              f"(options that must stay: {', '.join(RESUME_MUST_MATCH)})")


def check_resume_progress(state: dict, cfg, data_size: dict, total_steps: int) -> None:
    """--resume: the training file must be the one the checkpoint read (its batches would
    differ), and the checkpoint's step within the steps asked for."""
    then = state.get("data")
    if then is not None and then != data_size:
        raise CheckpointError(f"--resume: {cfg.train_file} has changed since the checkpoint ({then['rows']} rows, "
                              f"{then['bytes']} bytes then; {data_size['rows']} rows, "
                              f"{data_size['bytes']} bytes now): its batches would not be the same")
    if state["step"] > total_steps:
        raise CheckpointError(f"--resume: the checkpoint is at step {state['step']}, past the {total_steps} "
                              "steps asked for (--max-steps / --epochs); ask for more steps to train on")


def _training_step_of(model_dir: Path) -> int | None:
    """The training step a saved model records (None if it records none or is unreadable)."""
    try:
        step = read_json(model_dir / "fastcl_config.json").get("training", {}).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def start_fresh(trainer) -> None:
    """An empty directory, or --overwrite: remove what an earlier fastcl run wrote there."""
    model_files = set()
    results = trainer.out / "results.json"
    try:
        model_files.update(read_json(results).get("model_files", []) if results.is_file() else [])
    except (ValueError, AttributeError):
        pass
    for staged in (trainer.out / "best", trainer.out / PENDING):
        if staged.is_dir():
            model_files.update(e.name for e in staged.iterdir())
    removed = remove_earlier_run(trainer.out, sorted(model_files))
    if removed:
        trainer.log(f"--overwrite: removed {', '.join(removed)} of an earlier run in {trainer.out}")


def save_checkpoint(trainer) -> None:
    """One file with every rank's random states (gathered to rank 0), written atomically."""
    mine = {"rng": rng_state(), "mlm_gen": trainer.mlm_gen.get_state()}
    ranks = [mine]
    if trainer.distributed:
        ranks = [None] * trainer.world
        dist.all_gather_object(ranks, mine)
    if trainer.main:
        log = trainer.out / "log.jsonl"
        state = {
            "format": FORMAT, "step": trainer.step, "epoch": trainer.epoch, "index": trainer.index,
            "world": trainer.world,
            "model": trainer.encoder.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
            "gauss_gen": trainer.gauss_gen.get_state(), "best": trainer.best, "best_step": trainer.best_step,
            "last_eval_step": trainer.last_eval_step, "before": trainer.before,
            "sentences_seen": trainer.sentences_seen, "train_seconds": trainer.train_seconds,
            "config": asdict(trainer.cfg), "moco": trainer.moco.state_dict() if trainer.moco is not None else None,
            # which parameter each optimizer state index (and Child-Tuning-D mask) belongs to
            "optimizer_param_names": [n for names, _, _ in parameter_groups(trainer.encoder) for n in names],
            "ranks": ranks, "log_bytes": log.stat().st_size if log.is_file() else 0, "data": trainer.data_size,
            "tokenizer": trainer.tokenizer_digest,
        }
        trainer.ckpt_dir.mkdir(parents=True, exist_ok=True)
        with deferred():  # an interruption during the write stops the run once the file is whole and counted
            atomic_torch_save(state, trainer.ckpt_dir / "state.pt")
            trainer._saved_step = trainer.step
    else:
        trainer._saved_step = trainer.step


def apply_checkpoint(trainer, state: dict) -> None:
    path = trainer.ckpt_dir / "state.pt"
    then = state["config"].get("model") or "the default model"
    if state.get("tokenizer") not in (None, trainer.tokenizer_digest):
        raise CheckpointError(f"--resume: the checkpoint was trained from {then}, whose tokenizer differs from that "
                              f"of --model {trainer.cfg.model or '(default)'}; pass --model {then}")
    try:
        trainer.encoder.load_state_dict(state["model"])
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise CheckpointError(f"--resume: {path} does not fit the model of --model {trainer.cfg.model or '(default)'} "
                              f"({first[:160]}); it was trained from {then}") from None
    try:
        trainer.optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"--resume: {path}: its optimizer state does not fit this run ({e})") from None
    if trainer.moco is not None:
        if state.get("moco") is None:
            raise CheckpointError(f"--resume: {path} holds no MoCo state (key encoder and queue)")
        trainer.moco.load_state_dict(state["moco"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.gauss_gen.set_state(state["gauss_gen"])
    trainer.step, trainer.epoch, trainer.index = state["step"], state["epoch"], state["index"]
    trainer.best, trainer.best_step, trainer.before = state["best"], state["best_step"], state["before"]
    trainer.last_eval_step = state.get("last_eval_step")
    trainer.sentences_seen, trainer.train_seconds = state["sentences_seen"], state["train_seconds"]
    trainer._saved_step = trainer.step
    ranks = state.get("ranks")
    if ranks is not None and state["world"] == trainer.world:
        set_rng_state(ranks[trainer.rank]["rng"])
        trainer.mlm_gen.set_state(ranks[trainer.rank]["mlm_gen"])
    else:
        why = f"made by {state['world']} processes, now {trainer.world}" if ranks else "from an older fastcl"
        trainer.log(f"warning: the checkpoint is {why}: random states reseeded (the run goes on, not bit-exactly)")
        torch.manual_seed(trainer.cfg.seed + 1000 * trainer.rank + trainer.step)
    if trainer.main:
        recover_outputs(trainer, state)
    trainer.log(f"resumed from {path} at step {trainer.step} (epoch {trainer.epoch}, batch {trainer.index})")


def recover_outputs(trainer, state: dict) -> None:
    """After a kill: a pending best model the checkpoint records is installed, one it
    does not is dropped; temporaries go; the log is cut back to the checkpoint's step."""
    pending = trainer.out / PENDING
    if pending.is_dir():
        if state["best_step"] is not None and _training_step_of(pending) == state["best_step"]:
            replace_directory(pending, trainer.out / "best")
        else:
                shutil.rmtree(pending)
    recover_directory(trainer.out / "best")
    for directory in (trainer.out, trainer.ckpt_dir):
        remove_temporaries(directory)
    for stale in trainer.ckpt_dir.glob("rng-rank*.pt"):  # an older fastcl's second checkpoint file
        stale.unlink()
    log, size = trainer.out / "log.jsonl", state.get("log_bytes")
    if isinstance(size, int) and log.is_file() and log.stat().st_size > size:
        os.truncate(log, size)


def promote_best(trainer) -> None:
    if trainer.main and (trainer.out / PENDING).is_dir():
        replace_directory(trainer.out / PENDING, trainer.out / "best")


def vocabulary_digest(tokenizer) -> str | None:
    """A digest of the tokenizer's vocabulary: a checkpoint resumed with another
    tokenizer would train on other token ids."""
    import hashlib
    import json

    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return None
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]


def start_from_saved_head(trainer) -> None:
    """Training on from a saved sentence model: its MLP head, when it has one for this
    pooler, is where the new head starts (not a fresh one)."""
    from ..saved_model import declared_head, load_head

    if trainer.encoder.mlp is None or not trainer.model_path or not Path(trainer.model_path).is_dir():
        return
    declared = declared_head(trainer.model_path)
    if declared and declared["head"] is not None and declared["pooler"] == trainer.pooler:
        load_head(trainer.encoder.mlp, declared["head"])
        trainer.log(f"MLP head: from {declared['head']}")
