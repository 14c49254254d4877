"""The sentence encoder: a HuggingFace encoder, a pooler, an optional MLP head, an
optional MLM head. The trainer trains it; :func:`fastcl.encode` runs it. How a directory
holding one is written and read is :mod:`fastcl.saved_model`.

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

import torch
import torch.nn.functional as F
from torch import nn

POOLERS = ("cls", "cls_before_pooler", "avg", "avg_top2", "avg_first_last")
MLP_MODES = ("auto", "none", "always", "train-only")


def check_pooler(pooler: str) -> str:
    if pooler not in POOLERS:
        raise ValueError(f"unknown pooler {pooler!r}; choose one of {', '.join(POOLERS)}")
    return pooler


def check_device(device: str | torch.device, flag: str = "device") -> torch.device:
    """``device`` as a torch.device, refused (ValueError naming ``flag``) when it is not a
    device name or names a GPU this machine does not have."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{flag} {device!r} is not a device ({e})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag} {device}: no CUDA device is available here; use cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{flag} {device}: there are {count} CUDA devices (0 to {count - 1})")
    return dev


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
