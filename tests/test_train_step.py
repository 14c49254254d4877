"""The training step: poolers, the MLP rules, and gradient caching, whose parameter
gradients must equal those of the plain full-batch step (tiny BERT, float64, dropout on)."""

import pytest
import torch

from fastcl.train import step as step_module
from fastcl.train.data import mask_tokens, tokenize_rows
from fastcl.sentence_model import SentenceEncoder, pool, resolve_mlp
from fastcl.train.step import LossConfig, _flat, compute_gradients, contrastive_loss

from .train_support import tiny_bert, tokenizer

SENTENCES = ["a man is playing a guitar .", "the cat sleeps", "two dogs run in a wide green park today",
             "stocks fell sharply on monday", "a chef cooks", "kids play soccer outside in the rain",
             "the train was late again", "she reads a book", "rain is expected tomorrow in the north",
             "he plays the flute"]


def encoder(dropout=0.1, pooler="avg", mlp="none", do_mlm=False, seed=0):
    mlp_train, mlp_eval = resolve_mlp(mlp, pooler)
    torch.manual_seed(seed)
    return SentenceEncoder(tiny_bert(dropout, seed, torch.float64), pooler, mlp_train, mlp_eval, do_mlm).double()


def batch_of(rows, mlm=False):
    views = 2 if len(rows[0]) == 1 else len(rows[0])
    batch = tokenize_rows(rows, tokenizer(), 16, views)
    if mlm:
        batch["mlm_input_ids"], batch["mlm_labels"] = mask_tokens(
            batch["input_ids"], batch["attention_mask"], tokenizer(), 0.3, torch.Generator().manual_seed(1))
    return batch


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b, rtol=1e-9, atol=1e-12):
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def full_batch_step(model, batch, cfg, chunk, seed, generator=None):
    """The plain step: one autograd graph over the whole batch. Its encoder runs over the
    same row chunks in the same order as the cached step's first pass, so dropout draws
    the same masks from the same generator; then the loss of the whole batch, backward."""
    torch.manual_seed(seed)
    n, views = batch["input_ids"].shape[:2]
    embs = [model(**_flat(batch, slice(i, min(i + chunk, n)), "cpu"))[0].view(-1, views, model.backbone.config.hidden_size)
            for i in range(0, n, chunk)]
    loss = contrastive_loss(torch.cat(embs), cfg, generator, False)
    loss.backward()
    return float(loss.detach())


def test_poolers_match_their_definitions():
    model = encoder(dropout=0.0).eval()
    batch = _flat(batch_of([(s,) for s in SENTENCES[:4]]), slice(None), "cpu")
    out = model.backbone(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].unsqueeze(-1).double()
    mean = lambda h: (h * mask).sum(1) / mask.sum(1)  # noqa: E731
    hs = out.hidden_states
    expected = {"cls": out.last_hidden_state[:, 0], "cls_before_pooler": out.last_hidden_state[:, 0],
                "avg": mean(out.last_hidden_state), "avg_top2": mean((hs[-1] + hs[-2]) / 2),
                "avg_first_last": mean((hs[1] + hs[-1]) / 2)}  # SimCSE: hs[1], the first layer, not embeddings
    for name, want in expected.items():
        torch.testing.assert_close(pool(name, out.last_hidden_state, hs, batch["attention_mask"]), want)
    # padding does not change a sentence's vector
    alone = _flat(batch_of([(SENTENCES[1],)]), slice(None), "cpu")
    torch.testing.assert_close(model(**alone)[0][0], model(**batch)[0][2])
    with pytest.raises(ValueError, match="unknown pooler 'max'"):
        pool("max", out.last_hidden_state, hs, batch["attention_mask"])


def test_mlp_rules():
    assert resolve_mlp("auto", "cls") == (True, True)  # SimCSE: MLP with cls, used at evaluation too
    assert resolve_mlp("auto", "avg") == (False, False)
    assert resolve_mlp("train-only", "cls") == (True, False)  # --mlp-only-train
    model = SentenceEncoder(tiny_bert(0.0, 0, torch.float64), "cls", True, False).double()
    inputs = _flat(batch_of([(s,) for s in SENTENCES[:3]]), slice(None), "cpu")
    cls = model.backbone(**inputs).last_hidden_state[:, 0]
    torch.testing.assert_close(model.train()(**inputs)[0], torch.tanh(model.mlp.dense(cls)))
    torch.testing.assert_close(model.eval()(**inputs)[0], cls)


@pytest.mark.parametrize("rows, chunk, options", [
    ([(s,) for s in SENTENCES[:8]], 3, {}),
    ([(SENTENCES[i], SENTENCES[i + 1], SENTENCES[(i + 5) % 10]) for i in range(6)], 4,
     dict(hard_negative_weight=2.0, gaussian_negatives=5, temperature=0.1)),
], ids=["unsup-8-chunk3", "sup-hard-gauss-6-chunk4"])
def test_gradient_caching_equals_full_batch_with_dropout(rows, chunk, options):
    cfg = LossConfig(**options)
    batch = batch_of(rows)
    cached_model, plain_model = encoder(pooler="cls", mlp="auto"), encoder(pooler="cls", mlp="auto")
    plain_loss = full_batch_step(plain_model, batch, cfg, chunk, seed=5,
                                 generator=torch.Generator().manual_seed(9))
    torch.manual_seed(5)
    out = compute_gradients(cached_model, batch, cfg, chunk_size=chunk, generator=torch.Generator().manual_seed(9))
    assert out["loss"] == pytest.approx(plain_loss, rel=1e-12)
    assert_same_grads(grads(cached_model), grads(plain_model))


def test_dropout_masks_matter_and_a_lost_mask_is_caught(monkeypatch):
    """Negative control: without restoring the RNG state the gradients differ, and the
    replay check stops the step."""
    cfg, batch = LossConfig(), batch_of([(s,) for s in SENTENCES[:8]])
    plain = encoder()
    full_batch_step(plain, batch, cfg, 3, seed=5)
    monkeypatch.setattr(step_module.RNGState, "restore", lambda self: None)
    broken = encoder()
    torch.manual_seed(5)
    compute_gradients(broken, batch, cfg, chunk_size=3, check_replay=False)
    diff = max(float((grads(broken)[n] - g).norm() / g.norm()) for n, g in grads(plain).items() if g.norm() > 0)
    assert diff > 1e-3
    torch.manual_seed(5)
    with pytest.raises(RuntimeError, match="dropout masks were not reproduced"):
        compute_gradients(encoder(), batch, cfg, chunk_size=3)


def test_gradient_caching_with_mlm_equals_one_pass():
    """Dropout off: the cached step (chunks of 3) and one forward over the whole batch
    (its own padding width) give the same loss, MLM loss and gradients."""
    cfg = LossConfig(mlm_weight=0.1)
    batch = batch_of([(SENTENCES[i], SENTENCES[i + 1]) for i in range(8)], mlm=True)
    one, cached = encoder(dropout=0.0, do_mlm=True), encoder(dropout=0.0, do_mlm=True)
    a = compute_gradients(one, batch, cfg, chunk_size=0)
    b = compute_gradients(cached, batch, cfg, chunk_size=3)
    assert a["mlm_loss"] > 0 and b["mlm_loss"] == pytest.approx(a["mlm_loss"], rel=1e-10)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-10)
    assert "mlm_head.bias" in grads(one)
    assert_same_grads(grads(cached), grads(one), rtol=1e-8, atol=1e-12)


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    from fastcl.saved_model import load_backbone

    tiny_bert(dtype=torch.float16).save_pretrained(tmp_path)
    tokenizer().save_pretrained(tmp_path)
    backbone, _ = load_backbone(str(tmp_path))
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}
