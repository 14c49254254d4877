"""``--method sgbert | tacl | vascl | dclr``: each method's loss against a hand-written
dense version in float64 (loss and every parameter gradient, tiny BERT with dropout on),
its pieces against dense computations, exact resume after Ctrl-C, and the option
combinations it refuses."""

import contextlib
import os
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fastcl import native
from fastcl.saved_model import save_encoder
from fastcl.sentence_model import SentenceEncoder, resolve_mlp
from fastcl.train import cli, trainer as trainer_module
from fastcl.train.config import TrainConfig
from fastcl.train.data import tokenize_rows
from fastcl.train.methods import build_method
from fastcl.train.methods.dclr import ascend_noise, dclr_loss, dclr_loss_reference
from fastcl.train.methods.sgbert import others_logsumexp, pool_layers, sg_opt_loss
from fastcl.train.methods.tacl import tacl_mask
from fastcl.train.methods.vascl import nearest_neighbours, neighbourhood_info_nce

from .test_train_methods import _assert_equal
from .train_support import assert_usage_errors, tiny_bert, tokenizer, train_workspace

SENTENCES = ["a man is playing a guitar .", "the cat sleeps", "two dogs run in a wide green park today",
             "stocks fell sharply on monday", "a chef cooks", "kids play soccer outside in the rain",
             "the train was late again", "she reads a book", "rain is expected tomorrow in the north",
             "he plays the flute"]
KERNEL_BACKENDS = ["torch"] + (["native"] if native.available() else [])


def _ce(logits, target=0):
    """Cross-entropy of each row of ``logits`` against column ``target``."""
    return torch.logsumexp(logits, -1) - logits[..., target]


def _unit(x):
    return F.normalize(x, dim=-1)


# ------------------------------------------------------------------ pieces


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_others_logsumexp_matches_dense(backend):
    torch.manual_seed(0)
    a = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64)
    got = others_logsumexp(a, c, 0.07, backend)
    (got * w).sum().backward()
    ga, gc = a.grad.clone(), c.grad.clone()
    a.grad = c.grad = None
    logits = _unit(a) @ _unit(c).T / 0.07
    want = logits.masked_fill(torch.eye(9, dtype=torch.bool), float("-inf")).logsumexp(1)
    (want * w).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, a.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gc, c.grad, rtol=1e-10, atol=1e-12)


def _sg_opt_dense(c, h, tau):
    """SG-OPT by its definition: for (i, k), the positive h_ik against every layer of every
    other sentence, one term at a time."""
    b, k, _ = h.shape
    s = torch.einsum("id,mkd->imk", _unit(c), _unit(h)) / tau
    terms = []
    for i in range(b):
        others = torch.cat([s[i, m] for m in range(b) if m != i])
        for n in range(k):
            terms.append(_ce(torch.cat([s[i, i, n:n + 1], others])))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_sg_opt_loss_matches_its_definition(backend):
    torch.manual_seed(1)
    c = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    h = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True)
    got = sg_opt_loss(c, h, 0.05, backend)
    got.backward()
    gc, gh = c.grad.clone(), h.grad.clone()
    c.grad = h.grad = None
    want = _sg_opt_dense(c, h, 0.05)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gc, c.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gh, h.grad, rtol=1e-9, atol=1e-12)


def test_pool_layers_max_and_mean_ignore_padding():
    h = torch.randn(2, 3, 4, dtype=torch.float64)
    h[1, 2] = 1e6  # padding of row 1: must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = pool_layers([h, 2 * h], mask, "max")
    assert got.shape == (2, 2, 4)
    torch.testing.assert_close(got[1, 0], h[1, :2].amax(0))
    torch.testing.assert_close(pool_layers([h], mask, "mean")[1, 0], h[1, :2].mean(0))


def test_nearest_neighbours_blockwise_equal_dense():
    torch.manual_seed(2)
    x = torch.randn(11, 5, dtype=torch.float64)
    dense = (x @ x.T).fill_diagonal_(float("-inf")).topk(4, dim=1).indices
    for block in (1, 3, 11, 64):
        got = nearest_neighbours(x, 4, block_rows=block)
        assert torch.equal(got.sort(1).values, dense.sort(1).values)


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_neighbourhood_info_nce_matches_dense(backend):
    torch.manual_seed(3)
    a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    p = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    n = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    got = neighbourhood_info_nce(a, p, n, 0.1, backend)
    got.backward()
    grads = [t.grad.clone() for t in (a, p, n)]
    for t in (a, p, n):
        t.grad = None
    logits = torch.cat([(_unit(a) * _unit(p)).sum(-1, keepdim=True), torch.einsum("id,ikd->ik", _unit(a), _unit(n))],
                       1) / 0.1
    want = _ce(logits).mean()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, t in zip(grads, (a, p, n)):
        torch.testing.assert_close(g, t.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["dense", "chunked", pytest.param("cpp", marks=pytest.mark.skipif(
    not native.available(), reason="the native extension is not built"))])
@pytest.mark.parametrize("with_noise", [True, False])
def test_dclr_loss_matches_dense(with_noise, backend):
    torch.manual_seed(4)
    n, m = 10, 7
    a = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    c = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(m, 6, dtype=torch.float64) if with_noise else None
    g = torch.randn(n, 3, dtype=torch.float64)
    g[3] = g[7]  # a certain false negative both ways
    got = dclr_loss(a, c, noise, g, g, 0.3, 0.05, backend=backend)
    got.backward()
    ga, gc = a.grad.clone(), c.grad.clone()
    a.grad = c.grad = None
    want = dclr_loss_reference(a, c, noise, g, g, 0.3, 0.05)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, a.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gc, c.grad, rtol=1e-9, atol=1e-12)
    # the mask does something: some pair above 0.3, and the loss differs without it
    assert float((_unit(g) @ _unit(g).T).fill_diagonal_(-1).max()) > 0.3
    assert abs(float(dclr_loss_reference(a, c, noise, g, g, 1.0, 0.05)) - float(want.detach())) > 1e-3


def test_ascend_noise_takes_normalized_ascent_steps():
    torch.manual_seed(5)
    z1, z2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    noise = torch.randn(9, 4, dtype=torch.float64)
    got = ascend_noise(z1, z2, noise, steps=3, step_size=0.1, temperature=0.05, backend="torch")
    want = noise.clone()
    for _ in range(3):
        u = want.clone().requires_grad_()
        logits = torch.cat([_unit(z1) @ _unit(z2).T, _unit(z1) @ _unit(u).T], 1) / 0.05
        loss = F.cross_entropy(logits, torch.arange(6))
        (g,) = torch.autograd.grad(loss, u)
        want = want + 0.1 * g / g.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got, noise)


def test_tacl_mask_counts_and_candidates():
    tok = tokenizer()
    batch = tokenize_rows([(s,) for s in SENTENCES], tok, 16, 2)
    ids, mask = batch["input_ids"][:, 0], batch["attention_mask"][:, 0]
    masked, positions = tacl_mask(ids, mask, tok, 0.15, 4, torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    assert not (positions & (special | ~mask.bool())).any()
    lengths = mask.sum(1)
    want = torch.clamp(torch.round(0.15 * lengths.double()), min=1).long().clamp(max=4)
    assert torch.equal(positions.sum(1), want)
    assert torch.equal(masked[~positions], ids[~positions])
    assert (masked[positions] == tok.mask_token_id).any()


# ------------------------------------------------------------------ one training step, dense


def _fake_trainer(cfg, encoder, kind="unsupervised"):
    return SimpleNamespace(cfg=cfg, encoder=encoder, device=torch.device("cpu"), tokenizer=tokenizer(),
                           distributed=False, data=SimpleNamespace(kind=kind), gauss_gen=None)


def _encoder(pooler):
    mlp_train, mlp_eval = resolve_mlp("none" if pooler != "cls" else "train-only", pooler)
    torch.manual_seed(0)
    return SentenceEncoder(tiny_bert(0.1, 0, torch.float64), pooler, mlp_train, mlp_eval).double().train()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step_both_ways(cfg, pooler, dense_loss, rows=8):
    """One step of the method and one of ``dense_loss(method, batch, generator)``, from the
    same random states; returns (method loss, dense loss, method grads, dense grads)."""
    encoder = _encoder(pooler)
    torch.manual_seed(11)
    method = build_method(_fake_trainer(cfg, encoder))
    method.generator = torch.Generator().manual_seed(7)
    batch = tokenize_rows([(s,) for s in SENTENCES[:rows]], tokenizer(), 16, 2)
    batch = method.prepare(batch, torch.Generator().manual_seed(3))
    torch.manual_seed(21)
    stats = method.compute_gradients(encoder, batch, autocast=contextlib.nullcontext, scaler=None, device="cpu")
    got = _grads(encoder)
    encoder.zero_grad(set_to_none=True)
    method.generator = torch.Generator().manual_seed(7)
    torch.manual_seed(21)
    loss = dense_loss(method, batch, torch.Generator().manual_seed(7))
    loss.backward()
    want = _grads(encoder)
    assert got.keys() == want.keys() and len(got) > 10
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-11, msg=lambda m: f"{name}: {m}")
    return stats, float(loss), encoder


def _inputs(batch, view):
    w = int(batch["attention_mask"].sum(-1).max())
    if view is None:
        return {k: batch[k][..., :w].reshape(-1, w) for k in ("input_ids", "attention_mask", "token_type_ids")}
    return {k: batch[k][:, view, :w] for k in ("input_ids", "attention_mask", "token_type_ids")}


def _cfg(method, **kw):
    return TrainConfig(train_file="x", output_dir="y", method=method, loss_backend=kw.pop("backend", "torch"), **kw)


@pytest.mark.parametrize("objective", ["opt", "sg"])
def test_sgbert_step_matches_dense(objective):
    cfg = _cfg("sgbert", sgbert_objective=objective, sgbert_projection_dim=16, batch_size=8)

    def dense(method, batch, gen):
        enc = method.encoder
        x = _inputs(batch, 0)
        cls = enc(**x)[0]
        with torch.no_grad():
            hs = method.frozen(**x, output_hidden_states=True).hidden_states
        keep = x["attention_mask"].bool()
        layers = torch.stack([h.masked_fill(~keep[..., None], -1e300).amax(1) for h in hs], 1)
        head = enc.method_head
        c = head(cls)
        if objective == "opt":
            loss = _sg_opt_dense(c, head(layers), 0.01)
        else:
            pick = torch.randint(layers.shape[1], (layers.shape[0],), generator=gen)
            z = _unit(torch.cat([c, head(layers[torch.arange(8), pick])]))
            logits = (z @ z.T / 0.01).fill_diagonal_(float("-inf"))
            loss = F.cross_entropy(logits, (torch.arange(16) + 8) % 16)
        fixed = dict(method.frozen.named_parameters())
        reg = sum(((p - fixed[n]) ** 2).sum() for n, p in enc.backbone.named_parameters() if p.requires_grad)
        return loss + 0.1 * reg

    stats, want, encoder = _step_both_ways(cfg, "cls_before_pooler", dense)
    assert stats["loss"] + 0.1 * stats["regularizer"] == pytest.approx(want, rel=1e-10)
    # the embedding layer is frozen (the paper's code), the head trains
    assert all(not p.requires_grad for p in encoder.backbone.embeddings.parameters())
    assert encoder.method_head[0].weight.grad is not None


def test_tacl_step_matches_dense():
    cfg = _cfg("tacl", batch_size=8)

    def dense(method, batch, gen):
        enc = method.encoder
        x = _inputs(batch, 0)
        w = x["input_ids"].shape[1]
        masked, positions = batch["tacl_input_ids"][:, :w], batch["tacl_positions"][:, :w]
        student = enc.backbone(input_ids=masked, attention_mask=x["attention_mask"],
                               token_type_ids=x["token_type_ids"]).last_hidden_state
        with torch.no_grad():
            teacher = method.teacher(**x).last_hidden_state
        terms = []
        for b, t in positions.nonzero().tolist():
            real = x["attention_mask"][b].bool()
            logits = _unit(teacher[b][real]) @ _unit(student[b, t]) / 0.01
            terms.append(torch.logsumexp(logits, 0) - logits[int(real[:t].sum())])
        mlm = F.cross_entropy(enc.mlm_head(student[positions]), x["input_ids"][positions])
        return torch.stack(terms).mean() + mlm

    stats, want, _ = _step_both_ways(cfg, "avg", dense)
    assert stats["loss"] + stats["mlm_loss"] == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("encoder_gradient", [False, True])
def test_vascl_step_matches_dense(encoder_gradient):
    cfg = _cfg("vascl", vascl_neighbours=3, vascl_feature_dim=8, vascl_radius=2.0, batch_size=8,
               vascl_encoder_gradient=encoder_gradient)

    def dense(method, batch, gen):
        enc, head, tau, r = method.encoder, method.encoder.method_head, 0.05, 2.0
        e = enc(**_inputs(batch, None))[0].view(8, 2, -1)
        e1, e2 = e[:, 0], e[:, 1]
        z = _unit(torch.cat([head(e1), head(e2)]))
        pair = F.cross_entropy((z @ z.T / tau).fill_diagonal_(float("-inf")), (torch.arange(16) + 8) % 16)
        nbrs = (e1 @ e1.T).detach().fill_diagonal_(float("-inf")).topk(3, dim=1).indices
        d0 = torch.rand(e1.shape, generator=gen, dtype=torch.float32).to(torch.float64) - 0.5
        d0 = (d0 / (d0.norm(dim=-1, keepdim=True) + 1e-8)).requires_grad_()
        x = e1.detach()
        with torch.no_grad():
            zc = _unit(head(x))
        u = _unit(head(x + r * d0))
        lu = torch.cat([(u * zc).sum(-1, keepdim=True), torch.einsum("id,ikd->ik", u, zc[nbrs])], 1) / tau
        (g,) = torch.autograd.grad(_ce(lu).mean(), d0)
        d = (g / (g.norm(dim=-1, keepdim=True) + 1e-8)).detach()
        base = e1 if encoder_gradient else x
        zz = _unit(head(base)) if encoder_gradient else zc
        zh = _unit(head(base + r * d))
        negs = torch.cat([zz[nbrs], zh[nbrs]], 1)
        one = torch.cat([(zz * zh).sum(-1, keepdim=True), torch.einsum("id,ikd->ik", zz, negs)], 1) / tau
        two = torch.cat([(zh * zz).sum(-1, keepdim=True), torch.einsum("id,ikd->ik", zh, negs)], 1) / tau
        return pair + (_ce(one).mean() + _ce(two).mean()) / 2

    stats, want, encoder = _step_both_ways(cfg, "avg", dense)
    assert stats["loss"] + stats["virtual_loss"] == pytest.approx(want, rel=1e-10)
    assert encoder.head_lr_scale == 100.0


@pytest.fixture(scope="module")
def complementary(tmp_path_factory):
    """A saved sentence model (tiny BERT, mean pooling) to serve as DCLR's complementary model."""
    path = tmp_path_factory.mktemp("complementary") / "model"
    torch.manual_seed(5)
    save_encoder(SentenceEncoder(tiny_bert(0.1, 5), "avg", False, False), tokenizer(), path, 16)
    return path


def test_dclr_step_matches_dense(complementary):
    cfg = _cfg("dclr", dclr_model=str(complementary), dclr_threshold=0.92, dclr_noise_times=1.5, dclr_noise_steps=2,
               dclr_noise_step_size=0.05, dclr_block_rows=3, batch_size=8)
    dropped = {}

    def dense(method, batch, gen):
        enc, tau = method.encoder, 0.05
        z = enc(**_inputs(batch, None))[0].view(8, 2, -1)
        z1, z2 = z[:, 0], z[:, 1]
        with torch.no_grad():
            g = _unit(method.complementary(**_inputs(batch, 0))[0])
        noise = torch.randn(12, z1.shape[1], generator=gen, dtype=torch.float32).to(torch.float64)
        for _ in range(2):
            u = noise.clone().requires_grad_()
            logits = torch.cat([_unit(z1.detach()) @ _unit(z2.detach()).T, _unit(z1.detach()) @ _unit(u).T], 1) / tau
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, torch.arange(8)), u)
            noise = noise + 0.05 * grad / grad.norm(dim=-1, keepdim=True)
        keep = (g @ g.T <= 0.92).double().fill_diagonal_(1.0)
        dropped["n"] = int((keep == 0).sum())
        batch_terms = (torch.exp(_unit(z1) @ _unit(z2).T / tau) * keep).sum(1)
        noise_terms = torch.exp(_unit(z1) @ _unit(noise).T / tau).sum(1)
        return -torch.log(torch.exp((_unit(z1) * _unit(z2)).sum(-1) / tau) / (batch_terms + noise_terms)).mean()

    stats, want, _ = _step_both_ways(cfg, "cls", dense)
    assert stats["loss"] == pytest.approx(want, rel=1e-10)
    assert 0 < dropped["n"] < 8 * 7  # the weights did something, not everything
    assert stats["dropped_negatives"] == pytest.approx(dropped["n"] / 8)


# ------------------------------------------------------------------ end to end: resume, errors


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, complementary):
    root = train_workspace(tmp_path_factory.mktemp("family"))
    (root / "pairs.csv").write_text("sent0,sent1\n" + "".join(f"{a},{a}\n" for a in SENTENCES), encoding="utf-8")
    return root


def _run(workspace, out, *extra):
    return cli.main(["--train-file", str(workspace / "wiki40.txt"), "--model", str(workspace / "tiny"),
                     "--output-dir", str(out), "--batch-size", "8", "--max-steps", "7", "--save-steps", "2",
                     "--learning-rate", "1e-3", "--warmup-steps", "2", "--no-eval", "--no-progress", *extra])


CASES = {
    "sgbert": ["--method", "sgbert", "--sgbert-projection-dim", "32"],
    "sgbert-sg": ["--method", "sgbert", "--sgbert-objective", "sg", "--sgbert-projection-dim", "32"],
    "tacl": ["--method", "tacl"],
    "vascl": ["--method", "vascl", "--vascl-neighbours", "3", "--vascl-radius", "2"],
    "dclr": ["--method", "dclr", "--dclr-threshold", "0.5", "--dclr-noise-steps", "2"],
}


@pytest.mark.parametrize("case", CASES)
def test_interrupt_and_resume_bit_exactly(workspace, complementary, case, monkeypatch, capsys):
    """7 steps of batch 8 over 40 rows (an epoch boundary at 5), dropout on, checkpoints
    every 2 steps; SIGINT during step 4, then --resume: the model, the method's head and
    the optimizer equal those of the uninterrupted run, bit for bit."""
    flags = CASES[case] + (["--dclr-model", str(complementary)] if case == "dclr" else [])
    straight = workspace / f"{case}-straight"
    assert _run(workspace, straight, *flags) == 0
    real = trainer_module.compute_gradients
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_gradients", interrupting)
    out = workspace / f"{case}-resumed"
    assert _run(workspace, out, *flags) == 130
    monkeypatch.setattr(trainer_module, "compute_gradients", real)
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 4
    assert _run(workspace, out, *flags, "--resume") == 0
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    initial = load_file(str(workspace / "tiny" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert sum(not torch.equal(a[n], initial[n]) for n in a) > 5
    sa = torch.load(straight / "checkpoint" / "state.pt", weights_only=False)
    sb = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    for key in ("model", "optimizer", "scheduler", "gauss_gen"):
        _assert_equal(sa[key], sb[key], key)
    heads = [k for k in sb["model"] if k.startswith("method_head.")]
    assert bool(heads) == (case in ("sgbert", "sgbert-sg", "vascl"))
    assert not any(k.startswith("method_head.") for k in b)  # the saved model has no training head
    capsys.readouterr()
    # --resume must keep the method
    assert _run(workspace, out, "--resume", "--max-steps", "8") == 2
    assert "made with method=" in capsys.readouterr().err


def test_bad_combinations_are_refused(workspace, complementary, capsys):
    base = ["--train-file", str(workspace / "wiki40.txt"), "--model", str(workspace / "tiny"), "--no-progress",
            "--no-eval", "--batch-size", "8"]
    cases = [
        (["--method", "sgbert", "--moco-queue", "8"], "--method sgbert does not combine with --moco-queue"),
        (["--method", "tacl", "--do-mlm"], "TaCL's masked-LM term is always on"),
        (["--method", "vascl", "--chunk-size", "4"], "--method vascl does not combine with --chunk-size"),
        (["--method", "dclr", "--dclr-model", "x", "--gaussian-negatives", "4"], "DCLR draws its own noise"),
        (["--method", "sgbert", "--child-tuning", "f"], "does not combine with --child-tuning"),
        (["--method", "dclr"], "--method dclr needs --dclr-model"),
        (["--dclr-model", "x"], "needs --method dclr"),
        (["--method", "vascl", "--vascl-neighbours", "8"], "must be smaller than --batch-size"),
        (["--method", "sgbert", "--temperature", "0.1"], "takes --sgbert-temperature"),
        (["--method", "sgbert", "--mlp", "always"], "does not combine with --mlp always"),
        (["--method", "tacl", "--pooler", "cls"], "does not combine with --pooler cls"),
        (["--method", "tacl", "--hard-negative-weight", "2"], "does not combine with --hard-negative-weight"),
        (["--method", "dclr", "--dclr-model", "x", "--dclr-threshold", "1.5"], "--dclr-threshold is a cosine"),
        (["--method", "sgbert", "--sgbert-temperature", "0"], "--sgbert-temperature must be a finite number > 0"),
        (["--method", "tacl", "--tacl-mask-probability", "1"], "--tacl-mask-probability must be in (0, 1)"),
        (["--method", "vascl", "--vascl-neighbours", "0"], "--vascl-neighbours must be an int >= 1"),
        (["--method", "moco"], "invalid choice: 'moco'"),
    ]
    assert_usage_errors(base, cases, capsys)
    # Known only once the data and the models are read: one line, exit 2.
    late = [
        (["--train-file", str(workspace / "pairs.csv"), "--method", "vascl", "--vascl-neighbours", "3"],
         "trains on unlabeled sentences"),
        (["--method", "dclr", "--dclr-model", str(workspace / "missing")], "missing"),
    ]
    for i, (flags, message) in enumerate(late):
        assert cli.main(base + flags + ["--output-dir", str(workspace / f"late{i}")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err, (flags, err)
    # Programmatic use gets the same checks.
    with pytest.raises(ValueError, match="does not combine with --moco-queue"):
        trainer_module.Trainer(TrainConfig(train_file=str(workspace / "wiki40.txt"), output_dir=str(workspace / "p"),
                                           method="tacl", moco_queue=4)).setup()
