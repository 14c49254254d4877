"""STS data in SentEval's layout: finding the tasks under a data directory and reading
their files (see :mod:`fastcl.evaluate` for the layout). Every error names the file and,
where it applies, the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: SentEval's subsets of each year (STS13 without SMT, which SentEval cannot ship).
STS_SUBSETS = {
    "STS12": ["MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"],
    "STS13": ["FNWN", "headlines", "OnWN"],
    "STS14": ["deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"],
    "STS15": ["answers-forums", "answers-students", "belief", "headlines", "images"],
    "STS16": ["answer-answer", "headlines", "plagiarism", "postediting", "question-question"],
}
TASKS = ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness"]


class DataFormatError(ValueError):
    """A data file that is not in the expected format; the message names file and line."""


class IncompleteTask(DataFormatError):
    """A task with one of the files it needs missing: the task is listed as incomplete
    and the other tasks are evaluated."""


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
    inputs = {p.name[len("STS.input."):-len(".txt")] for p in directory.glob("STS.input.*.txt")}
    golds = {p.name[len("STS.gs."):-len(".txt")] for p in directory.glob("STS.gs.*.txt")}
    unpaired = sorted(inputs ^ golds)
    if unpaired:  # "all" over fewer subsets would be another number than the task's
        what = [f"STS.gs.{n}.txt" if n in inputs else f"STS.input.{n}.txt" for n in unpaired]
        raise IncompleteTask(f"{directory}: {', '.join(what)} missing")
    names = sorted(inputs)
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
            names, probe = [f"{task}-en-test"], "STS.*.txt"
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
