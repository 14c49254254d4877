"""Training data: reading the files SimCSE trains on, batching, tokenizing, MLM masking.

Formats (SimCSE's):

- unsupervised: a text file, one sentence per line (``wiki1m_for_simcse.txt``). Each
  sentence is encoded twice; dropout makes the two views differ.
- supervised: a CSV with a header ``sent0,sent1`` or ``sent0,sent1,hard_neg``
  (``nli_for_simcse.csv``): anchor, positive, optional hard negative. A CSV with the
  single column ``sent0`` is read as unsupervised.

Blank lines are skipped. Anything else that is wrong is a :class:`DataError` naming the
file and line.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import torch

CSV_HEADERS = {("sent0",): "unsupervised", ("sent0", "sent1"): "pairs", ("sent0", "sent1", "hard_neg"): "triplets"}


class DataError(ValueError):
    """A training file that cannot be used; the message names the file and, where it
    applies, the line."""


@dataclass
class TrainingData:
    """Rows of a training file: 1-tuples (unsupervised), pairs or triplets."""

    path: Path
    kind: str  # "unsupervised" | "pairs" | "triplets"
    rows: list[tuple[str, ...]]

    @property
    def views(self) -> int:
        """Sentences encoded per row: 2 for unsupervised (the same sentence twice)."""
        return 2 if self.kind == "unsupervised" else len(self.rows[0])

    def sentences_per_row(self) -> int:
        """Distinct sentences a row holds (what "sentences/s" counts)."""
        return len(self.rows[0])

    def __len__(self) -> int:
        return len(self.rows)


def _open_text(path: Path):
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    return open(path, encoding="utf-8-sig", newline="")


def _utf8_error(path: Path, e: UnicodeDecodeError) -> DataError:
    """The decoder reads in blocks, so ``e.start`` counts from the block: find the byte
    again in the whole file, with its line."""
    from ..sts_data import utf8_error

    return DataError(utf8_error(path) or f"{path}: not valid UTF-8 ({e.reason})")


def read_sentences(path: str | Path) -> TrainingData:
    """One sentence per line; blank lines skipped."""
    path = Path(path)
    rows = []
    try:
        with _open_text(path) as f:
            for line in f:
                text = line.strip()
                if text:
                    rows.append((text,))
    except UnicodeDecodeError as e:
        raise _utf8_error(path, e) from None
    if not rows:
        raise DataError(f"{path}: empty (no non-blank line)")
    return TrainingData(path, "unsupervised", rows)


def read_csv(path: str | Path) -> TrainingData:
    """A CSV with header sent0[,sent1[,hard_neg]]; every row has exactly that many fields."""
    path = Path(path)
    rows, header = [], None
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            last = 0
            for record in reader:
                start, last = last + 1, reader.line_num
                if not record or all(not field.strip() for field in record):
                    continue  # blank line
                if header is None:
                    header = tuple(h.strip() for h in record)
                    if header not in CSV_HEADERS:
                        raise DataError(
                            f"{path}:{start}: header {','.join(header)!r} is not one of "
                            + ", ".join(repr(",".join(h)) for h in CSV_HEADERS))
                    continue
                if len(record) != len(header):
                    raise DataError(f"{path}:{start}: expected {len(header)} columns ({','.join(header)}), "
                                    f"got {len(record)}")
                fields = tuple(field.strip() for field in record)
                for name, value in zip(header, fields):
                    if not value:
                        raise DataError(f"{path}:{start}: column {name} is empty")
                rows.append(fields)
    except UnicodeDecodeError as e:
        raise _utf8_error(path, e) from None
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    if header is None:
        raise DataError(f"{path}: empty (no header line)")
    if not rows:
        raise DataError(f"{path}: has a header but no rows")
    return TrainingData(path, CSV_HEADERS[header], rows)


def read_training_file(path: str | Path) -> TrainingData:
    """``.csv`` files by their header; anything else as one sentence per line."""
    path = Path(path)
    return read_csv(path) if path.suffix.lower() == ".csv" else read_sentences(path)


# ------------------------------------------------------------------ batches


class BatchPlan:
    """Which rows form each batch: a fresh permutation per epoch, drawn from ``seed +
    epoch`` so that (epoch, index) alone says where a run is (what ``--resume`` needs),
    and every rank draws the same global batches. The last incomplete batch of an epoch
    is dropped, so every step sees a full batch."""

    def __init__(self, n_rows: int, batch_size: int, seed: int, path: Path | str = "training file") -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if batch_size > n_rows:
            raise DataError(f"batch size {batch_size} is larger than the {n_rows} rows of {path}")
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self.steps_per_epoch = n_rows // batch_size
        self._epoch, self._perm = None, None

    def batch(self, epoch: int, index: int) -> list[int]:
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"batch {index} out of range (an epoch has {self.steps_per_epoch})")
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._epoch = torch.randperm(self.n_rows, generator=g).tolist(), epoch
        return self._perm[index * self.batch_size:(index + 1) * self.batch_size]


def drop_duplicates(rows: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Drop every row that shares a sentence with an earlier row of the batch.

    A sentence that appears twice in a batch is a negative of its own copy's anchor: a
    false negative (DESIGN.md section 5). Rows are kept in order, the first one wins.
    """
    seen, kept = set(), []
    for row in rows:
        if any(s in seen for s in row):
            continue
        seen.update(row)
        kept.append(row)
    return kept


def local_slice(n: int, rank: int, world: int) -> slice:
    """Contiguous share of ``n`` rows for ``rank`` (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def tokenize_rows(rows: list[tuple[str, ...]], tokenizer, max_length: int, views: int) -> dict[str, torch.Tensor]:
    """(B, V, L) tensors: row-major views, V = 2 for unsupervised rows (the sentence twice)."""
    texts = [s for row in rows for s in (row * 2 if len(row) == 1 else row)]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    out = {}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        if key in enc:
            out[key] = enc[key].view(len(rows), views, -1)
    return out


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, probability: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking (SimCSE's MLM inputs): ``probability`` of the real, non-special
    tokens are selected; of those 80% become [MASK], 10% a random token, 10% stay.
    Returns (masked ids, labels with -100 where nothing is predicted)."""
    if tokenizer.mask_token_id is None:
        raise ValueError("--do-mlm needs a tokenizer with a mask token")
    labels = input_ids.clone()
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in tokenizer.all_special_ids:
        special |= input_ids == token_id
    candidates = attention_mask.bool() & ~special
    selected = (torch.rand(input_ids.shape, generator=generator) < probability) & candidates
    labels[~selected] = -100
    masked = input_ids.clone()
    replace = selected & (torch.rand(input_ids.shape, generator=generator) < 0.8)
    masked[replace] = tokenizer.mask_token_id
    randomize = selected & ~replace & (torch.rand(input_ids.shape, generator=generator) < 0.5)
    random_ids = torch.randint(len(tokenizer), input_ids.shape, generator=generator)
    masked[randomize] = random_ids[randomize]
    return masked, labels
