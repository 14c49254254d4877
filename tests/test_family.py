"""The loss family beyond SimCSE's shape: K hard negatives per anchor, directions and
partition modes, the hardness penalty and the false-negative margin.

The dense reference is held to sentence-transformers' own MultipleNegativesRankingLoss in
float64 (loss and gradients); every other backend is held to the reference.
"""

from __future__ import annotations

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as STLoss
from sentence_transformers.util import cos_sim, dot_score

from fastcl.reference import info_nce_reference

Q2D, Q2Q, D2Q, D2D = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
DIRECTION_SETS = [(Q2D,), (Q2D, D2Q), (Q2D, Q2Q), (Q2D, D2D), (Q2D, Q2Q, D2Q), (Q2D, Q2Q, D2Q, D2D)]
SAME_TOWER = {Q2Q, D2D}
#: Every direction set with every partition mode sentence-transformers accepts for it.
PARTITIONS = [(d, m) for d in DIRECTION_SETS for m in ("joint", "per_direction")
              if m == "joint" or not set(d) & SAME_TOWER]
HARDNESS = [None, "in_batch_negatives", "hard_negatives", "all_negatives"]


def _name(directions, mode) -> str:
    return "+".join(x.replace("_to_", "2") for x in directions) + "-" + mode


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("similarity", ["cos_sim", "dot_score"])
@pytest.mark.parametrize("directions,partition_mode", PARTITIONS, ids=[_name(d, m) for d, m in PARTITIONS])
def test_reference_equals_sentence_transformers(k, similarity, directions, partition_mode):
    n, d, scale = 6, 5, 7.0
    fct = cos_sim if similarity == "cos_sim" else dot_score
    for seed, mode in enumerate(HARDNESS):
        size = 1.0 if similarity == "cos_sim" else 0.4  # dot products of a moderate size
        q, p, h = _rand(n, d, seed=seed, scale=size), _rand(n, d, seed=seed + 10, scale=size), \
            _rand(n, k, d, seed=seed + 20, scale=size)
        strength = 3.0 if mode else 0.0
        st = STLoss(None, scale=scale, similarity_fct=fct, directions=directions, partition_mode=partition_mode,
                    hardness_mode=mode, hardness_strength=strength)
        columns = [q.clone().requires_grad_(), p.clone().requires_grad_()]
        columns += [h[:, j].clone().requires_grad_() for j in range(k)]
        expected = st.compute_loss_from_embeddings(columns, None)
        expected_grads = _grads(expected, columns)
        ours_in = [x.clone().requires_grad_() for x in (q, p, h)]
        got = info_nce_reference(*ours_in, temperature=1 / scale, normalize=fct is cos_sim, directions=directions,
                                 partition_mode=partition_mode, hardness_mode=mode, hardness_strength=strength)
        got_grads = _grads(got, ours_in)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-13)
        torch.testing.assert_close(got_grads[0], expected_grads[0], rtol=0, atol=1e-13)
        torch.testing.assert_close(got_grads[1], expected_grads[1], rtol=0, atol=1e-13)
        torch.testing.assert_close(got_grads[2], torch.stack(expected_grads[2:], dim=1), rtol=0, atol=1e-13)


def test_per_direction_with_same_tower_refused_by_sentence_transformers():
    # The refusal fastcl mirrors: the same-tower directions never hold the positive.
    with pytest.raises(ValueError, match="per_direction"):
        STLoss(None, directions=(Q2D, Q2Q), partition_mode="per_direction")
