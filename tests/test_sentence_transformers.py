"""fastcl.sentence_transformers: the loss values and every parameter's gradient of the
installed sentence-transformers losses, on a tiny SentenceTransformer in float64 (a 2-layer
BERT with random weights and all-MiniLM-L6-v2's tokenizer) fed real SNLI triplets.

Dropout is off where two runs must draw nothing at random; the cached losses are also
compared with dropout on, from one seed, which checks that the mini-batches are re-embedded
under the RNG states of their first pass.
"""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
import tomllib
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer import losses as st
from sentence_transformers.util import cos_sim, dot_score, manhattan_sim

import fastcl.sentence_transformers as fst

from .helpers import free_port, gloo_group
from .train_support import NLI, REPO, save_tiny_bert

N = 9  # rows per batch: ragged against every mini-batch size below

with open(NLI, newline="", encoding="utf-8") as _f:
    TRIPLETS = [(r["sent0"], r["sent1"], r["hard_neg"]) for r in csv.DictReader(_f)][:64]

# (anchor, positive, negative_1 .. negative_3): the other negatives are other rows' negatives.
COLUMNS = [[t[0] for t in TRIPLETS[:N]], [t[1] for t in TRIPLETS[:N]], [t[2] for t in TRIPLETS[:N]],
           [t[2] for t in TRIPLETS[N:2 * N]], [t[2] for t in TRIPLETS[2 * N:3 * N]]]



@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_st")
    return {dropout: str(save_tiny_bert(root / f"dropout{dropout}", dropout=dropout, seed=0))
            for dropout in (0.0, 0.1)}


def load(path: str, dtype=torch.float64) -> SentenceTransformer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SentenceTransformer(path, device="cpu").to(dtype)


@pytest.fixture
def model(model_dirs):
    return load(model_dirs[0.0])


def features(model, n_columns: int, rows=slice(0, N)):
    # Fresh every call: modules may write into the feature dicts they are given.
    return [model.preprocess(column[rows]) for column in COLUMNS[:n_columns]]


def loss_and_grads(model, loss_fn, n_columns: int, seed: int | None = None, rows=slice(0, N)):
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss = loss_fn(features(model, n_columns, rows), None)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(ours, theirs, rtol=1e-11):
    (loss, grads), (ref_loss, ref_grads) = ours, theirs
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    assert grads.keys() == ref_grads.keys()
    flat, ref_flat = (torch.cat([g[k].flatten() for k in sorted(ref_grads)]) for g in (grads, ref_grads))
    scale = ref_flat.abs().max()
    assert scale > 0
    # Relative to the largest entry: some entries (attention key biases) are zero up to rounding.
    torch.testing.assert_close(flat, ref_flat, rtol=0, atol=rtol * scale)


def st_quiet(cls, *args, **kwargs):
    with warnings.catch_warnings():  # the symmetric classes are deprecated in sentence-transformers
        warnings.simplefilter("ignore", DeprecationWarning)
        return cls(*args, **kwargs)


# --------------------------------------------------------------- plain losses

PLAIN = {
    "cos": dict(),
    "scale50": dict(scale=50.0),
    "dot": dict(similarity_fct=dot_score, scale=1.0),
    "symmetric": dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    "one-direction-per_direction": dict(partition_mode="per_direction"),
    "hardness-mode-strength-0": dict(hardness_mode="all_negatives", hardness_strength=0.0),
}


@pytest.mark.parametrize("n_columns", [2, 3], ids=["pairs", "triplets"])
@pytest.mark.parametrize("options", PLAIN.values(), ids=PLAIN.keys())
def test_mnrl_equals_sentence_transformers(model, n_columns, options):
    ours = loss_and_grads(model, fst.MultipleNegativesRankingLoss(model, **options), n_columns)
    theirs = loss_and_grads(model, st.MultipleNegativesRankingLoss(model, **options), n_columns)
    assert_same(ours, theirs)


@pytest.mark.parametrize("n_columns", [2, 3], ids=["pairs", "triplets"])
def test_symmetric_class_equals_sentence_transformers(model, n_columns):
    ours = loss_and_grads(model, fst.MultipleNegativesSymmetricRankingLoss(model, scale=10.0), n_columns)
    theirs = loss_and_grads(model, st_quiet(st.MultipleNegativesSymmetricRankingLoss, model, scale=10.0), n_columns)
    assert_same(ours, theirs)


def test_dropout_draws_match(model_dirs):
    # The same columns are embedded in the same forward passes as sentence-transformers',
    # so one seed gives the same dropout masks.
    model = load(model_dirs[0.1])
    model.train()
    ours = loss_and_grads(model, fst.MultipleNegativesRankingLoss(model), 3, seed=5)
    theirs = loss_and_grads(model, st.MultipleNegativesRankingLoss(model), 3, seed=5)
    assert_same(ours, theirs)


@pytest.mark.parametrize("similarity_fct", [cos_sim, dot_score], ids=["cos", "dot"])
def test_embeddings_at_kernel_size(similarity_fct):
    # Above the dense reference's size: the kernels compute it (the Triton interpreter in
    # the test suite, the native kernel on CPU otherwise).
    g = torch.Generator().manual_seed(0)
    n = 190
    columns = [torch.randn(n, 16, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3)]
    grads = []
    for cls in (fst.MultipleNegativesRankingLoss, st.MultipleNegativesRankingLoss):
        loss = cls(None, scale=20.0 if similarity_fct is cos_sim else 0.5, similarity_fct=similarity_fct,
                   directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
        value = loss.compute_loss_from_embeddings(columns, None)
        grads.append((value.detach(), torch.autograd.grad(value, columns)))
    (ours, ours_g), (ref, ref_g) = grads
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


def test_non_finite_embeddings_give_nan_as_sentence_transformers():
    columns = [torch.randn(6, 8, dtype=torch.float64) for _ in range(3)]
    columns[2][4, 1] = float("inf")
    for cls in (fst.MultipleNegativesRankingLoss, st.MultipleNegativesRankingLoss):
        assert torch.isnan(cls(None).compute_loss_from_embeddings(columns, None))


# -------------------------------------------------------------- cached losses


@pytest.mark.parametrize("n_columns", [2, 3], ids=["pairs", "triplets"])
@pytest.mark.parametrize("mini_batch_size", [1, 2, 4, 32])
def test_cached_equals_sentence_transformers(model, n_columns, mini_batch_size):
    ours = loss_and_grads(model, fst.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size),
                          n_columns)
    theirs = loss_and_grads(model, st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size),
                            n_columns)
    assert_same(ours, theirs)


@pytest.mark.parametrize("options", [dict(mini_batch_num_tokens=40), dict(similarity_fct=dot_score, scale=1.0),
                                     dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")],
                         ids=["num-tokens", "dot", "symmetric"])
def test_cached_options_equal_sentence_transformers(model, options):
    options = dict(mini_batch_size=3, **options)
    ours = loss_and_grads(model, fst.CachedMultipleNegativesRankingLoss(model, **options), 3)
    theirs = loss_and_grads(model, st.CachedMultipleNegativesRankingLoss(model, **options), 3)
    assert_same(ours, theirs)


def test_cached_symmetric_class_equals_sentence_transformers(model):
    ours = loss_and_grads(model, fst.CachedMultipleNegativesSymmetricRankingLoss(model, mini_batch_size=4), 2)
    theirs = loss_and_grads(model, st_quiet(st.CachedMultipleNegativesSymmetricRankingLoss, model,
                                            mini_batch_size=4), 2)
    assert_same(ours, theirs)


def test_cached_replays_dropout(model_dirs):
    model = load(model_dirs[0.1])
    model.train()
    ours = loss_and_grads(model, fst.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4), 3, seed=7)
    theirs = loss_and_grads(model, st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4), 3, seed=7)
    assert_same(ours, theirs)


def test_cached_without_grad_returns_the_loss(model):
    with torch.no_grad():
        ours = fst.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)(features(model, 3), None)
        theirs = st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)(features(model, 3), None)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ Matryoshka

MATRYOSHKA = {
    "mnrl": lambda lib, m: lib.MultipleNegativesRankingLoss(m),
    "cached": lambda lib, m: lib.CachedMultipleNegativesRankingLoss(m, mini_batch_size=4),
    "symmetric": lambda lib, m: st_quiet(lib.MultipleNegativesSymmetricRankingLoss, m),
    "cached-symmetric": lambda lib, m: st_quiet(lib.CachedMultipleNegativesSymmetricRankingLoss, m, mini_batch_size=2),
}


@pytest.mark.parametrize("inner", MATRYOSHKA.values(), ids=MATRYOSHKA.keys())
def test_matryoshka_equals_sentence_transformers(model, inner):
    def wrapped(lib):
        return st.MatryoshkaLoss(model, inner(lib, model), [32, 16, 8], matryoshka_weights=[1.0, 0.5, 2.0])

    assert_same(loss_and_grads(model, wrapped(fst), 3), loss_and_grads(model, wrapped(st), 3))


# ------------------------------------------------------ configuration, errors


CONFIGS = [
    ("MultipleNegativesRankingLoss", dict()),
    ("MultipleNegativesRankingLoss", dict(scale=30.0, similarity_fct=dot_score, gather_across_devices=True)),
    ("MultipleNegativesRankingLoss", dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")),
    ("CachedMultipleNegativesRankingLoss", dict(mini_batch_size=8, mini_batch_num_tokens=100)),
    ("MultipleNegativesSymmetricRankingLoss", dict(scale=10.0)),
    ("CachedMultipleNegativesSymmetricRankingLoss", dict(mini_batch_size=4)),
]


@pytest.mark.parametrize("name, options", CONFIGS)
def test_config_and_citation_as_sentence_transformers(model, name, options):
    ours, theirs = getattr(fst, name)(model, **options), st_quiet(getattr(st, name), model, **options)
    if not name.endswith("SymmetricRankingLoss"):  # those are deprecated aliases in sentence-transformers
        assert isinstance(ours, type(theirs))
    assert ours.get_config_dict() == theirs.get_config_dict()
    assert ours.citation == theirs.citation
    assert ours.temperature == theirs.temperature


def test_cached_delegates_hyperparameters_to_fastcl_loss(model):
    loss = fst.CachedMultipleNegativesRankingLoss(model, scale=10.0)
    assert isinstance(loss.loss, fst.MultipleNegativesRankingLoss)
    loss.scale = 30.0  # sentence-transformers delegates the assignment to the wrapped loss
    assert loss.loss.scale == 30.0
    theirs = loss_and_grads(model, st.CachedMultipleNegativesRankingLoss(model, scale=30.0), 2)
    assert_same(loss_and_grads(model, loss, 2), theirs)


@pytest.mark.parametrize("cls", [fst.MultipleNegativesRankingLoss, fst.CachedMultipleNegativesRankingLoss])
def test_other_similarity_is_refused(model, cls):
    with pytest.raises(ValueError, match="similarity_fct.*manhattan_sim"):
        cls(model, similarity_fct=manhattan_sim)
    loss = cls(model)
    loss.similarity_fct = lambda a, b: a @ b.T  # reassigned after construction: refused at the call
    with pytest.raises(ValueError, match="similarity_fct"):
        loss(features(model, 2), None)


def test_sentence_transformers_validation_is_kept(model):
    with pytest.raises(ValueError, match="Scale"):
        fst.MultipleNegativesRankingLoss(model, scale=0.0)
    with pytest.raises(ValueError, match="query_to_doc"):
        fst.MultipleNegativesRankingLoss(model, directions=("doc_to_query",))
    with pytest.raises(ValueError, match="per_direction"):
        fst.CachedMultipleNegativesRankingLoss(model, directions=("query_to_doc", "query_to_query"),
                                               partition_mode="per_direction")


def test_import_fastcl_does_not_need_sentence_transformers():
    code = "import sys, fastcl; assert 'sentence_transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})


def test_packaging_extra():
    with open(REPO / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(req.startswith("sentence-transformers[train]") for req in extras["sentence-transformers"])


# ------------------------------------------- directions, hardness, K negatives

FAMILY_OPTIONS = {
    "directions-gte": dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")),
    "directions-symmetric-joint": dict(directions=("query_to_doc", "doc_to_query")),
    "directions-q2q": dict(directions=("query_to_doc", "query_to_query")),
    "hardness-in-batch": dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),
    "hardness-hard": dict(hardness_mode="hard_negatives", hardness_strength=5.0),
    "hardness-all": dict(hardness_mode="all_negatives", hardness_strength=2.0),
}


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
@pytest.mark.parametrize("options", FAMILY_OPTIONS.values(), ids=FAMILY_OPTIONS.keys())
def test_option_equals_sentence_transformers(model, cached, options):
    if cached:
        ours_cls, theirs_cls, options = (fst.CachedMultipleNegativesRankingLoss, st.CachedMultipleNegativesRankingLoss,
                                         dict(mini_batch_size=4, **options))
    else:
        ours_cls, theirs_cls = fst.MultipleNegativesRankingLoss, st.MultipleNegativesRankingLoss
    assert_same(loss_and_grads(model, ours_cls(model, **options), 3),
                loss_and_grads(model, theirs_cls(model, **options), 3))


@pytest.mark.parametrize("n_columns", [4, 5], ids=["K2", "K3"])
def test_several_negatives_equal_sentence_transformers(model, n_columns):
    assert_same(loss_and_grads(model, fst.MultipleNegativesRankingLoss(model), n_columns),
                loss_and_grads(model, st.MultipleNegativesRankingLoss(model), n_columns))


COMBINED = {
    "gte-K3": (dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")), 5),
    "symmetric-K2": (dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"), 4),
    "hardness-hard-K3": (dict(hardness_mode="hard_negatives", hardness_strength=5.0), 5),
    "hardness-in-batch-dot": (dict(hardness_mode="in_batch_negatives", hardness_strength=3.0, similarity_fct=dot_score,
                                   scale=1.0), 3),
}


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "cached"])
@pytest.mark.parametrize("options, n_columns", COMBINED.values(), ids=COMBINED.keys())
def test_combined_options_equal_sentence_transformers(model, cached, options, n_columns):
    if cached:
        options = dict(mini_batch_size=3, **options)
        ours, theirs = fst.CachedMultipleNegativesRankingLoss, st.CachedMultipleNegativesRankingLoss
    else:
        ours, theirs = fst.MultipleNegativesRankingLoss, st.MultipleNegativesRankingLoss
    assert_same(loss_and_grads(model, ours(model, **options), n_columns),
                loss_and_grads(model, theirs(model, **options), n_columns))


# --------------------------------------------------------- gather_across_devices

GATHERED = {
    "pairs": ("MultipleNegativesRankingLoss", dict(), 2),
    "triplets-symmetric": ("MultipleNegativesRankingLoss",
                           dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"), 3),
    "triplets-dot": ("MultipleNegativesRankingLoss", dict(similarity_fct=dot_score, scale=1.0), 3),
    "cached-triplets": ("CachedMultipleNegativesRankingLoss", dict(mini_batch_size=2), 3),
    "gte-K2-hardness": ("MultipleNegativesRankingLoss",
                        dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
                             hardness_mode="all_negatives", hardness_strength=2.0), 4),
}
WORLD, LOCAL = 2, 5


def _gather_worker(rank, port, path, results):
    with gloo_group(rank, WORLD, port):
        model = load(path)
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        out = {}
        for case, (name, options, n_columns) in GATHERED.items():
            loss_fn = getattr(fst, name)(model, gather_across_devices=True, **options)
            out[case] = loss_and_grads(model, loss_fn, n_columns, rows=rows)
        results[rank] = out


def test_gather_across_devices_equals_one_process(model_dirs, model):
    results = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(free_port(), model_dirs[0.0], results), nprocs=WORLD, join=True)
    for case, (name, options, n_columns) in GATHERED.items():
        # One process over the whole batch (2 x LOCAL rows), sentence-transformers' loss.
        whole = loss_and_grads(model, getattr(st, name)(model, **options), n_columns, rows=slice(0, WORLD * LOCAL))
        ranks = [results[r][case] for r in range(WORLD)]
        # Each rank's loss is its own rows' mean; DDP averages the ranks' gradients.
        mean_loss = sum(loss for loss, _ in ranks) / WORLD
        mean_grads = {k: sum(grads[k] for _, grads in ranks) / WORLD for k in ranks[0][1]}
        assert_same((mean_loss, mean_grads), whole, rtol=1e-10)


# ------------------------------------------------------------- the trainer

TRAINER_LOSSES = {
    "mnrl": lambda m: fst.MultipleNegativesRankingLoss(m),
    "cached": lambda m: fst.CachedMultipleNegativesRankingLoss(m, mini_batch_size=8),
    "symmetric": lambda m: fst.MultipleNegativesSymmetricRankingLoss(m),
    "cached-symmetric": lambda m: fst.CachedMultipleNegativesSymmetricRankingLoss(m, mini_batch_size=8),
    "matryoshka-mnrl": lambda m: st.MatryoshkaLoss(m, fst.MultipleNegativesRankingLoss(m), [32, 16]),
    "matryoshka-cached": lambda m: st.MatryoshkaLoss(m, fst.CachedMultipleNegativesRankingLoss(m, mini_batch_size=8),
                                                     [32, 16]),
    "gist": lambda m: fst.GISTEmbedLoss(m, copy.deepcopy(m), margin=0.05),  # the model's start as the guide
    "cached-gist": lambda m: fst.CachedGISTEmbedLoss(m, copy.deepcopy(m), mini_batch_size=8),
}


@pytest.mark.parametrize("make_loss", TRAINER_LOSSES.values(), ids=TRAINER_LOSSES.keys())
def test_trainer_trains_saves_and_loads(model_dirs, tmp_path, make_loss):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = load(model_dirs[0.1], torch.float32)
    dataset = Dataset.from_dict({"anchor": [t[0] for t in TRIPLETS], "positive": [t[1] for t in TRIPLETS],
                                 "negative": [t[2] for t in TRIPLETS]})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = make_loss(model)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=16, learning_rate=1e-3,
        save_strategy="no", report_to="none", use_cpu=True, seed=0, logging_steps=1, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    result = trainer.train()
    assert result.global_step == 3
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no parameter changed"

    out = tmp_path / "model"
    model.save(str(out))
    card = (out / "README.md").read_text(encoding="utf-8")
    for key in loss.get_config_dict():  # written by sentence-transformers' model card, as for its losses
        assert f'"{key}":' in card
    loaded = SentenceTransformer(str(out), device="cpu")
    sentences = [t[0] for t in TRIPLETS[:4]]
    model.eval()
    torch.testing.assert_close(loaded.encode(sentences, convert_to_tensor=True),
                               model.encode(sentences, convert_to_tensor=True), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- GISTEmbed


@pytest.fixture(scope="module")
def guide_dir(tmp_path_factory):
    return str(save_tiny_bert(tmp_path_factory.mktemp("tiny_guide") / "guide", dropout=0.0, seed=7))


@pytest.fixture
def guide(guide_dir):
    return load(guide_dir)


GIST_OPTIONS = {
    "default": dict(),
    "absolute-0.1": dict(margin=0.1),
    "relative-0.1": dict(margin_strategy="relative", margin=0.1),
    "no-contrast": dict(contrast_anchors=False, contrast_positives=False, temperature=0.05),
    "anchors-only": dict(contrast_positives=False),
    "positives-only": dict(contrast_anchors=False, margin=0.1),
}


@pytest.mark.parametrize("n_columns", [2, 3], ids=["pairs", "triplets"])
@pytest.mark.parametrize("options", GIST_OPTIONS.values(), ids=GIST_OPTIONS.keys())
def test_gist_equals_sentence_transformers(model, guide, n_columns, options):
    ours = loss_and_grads(model, fst.GISTEmbedLoss(model, guide, **options), n_columns)
    assert_same(ours, loss_and_grads(model, st.GISTEmbedLoss(model, guide, **options), n_columns))
    if n_columns == 3:  # the guide masks something: without it (a threshold no cosine reaches) the loss differs
        unguided = {k: v for k, v in options.items() if k not in ("margin", "margin_strategy")}
        loss = fst.GISTEmbedLoss(model, guide, margin=-3.0, **unguided)(features(model, n_columns), None)
        assert abs(ours[0].item() - loss.item()) > 1e-6


def test_gist_guide_with_another_tokenization_equals_sentence_transformers(model, guide):
    guide.max_seq_length = 12  # shorter than the model's: sentence-transformers re-tokenizes the texts
    ours_loss, theirs_loss = fst.GISTEmbedLoss(model, guide), st.GISTEmbedLoss(model, guide)
    assert ours_loss.must_retokenize and theirs_loss.must_retokenize
    assert_same(loss_and_grads(model, ours_loss, 3), loss_and_grads(model, theirs_loss, 3))


@pytest.mark.parametrize("n_columns", [2, 3, 5], ids=["pairs", "triplets", "K3"])
@pytest.mark.parametrize("mini_batch_size", [2, 32])
def test_cached_gist_equals_sentence_transformers(model, guide, n_columns, mini_batch_size):
    options = dict(mini_batch_size=mini_batch_size, margin=0.05)
    assert_same(loss_and_grads(model, fst.CachedGISTEmbedLoss(model, guide, **options), n_columns),
                loss_and_grads(model, st.CachedGISTEmbedLoss(model, guide, **options), n_columns))


@pytest.mark.parametrize("name, options", [("GISTEmbedLoss", dict(margin=0.1, contrast_anchors=False)),
                                           ("CachedGISTEmbedLoss", dict(mini_batch_size=4, temperature=0.05))])
def test_gist_config_and_citation_as_sentence_transformers(model, guide, name, options):
    ours, theirs = getattr(fst, name)(model, guide, **options), getattr(st, name)(model, guide, **options)
    assert isinstance(ours, type(theirs))
    assert ours.get_config_dict() == theirs.get_config_dict()
    assert getattr(ours, "citation", None) == getattr(theirs, "citation", None)  # the cached one has none


def test_gist_refusals(model, guide):
    with pytest.raises(ValueError, match="margin_strategy"):
        fst.GISTEmbedLoss(model, guide, margin_strategy="percent")
    loss = fst.GISTEmbedLoss(model, guide)
    with pytest.raises(ValueError, match="Expected 2 or 3 embeddings"):
        loss(features(model, 4), None)
    with pytest.raises(ValueError, match="same columns"):
        fst.gist_loss(loss, [torch.zeros(3, 4)] * 2, [torch.zeros(3, 4)] * 3)


GIST_GATHERED = {
    "pairs": ("GISTEmbedLoss", dict(), 2),
    "triplets-relative": ("GISTEmbedLoss", dict(margin_strategy="relative", margin=0.1), 3),
    "triplets-no-anchors": ("GISTEmbedLoss", dict(contrast_anchors=False, margin=0.05), 3),
    "cached-triplets": ("CachedGISTEmbedLoss", dict(mini_batch_size=3, margin=0.05), 3),
}
GIST_LOCAL = 4  # sentence-transformers gathers equal shapes only: 2 x 4 of the N rows


def _gist_gather_worker(rank, port, path, guide_path, results):
    with gloo_group(rank, WORLD, port):
        model, guide = load(path), load(guide_path)
        rows = slice(rank * GIST_LOCAL, (rank + 1) * GIST_LOCAL)
        out = {}
        for case, (name, options, n_columns) in GIST_GATHERED.items():
            out[case] = [loss_and_grads(model, getattr(lib, name)(model, guide, gather_across_devices=True,
                                                                  **options), n_columns, rows=rows)
                         for lib in (fst, st)]
        results[rank] = out


def test_gist_gather_across_devices_equals_sentence_transformers(model_dirs, guide_dir, model, guide):
    results = mp.Manager().dict()
    mp.spawn(_gist_gather_worker, args=(free_port(), model_dirs[0.0], guide_dir, results), nprocs=WORLD, join=True)
    for case, (name, options, n_columns) in GIST_GATHERED.items():
        for rank in range(WORLD):  # each rank's loss and gradients, theirs gathered the same way
            ours, theirs = results[rank][case]
            assert_same(ours, theirs, rtol=1e-10)
        if not options.get("contrast_anchors", True):
            # Without the anchor-anchor term (the one that stays on its rank), the ranks'
            # mean is the one-process loss of the whole batch.
            whole = loss_and_grads(model, st.GISTEmbedLoss(model, guide, **options), n_columns,
                                   rows=slice(0, WORLD * GIST_LOCAL))
            ranks = [results[r][case][0] for r in range(WORLD)]
            mean_loss = sum(loss for loss, _ in ranks) / WORLD
            mean_grads = {k: sum(grads[k] for _, grads in ranks) / WORLD for k in ranks[0][1]}
            assert_same((mean_loss, mean_grads), whole, rtol=1e-10)


@pytest.mark.parametrize("cls, options", [("GISTEmbedLoss", dict(margin=0.1)),
                                          ("CachedGISTEmbedLoss", dict(mini_batch_size=4))], ids=["plain", "cached"])
def test_matryoshka_around_gist_equals_sentence_transformers(model, guide, cls, options):
    def wrapped(lib):
        return st.MatryoshkaLoss(model, getattr(lib, cls)(model, guide, **options), [32, 16], matryoshka_weights=[1, 2])

    assert_same(loss_and_grads(model, wrapped(fst), 3), loss_and_grads(model, wrapped(st), 3))
