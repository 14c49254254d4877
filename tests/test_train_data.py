"""Training files, batches and masking: formats, blank lines, errors that name file and line."""

import pytest
import torch

from fastcl.train.data import (
    BatchPlan, DataError, drop_duplicates, local_slice, mask_tokens, read_training_file, tokenize_rows,
)

from .train_support import NLI, WIKI, tokenizer


def test_real_files():
    wiki = read_training_file(WIKI)
    assert wiki.kind == "unsupervised" and wiki.views == 2 and len(wiki) > 11000
    assert all(len(r) == 1 and r[0] == r[0].strip() and r[0] for r in wiki.rows)
    nli = read_training_file(NLI)
    assert nli.kind == "triplets" and nli.views == 3 and len(nli) == 5864
    assert nli.rows[0][0].startswith("Two women are embracing")


def test_blank_lines_skipped(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("first sentence\n\n   \nsecond sentence\n\n")
    assert read_training_file(f).rows == [("first sentence",), ("second sentence",)]
    c = tmp_path / "p.csv"
    c.write_text("sent0,sent1\n\na,b\n,\n\"c, with comma\",d\n")
    data = read_training_file(c)
    assert data.kind == "pairs" and data.rows == [("a", "b"), ("c, with comma", "d")]


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, r"missing\.txt: no such file"),
    ("empty.txt", "\n  \n", r"empty\.txt: empty"),
    ("empty.csv", "", r"empty\.csv: empty"),
    ("header.csv", "sent0,sent1\n", r"header\.csv: has a header but no rows"),
    ("badheader.csv", "anchor,positive\nx,y\n", r"badheader\.csv:1: header 'anchor,positive' is not one of"),
    ("cols.csv", "sent0,sent1,hard_neg\na,b,c\n\nd,e\n", r"cols\.csv:4: expected 3 columns \(sent0,sent1,hard_neg\), got 2"),
    ("many.csv", "sent0,sent1\na,b\nc,d,e\n", r"many\.csv:3: expected 2 columns .* got 3"),
    ("emptyfield.csv", "sent0,sent1\na,\n", r"emptyfield\.csv:2: column sent1 is empty"),
])
def test_errors_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_training_file(path)


def test_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt:1: not valid UTF-8 at byte 3 \(invalid continuation"):
        read_training_file(path)


@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_invalid_utf8_far_into_the_file_names_its_line_and_byte(tmp_path, suffix):
    """Files are decoded in blocks of 8 KB: the offset must count from the file's start."""
    rows = [f"sentence number {i} \u00e9t\u00e9,its pair {i}" for i in range(3000)]
    head = ("sent0,sent1\n" if suffix == ".csv" else "") + "\n".join(rows[:1234]) + "\n"
    data = head.encode() + b"caf\xe9 au lait,x\n" + ("\n".join(rows[1234:]) + "\n").encode()
    path = tmp_path / f"big{suffix}"
    path.write_bytes(data)
    offset = len(head.encode()) + 3
    assert offset > 40000 and data[offset] == 0xE9
    line = head.count("\n") + 1
    with pytest.raises(DataError, match=rf"big\{suffix}:{line}: not valid UTF-8 at byte {offset} "):
        read_training_file(path)


def test_batch_plan():
    with pytest.raises(DataError, match=r"batch size 11 is larger than the 10 rows of f\.txt"):
        BatchPlan(10, 11, 0, "f.txt")
    plan = BatchPlan(10, 3, seed=7)
    assert plan.steps_per_epoch == 3  # the incomplete last batch is dropped
    epoch0 = [plan.batch(0, i) for i in range(3)]
    assert len({i for b in epoch0 for i in b}) == 9
    assert BatchPlan(10, 3, seed=7).batch(0, 1) == epoch0[1]  # (epoch, index) decides: what resume needs
    assert plan.batch(1, 0) != epoch0[0] or plan.batch(1, 1) != epoch0[1]
    with pytest.raises(IndexError):
        plan.batch(0, 3)


def test_drop_duplicates_and_slices():
    rows = [("a", "b"), ("c", "d"), ("b", "e"), ("f", "a"), ("g", "h"), ("g", "i")]
    assert drop_duplicates(rows) == [("a", "b"), ("c", "d"), ("g", "h")]
    assert drop_duplicates([("x",), ("y",), ("x",)]) == [("x",), ("y",)]
    parts = [local_slice(10, r, 3) for r in range(3)]
    assert [(s.start, s.stop) for s in parts] == [(0, 4), (4, 7), (7, 10)]


def test_tokenize_views_and_mlm_masking():
    tok = tokenizer()
    rows = [("a short one",), ("a somewhat longer sentence than the first",)]
    batch = tokenize_rows(rows, tok, max_length=8, views=2)
    assert batch["input_ids"].shape[:2] == (2, 2) and batch["input_ids"].shape[2] <= 8
    assert torch.equal(batch["input_ids"][:, 0], batch["input_ids"][:, 1])  # the same sentence twice
    ids = tokenize_rows([(" ".join(["word"] * 200),)] * 50, tok, 64, 2)
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids["input_ids"], ids["attention_mask"], tok, 0.15, g)
    selected = labels != -100
    special = (ids["input_ids"] == tok.cls_token_id) | (ids["input_ids"] == tok.sep_token_id)
    assert not (selected & special).any() and torch.equal(masked[special], ids["input_ids"][special])
    share = selected.float().sum() / (~special).float().sum()
    assert 0.12 < share < 0.18
    became_mask = (masked == tok.mask_token_id) & selected
    assert 0.75 < became_mask.sum() / selected.sum() < 0.85
    assert torch.equal(labels[selected], ids["input_ids"][selected])
