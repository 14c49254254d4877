"""A saved model gives the embeddings of the model that was trained, through every loader:
the trainer's live model, ``fastcl.encode`` (what ``python -m fastcl.evaluate`` and the
trainer's "after training" scores use), ``SentenceTransformer(dir)`` and, for the cls
pooler with its MLP, ``AutoModel``'s ``pooler_output``; for every pooler x MLP choice."""

import json
import shutil

import pytest
import torch

import fastcl
from fastcl.encoder import Encoder
from fastcl.saved_model import SavedModelError, declared_head, layer_mix
from fastcl.sentence_model import MLP_MODES, POOLERS, resolve_mlp
from fastcl.train.trainer import Trainer, TrainConfig

from .train_support import WIKI, save_tiny_bert, tokenizer

SENTENCES = ["a man is playing a guitar .", "stocks fell", "the cat sleeps on the sofa in the afternoon sun",
             " ".join(["a very long sentence that the model must truncate"] * 12)]  # > 64 tokens


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    # 3 layers: the first, the last and the top two are three different averages.
    from .train_support import tiny_bert

    model = tiny_bert(dropout=0.1, layers=3)
    model.save_pretrained(root / "tiny3")
    tokenizer().save_pretrained(root / "tiny3")
    lines = [line for line in WIKI.read_text(encoding="utf-8").splitlines() if line.strip()][:16]
    (root / "wiki16.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _train(workspace, pooler, mlp, name):
    """Two steps at a high learning rate: the MLP head moves away from BERT's pooler."""
    out = workspace / name
    cfg = TrainConfig(train_file=str(workspace / "wiki16.txt"), output_dir=str(out), model=str(workspace / "tiny3"),
                      pooler=pooler, mlp=mlp, batch_size=8, max_steps=2, learning_rate=1e-2, no_eval=True,
                      progress=False)
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.setup()
    trainer.train()
    return trainer, out


@pytest.mark.parametrize("mlp", MLP_MODES)
@pytest.mark.parametrize("pooler", POOLERS)
def test_every_pooler_and_mlp_loads_to_the_trained_embeddings(workspace, pooler, mlp):
    from sentence_transformers import SentenceTransformer

    trainer, out = _train(workspace, pooler, mlp, f"{pooler}-{mlp}")
    live = Encoder(trainer.encoder, trainer.tokenizer, "cpu").encode(SENTENCES)
    trainer.encoder.train()
    assert torch.isfinite(live).all()

    mine = fastcl.encode(out, SENTENCES)
    torch.testing.assert_close(mine, live, rtol=0, atol=1e-6)
    st = SentenceTransformer(str(out), device="cpu")
    theirs = torch.as_tensor(st.encode(SENTENCES))
    torch.testing.assert_close(theirs, live, rtol=0, atol=2e-6)

    _, mlp_eval = resolve_mlp(mlp, pooler)
    config = json.loads((out / "fastcl_config.json").read_text())
    assert config["pooler"] == pooler and config["mlp_eval"] is mlp_eval and config["max_length"] == 64
    kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    assert kinds == ["Transformer"] + (["WeightedLayerPooling"] if pooler.startswith("avg_") else []) + [
        "Pooling"] + (["Dense"] if mlp_eval else []) + ["Normalize"]
    if mlp_eval and pooler.startswith("cls"):  # BERT's pooler in the saved model is the trained MLP
        from transformers import AutoModel

        auto = AutoModel.from_pretrained(out).eval()
        with torch.no_grad():
            o = auto(**tokenizer()(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="pt"))
        torch.testing.assert_close(torch.nn.functional.normalize(o.pooler_output, dim=1), live, rtol=0, atol=2e-6)
    # Saving did not change the model in memory (BERT's own pooler keeps its weights).
    own = trainer.encoder.backbone.pooler.dense.weight
    assert not (mlp_eval and torch.equal(own, trainer.encoder.mlp.dense.weight))


def test_layer_mixes_are_the_poolers_averages():
    hidden = [torch.randn(2, 5, 4) for _ in range(4)]  # embeddings + 3 layers
    expected = {"avg_top2": (hidden[2] + hidden[3]) / 2, "avg_first_last": (hidden[1] + hidden[3]) / 2}
    for pooler, expected in expected.items():
        start, w = layer_mix(pooler, 3)
        w = torch.tensor(w)
        mixed = (w[:, None, None, None] * torch.stack(hidden)[start:]).sum(0) / w.sum()
        torch.testing.assert_close(mixed, expected, rtol=0, atol=0)
    assert layer_mix("avg_first_last", 1) == (1, [1.0])


def test_a_directory_saved_again_is_loaded_again(workspace):
    """fastcl.encode caches loaded models; a directory written again must not give the old one."""
    trainer, out = _train(workspace, "avg", "always", "again")
    first = fastcl.encode(out, SENTENCES)
    trainer.cfg.overwrite = True
    with torch.no_grad():
        trainer.encoder.mlp.dense.weight.mul_(-1.0)
    trainer.save_model(out / "copy")
    for entry in (out / "copy").iterdir():
        if entry.is_dir():
            shutil.rmtree(out / entry.name)
        entry.replace(out / entry.name)
    again = fastcl.encode(out, SENTENCES)
    live = Encoder(trainer.encoder, trainer.tokenizer, "cpu").encode(SENTENCES)
    assert not torch.allclose(first, again)
    torch.testing.assert_close(again, live, rtol=0, atol=1e-6)


def test_pipelines_fastcl_cannot_run_are_refused(workspace, tmp_path):
    d = save_tiny_bert(tmp_path / "m")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (d / "1_Pooling").mkdir()
    (d / "modules.json").write_text(json.dumps(modules))
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(SavedModelError, match="pooling mode max.*SentenceTransformer"):
        fastcl.load_encoder(d, device="cpu")
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert declared_head(d) == {"pooler": "avg", "head": None, "max_length": None}
    modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (d / "2_Dense").mkdir()
    (d / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 32, "out_features": 16}))
    (d / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(SavedModelError, match="Dense module is not a square Linear"):
        fastcl.load_encoder(d, device="cpu")
    # A pooler chosen by hand takes no saved head: the user decides.
    assert fastcl.load_encoder(d, pooler="avg", device="cpu").encode(["a b"]).shape == (1, 32)
    (d / "fastcl_config.json").write_text('{"pooler": "cls", "mlp_eval": true')
    with pytest.raises(SavedModelError, match="fastcl_config.json: not valid JSON"):
        fastcl.load_encoder(d, device="cpu")
    (d / "fastcl_config.json").write_text('{"pooler": "cls", "mlp_eval": true, "mlp_head": "9_Dense"}')
    with pytest.raises(SavedModelError, match="MLP head applies at inference, but .*9_Dense.* is missing"):
        fastcl.load_encoder(d, device="cpu")
    (d / "fastcl_config.json").write_text('{"pooler": "max"}')
    with pytest.raises(SavedModelError, match="unknown pooler 'max'"):
        fastcl.load_encoder(d, device="cpu")


def test_encode_checks_its_arguments_and_points_at_a_run_in_progress(workspace, tmp_path):
    trainer, out = _train(workspace, "avg", "none", "args")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            fastcl.encode(out, SENTENCES, batch_size=bad)
    running = tmp_path / "running"
    (running / "checkpoint").mkdir(parents=True)
    (running / "log.jsonl").write_text("")
    with pytest.raises(SavedModelError, match=r"training run's output directory: .*best holds the best model so far"):
        fastcl.encode(running, SENTENCES)
    (running / "config.json").write_text((out / "config.json").read_text())  # stopped while writing the model
    with pytest.raises(SavedModelError, match=r"final model is not all there .*--resume finishes it"):
        fastcl.encode(running, SENTENCES)
