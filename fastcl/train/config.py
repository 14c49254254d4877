"""The trainer's options (:class:`TrainConfig`, one field per command-line flag) and their checks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .methods.options import check_method
from .step import DISTRIBUTED_LOSSES


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
    geometry_steps: int = 0
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
    # --method and each method's own flags (fastcl/train/methods/); defaults are the papers'
    method: str = "simcse"
    sgbert_objective: str = "opt"
    sgbert_temperature: float = 0.01
    sgbert_lambda: float = 0.1
    sgbert_pooling: str = "max"
    sgbert_projection_dim: int = 4096
    sgbert_train_embeddings: bool = False
    tacl_temperature: float = 0.01
    tacl_mlm_weight: float = 1.0
    tacl_mask_probability: float = 0.15
    vascl_neighbours: int = 16
    vascl_radius: float = 15.0
    vascl_feature_dim: int = 128
    vascl_head_lr_scale: float = 100.0
    vascl_encoder_gradient: bool = False
    dclr_model: str | None = None
    dclr_threshold: float = 0.9
    dclr_noise_times: float = 1.0
    dclr_noise_steps: int = 4
    dclr_noise_step_size: float = 1e-3
    dclr_block_rows: int = 256
    progress: bool = True
    extra: dict = field(default_factory=dict)


#: Options a resumed run must share with its checkpoint. The learning rate and weight
#: decay live in the optimizer's saved state: a new value would be silently ignored.
#: Anything else may change (--max-steps to train longer, --eval-steps, ...).
RESUME_MUST_MATCH = ("train_file", "batch_size", "seed", "pooler", "mlp", "do_mlm", "moco_queue", "moco_momentum",
                     "child_tuning", "child_tuning_p", "learning_rate", "weight_decay", "method",
                     "sgbert_projection_dim", "sgbert_train_embeddings", "vascl_feature_dim", "vascl_head_lr_scale",
                     "dclr_model")


def resume_mismatches(then: dict, now: TrainConfig) -> list[str]:
    """``"key=then, now now"`` for each option of :data:`RESUME_MUST_MATCH` that differs."""
    defaults = TrainConfig(train_file="", output_dir="")
    out = []
    for key in RESUME_MUST_MATCH:
        old, new = then.get(key, getattr(defaults, key)), getattr(now, key)  # older checkpoints lack newer options
        if key == "train_file" and isinstance(old, str) and os.path.realpath(old) == os.path.realpath(new):
            continue  # the same file named by another path
        if old != new:
            out.append(f"{key}={old!r}, now {new!r}")
    return out


def check_method_options(cfg: TrainConfig) -> None:
    """Ranges of the MoCo, Child-Tuning, distributed-loss and method options, and the combinations a
    method refuses (ValueError naming the flag)."""
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
    check_method(cfg)
