"""The training methods of ``python -m fastcl.train`` and which options each combines with.

Imported by the command line before torch: no heavy import here.

- ``simcse``: SimCSE (and GS-InfoNCE, MoCo, Child-Tuning), the trainer's own step.
- ``sgbert``: SG-BERT (Kim et al., ACL 2021), :mod:`.sgbert`.
- ``tacl``: TaCL (Su et al., NAACL 2022 findings), :mod:`.tacl`.
- ``vascl``: VaSCL (Zhang et al., ACL 2022 findings), :mod:`.vascl`.
- ``dclr``: DCLR (Zhou et al., ACL 2022), :mod:`.dclr`.
"""

from __future__ import annotations

METHODS = ("simcse", "sgbert", "tacl", "vascl", "dclr")
LABELS = {"simcse": "SimCSE", "sgbert": "SG-BERT", "tacl": "TaCL", "vascl": "VaSCL", "dclr": "DCLR"}

#: The pooler ``--pooler auto`` means for a method whose paper fixes one (SG-BERT trains
#: the [CLS] vector; VaSCL mean-pools); the others take the model's own, as SimCSE does.
DEFAULT_POOLER = {"sgbert": "cls_before_pooler", "vascl": "avg"}

#: Methods that bring their own training-time head (or none) instead of SimCSE's MLP.
OWN_HEAD = ("sgbert", "tacl", "vascl")


def auto_pooler(method: str, declared: str | None) -> str:
    """What ``--pooler auto`` means: the method's own pooler, else the model directory's
    declared one, else SimCSE's ``cls`` (``cls_before_pooler`` for the methods that have no
    use for SimCSE's MLP)."""
    return DEFAULT_POOLER.get(method) or declared or ("cls_before_pooler" if method in OWN_HEAD else "cls")

#: Methods with their own temperature flag (their papers' values differ from SimCSE's).
OWN_TEMPERATURE = {"sgbert": "--sgbert-temperature", "tacl": "--tacl-temperature"}

SGBERT_OBJECTIVES = ("opt", "sg")
SGBERT_POOLINGS = ("max", "mean")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_method(cfg) -> None:
    """Ranges of the method flags and the combinations a method refuses (ValueError
    naming the flags), before anything is loaded. What needs the data or the process
    group (unsupervised data, one process) is checked when the method is built."""
    method = cfg.method
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    positive = {"--sgbert-temperature": cfg.sgbert_temperature, "--tacl-temperature": cfg.tacl_temperature,
                "--vascl-radius": cfg.vascl_radius, "--vascl-head-lr-scale": cfg.vascl_head_lr_scale,
                "--dclr-noise-times": cfg.dclr_noise_times, "--dclr-noise-step-size": cfg.dclr_noise_step_size}
    for flag, value in positive.items():
        if not _number(value) or not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"{flag} must be a finite number > 0, got {value!r}")
    for flag, value in {"--sgbert-lambda": cfg.sgbert_lambda, "--tacl-mlm-weight": cfg.tacl_mlm_weight}.items():
        if not _number(value) or not 0 <= value < float("inf"):
            raise ValueError(f"{flag} must be a finite number >= 0, got {value!r}")
    if not _number(cfg.dclr_threshold) or not -1.0 <= cfg.dclr_threshold <= 1.0:
        raise ValueError(f"--dclr-threshold is a cosine similarity, in [-1, 1]; got {cfg.dclr_threshold!r}")
    if not _number(cfg.tacl_mask_probability) or not 0 < cfg.tacl_mask_probability < 1:
        raise ValueError(f"--tacl-mask-probability must be in (0, 1), got {cfg.tacl_mask_probability!r}")
    for flag, value, low in (("--sgbert-projection-dim", cfg.sgbert_projection_dim, 1),
                             ("--vascl-neighbours", cfg.vascl_neighbours, 1),
                             ("--vascl-feature-dim", cfg.vascl_feature_dim, 1),
                             ("--dclr-noise-steps", cfg.dclr_noise_steps, 0),
                             ("--dclr-block-rows", cfg.dclr_block_rows, 1)):
        if not _int(value) or value < low:
            raise ValueError(f"{flag} must be an int >= {low}, got {value!r}")
    if cfg.sgbert_objective not in SGBERT_OBJECTIVES:
        raise ValueError(f"--sgbert-objective must be one of {', '.join(SGBERT_OBJECTIVES)}, got "
                         f"{cfg.sgbert_objective!r}")
    if cfg.sgbert_pooling not in SGBERT_POOLINGS:
        raise ValueError(f"--sgbert-pooling must be one of {', '.join(SGBERT_POOLINGS)}, got {cfg.sgbert_pooling!r}")
    if method == "simcse":
        if cfg.dclr_model is not None:
            raise ValueError("--dclr-model is DCLR's complementary model: it needs --method dclr")
        return

    name = f"--method {method}"
    refused = [
        (cfg.moco_queue, "--moco-queue (MoCo's key encoder replaces the trained encoder's positives)"),
        (cfg.child_tuning, "--child-tuning"),
        (cfg.chunk_size, "--chunk-size (gradient caching replays SimCSE's step; the methods' frozen models, "
                         "perturbations and noise are not replayed)"),
        (cfg.gaussian_negatives, "--gaussian-negatives (GS-InfoNCE's negatives belong to SimCSE's loss"
                                 + ("; DCLR draws its own noise negatives: --dclr-noise-times" if method == "dclr"
                                    else "") + ")"),
        (cfg.do_mlm, "--do-mlm" + (" (TaCL's masked-LM term is always on: --tacl-mlm-weight)" if method == "tacl"
                                   else "")),
        (cfg.hard_negative_weight != 1.0, "--hard-negative-weight (the methods train on unlabeled sentences)"),
    ]
    for value, what in refused:
        if value:
            raise ValueError(f"{name} does not combine with {what}")
    if method in OWN_HEAD:
        if cfg.mlp not in ("auto", "none"):
            raise ValueError(f"{name} does not combine with --mlp {cfg.mlp}: SimCSE's MLP head is not part of "
                             f"{LABELS[method]}" + (" (it trains its own head, dropped at the end)"
                                                    if method != "tacl" else ""))
        if cfg.pooler == "cls":
            raise ValueError(f"{name} does not combine with --pooler cls, which means SimCSE's MLP over [CLS]; "
                             "use --pooler cls_before_pooler for the [CLS] vector")
    if method == "dclr" and not cfg.dclr_model:
        raise ValueError("--method dclr needs --dclr-model DIR: the complementary model (a frozen SimCSE-trained "
                         "encoder, e.g. the output of python -m fastcl.train) whose similarities weight the negatives")
    if method != "dclr" and cfg.dclr_model is not None:
        raise ValueError("--dclr-model is DCLR's complementary model: it needs --method dclr")
    if method == "sgbert" and cfg.batch_size < 2:
        raise ValueError("--method sgbert needs --batch-size >= 2 (the other sentences are the negatives)")
    if method == "vascl" and cfg.vascl_neighbours >= cfg.batch_size:
        raise ValueError(f"--vascl-neighbours {cfg.vascl_neighbours} must be smaller than --batch-size "
                         f"{cfg.batch_size} (each instance's neighbours are other instances of its batch)")
