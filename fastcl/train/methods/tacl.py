"""TaCL: Su, Liu, Meng, Shu, Su, Collier, "TaCL: Improving BERT Pre-training with
Token-aware Contrastive Learning", Findings of NAACL 2022.

A frozen teacher (the start model, without dropout) encodes each sentence; the student
(the model being trained) encodes it with some tokens masked. Each masked token's
student vector is pulled toward the teacher's vector of the same token and pushed from
the teacher's vectors of the other real tokens of the same sentence (cosine over tau =
0.01)::

    L_tacl = mean over masked tokens (b, t) of
             -log e^{s(x_bt, y_bt)} / sum_{t' real in b} e^{s(x_bt, y_bt')}

plus the masked-LM loss of the student (mean over masked tokens, weight 1; TaCL also
has BERT's next-sentence term, which single sentences do not have). Masking is TaCL's:
round(15% of a sentence's tokens), at least one, drawn among its non-special tokens;
80% become [MASK], 10% a random token, 10% stay.

The contrastive term is :func:`fastcl.token_info_nce` (groups = sentences: no token ever
meets another sentence's tokens, no batch-wide matrix); every real token's row is
computed and the masked ones are averaged. The MLM head is SimCSE's (tied to the word
embeddings), trained and dropped at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...sentence_model import MLMHead
from ...token_level import token_info_nce
from .common import Method, backbone_outputs, frozen_copy, logged


def tacl_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer, probability: float,
              max_predictions: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """TaCL's masking of (B, L) ids: per sentence, ``min(max_predictions, max(1,
    round(probability * length)))`` positions among the non-special real tokens (all of
    them if fewer); 80% [MASK], 10% unchanged, 10% a random token. Returns (masked ids,
    bool positions)."""
    if tokenizer.mask_token_id is None:
        raise ValueError("--method tacl needs a tokenizer with a mask token")
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in tokenizer.all_special_ids:
        special |= input_ids == token_id
    candidates = attention_mask.bool() & ~special
    lengths = attention_mask.sum(1)
    counts = torch.clamp(torch.round(probability * lengths.double()), min=1).long().clamp(max=max_predictions)
    # a random order of each row's candidates: candidates first, by a random key
    keys = torch.rand(input_ids.shape, generator=generator)
    keys = torch.where(candidates, keys, torch.full_like(keys, 2.0))
    rank = keys.argsort(1).argsort(1)
    positions = candidates & (rank < counts[:, None])
    masked = input_ids.clone()
    draw = torch.rand(input_ids.shape, generator=generator)
    keep_or_random = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(len(tokenizer), input_ids.shape, generator=generator)
    to_mask = positions & (draw < 0.8)
    to_random = positions & ~to_mask & (keep_or_random >= 0.5)
    masked[to_mask] = tokenizer.mask_token_id
    masked[to_random] = random_ids[to_random]
    return masked, positions


def tacl_loss(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
              temperature: float, backend: str = "auto") -> torch.Tensor:
    """TaCL's token contrast: mean over ``positions`` (masked tokens) of the InfoNCE of the
    student's token against the teacher's tokens of its own sentence (real tokens only)."""
    per_token = token_info_nce(student, teacher.detach(), attention_mask, temperature=temperature,
                               reduction="none", backend=backend)
    selected = positions[attention_mask.bool()]
    return per_token[selected].mean()


class TaCL(Method):
    SUMMARY = "TaCL (tau {c.tacl_temperature}, MLM weight {c.tacl_mlm_weight}, masking {c.tacl_mask_probability})"

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        backbone = self.encoder.backbone
        self.teacher = frozen_copy(backbone)
        if self.encoder.mlm_head is None:
            eps = getattr(backbone.config, "layer_norm_eps", 1e-12)
            self.encoder.mlm_head = self.on_backbone(MLMHead(backbone.config.hidden_size,
                                                             backbone.get_input_embeddings(), eps))
        if self.tokenizer.mask_token_id is None:
            raise ValueError("--method tacl needs a tokenizer with a mask token")

    def prepare(self, batch, generator):
        ids, mask = batch["input_ids"][:, 0], batch["attention_mask"][:, 0]
        masked, positions = tacl_mask(ids, mask, self.tokenizer, self.cfg.tacl_mask_probability,
                                      max(1, int(self.cfg.max_length * 0.25)), generator)
        batch["tacl_input_ids"], batch["tacl_positions"] = masked, positions
        return batch

    def compute_gradients(self, model, batch, *, autocast, scaler, device) -> dict[str, float]:
        cfg = self.cfg
        mask = batch["attention_mask"][:, 0]
        width = max(int(mask.sum(-1).max()), 1)
        inputs = {"attention_mask": mask[:, :width].to(device)}
        if "token_type_ids" in batch:
            inputs["token_type_ids"] = batch["token_type_ids"][:, 0, :width].to(device)
        original = batch["input_ids"][:, 0, :width].to(device)
        masked = batch["tacl_input_ids"][:, :width].to(device)
        positions = batch["tacl_positions"][:, :width].to(device)
        with autocast():
            student = backbone_outputs(self.encoder.backbone, {**inputs, "input_ids": masked}).last_hidden_state
            with torch.no_grad():
                teacher = backbone_outputs(self.teacher, {**inputs, "input_ids": original}).last_hidden_state
            logits = self.encoder.mlm_head(student[positions])
        if not bool(positions.any()):
            raise ValueError("TaCL: a batch with no token to mask (every sentence empty)")
        wide = torch.promote_types(logits.dtype, torch.float32)
        mlm = F.cross_entropy(logits.to(wide), original[positions])
        contrast = tacl_loss(student, teacher, inputs["attention_mask"], positions, cfg.tacl_temperature,
                             self.backend)
        self.backward(contrast + cfg.tacl_mlm_weight * mlm, scaler)
        return logged(loss=contrast, mlm_loss=mlm)
