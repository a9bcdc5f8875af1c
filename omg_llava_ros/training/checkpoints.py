"""Checkpoints (model, optimizer, progress; written atomically) and the model a run starts from:
the embedded architecture from scratch with a tokenizer trained on the world, or a trained model
directory to fine-tune (`TrainConfig.init_from`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from omg_llava_ros.model.config import OmgLlavaConfig, get_config
from omg_llava_ros.model.language_model import add_special_tokens, train_tokenizer
from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.training import data
from omg_llava_ros.training.config import TrainConfig


def save_checkpoint(
    path: Path,
    model: OmgLlava,
    optimizer,
    stage: int,
    step: int,
    spent: float,
    aux: torch.nn.Module | None = None,
    total: int | None = None,
) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, path / "model.tmp")
    if aux is not None:
        save_file({k: v.detach().contiguous() for k, v in aux.state_dict().items()}, path / "aux.tmp")
        (path / "aux.tmp").replace(path / "aux.safetensors")
    torch.save(optimizer.state_dict(), path / "optimizer.tmp")
    (path / "model.tmp").replace(path / "model.safetensors")
    (path / "optimizer.tmp").replace(path / "optimizer.pt")
    progress = {"stage": stage, "step": step, "spent": spent}
    if total is not None:  # a budgeted stage's step count, kept across resumptions
        progress["total"] = total
    (path / "progress.json").write_text(json.dumps(progress))


def load_progress(path: Path) -> dict | None:
    f = path / "progress.json"
    return json.loads(f.read_text()) if f.is_file() else None


def load_weights(model: OmgLlava, path: Path, strict: bool = True) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(path / "model.safetensors"), strict=strict)


def build_model(cfg: TrainConfig, out: Path) -> OmgLlava:
    """The embedded config with a tokenizer trained on the world's questions and answers, or with
    `init_from` that model directory's weights, tokenizer and config (its pointer given relations
    when `point_relations`, their weights at zero; the relation choice's heads when
    `relation_shapes`)."""
    from transformers import AutoTokenizer

    if cfg.init_from:
        return initialised_model(cfg, out)

    tok_dir = out / "tokenizer"
    if tok_dir.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        rows = len(tokenizer) - 1  # `<mark>` has no embedding row
    else:
        corpus = data.tokenizer_corpus(np.random.default_rng(cfg.seed + 7))
        tokenizer = train_tokenizer(corpus, vocab_size=600)
        rows = add_special_tokens(tokenizer)
        tokenizer.save_pretrained(tok_dir)
    config: OmgLlavaConfig = get_config("embedded")
    config.perception_prior = cfg.perception_prior
    config.point_relations = cfg.point_relations and config.locate_objects
    config.relation_shapes = cfg.relation_shapes if config.point_relations else 0
    config.language_model.vocab_size = rows
    torch.manual_seed(cfg.seed)
    model = OmgLlava(config, tokenizer=tokenizer)
    model._init_class_embed()
    if model.object_location is not None:
        # From zero the gate hardly moves (`object_location`): start it open (`location_gate_init`).
        with torch.no_grad():
            model.object_location.gate.fill_(cfg.location_gate_init)
    return model


def initialised_model(cfg: TrainConfig, out: Path) -> OmgLlava:
    """A fine-tuning start: the model in `cfg.init_from` ("embedded": the shipped one), its tokenizer
    copied to the run folder; parts its config gains here (the pointer's relations) start as their
    constructors make them, with the config's seed."""
    base = OmgLlava.from_pretrained(None if cfg.init_from == "embedded" else cfg.init_from)
    config = base.config
    config.point_relations = cfg.point_relations and config.locate_objects
    if cfg.relation_shapes and config.point_relations:
        config.relation_shapes = cfg.relation_shapes
    torch.manual_seed(cfg.seed)
    model = OmgLlava(config, tokenizer=base.tokenizer, llm=base.llm)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    new_parts = ("anchor_", "relation.", "relation_kind.", "target_shape.", "object_shape.")
    new = {k for k in missing if k.startswith(tuple(f"object_location.{p}" for p in new_parts))}
    if unexpected or set(missing) - new:
        raise ValueError(
            f"{cfg.init_from}: does not fit the model: missing {sorted(set(missing) - new)}, unexpected {unexpected}"
        )
    if not (out / "tokenizer").is_dir():
        base.tokenizer.save_pretrained(out / "tokenizer")
    return model
