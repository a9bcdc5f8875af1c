"""The training stages, by number: what each trains, how one step of it runs, the modes it runs in.

`trainer.run_stage` runs any of them the same way (optimizer, schedule, checkpoints, resumption);
a stage is added here, not in the loop. Stages 6 and 7 fit their parts on recorded states and bring
their own runners (`training.pointer_fit`, `training.relation_choice_fit`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.training import data
from omg_llava_ros.training.config import TrainConfig
from omg_llava_ros.training.instruction_losses import AttributeHead
from omg_llava_ros.training.instruction_stage import llm_side_parameters, stage1_step, stage2_step
from omg_llava_ros.training.perception_stage import SemanticHead, perception_parameters, stage0_step
from omg_llava_ros.training.refiner_stage import refiner_parameters, stage5_step

Step = Callable[[OmgLlava, np.random.Generator, TrainConfig, "nn.Module | None"], dict[str, float]]


@dataclass(frozen=True)
class Stage:
    """number/name: how the config (`stage{number}_steps`, `_lr`, `_minutes`) and the log name it.
    parameters: what it trains. step: one optimiser step's losses (model, rng, config, auxiliary
    head) → the logged terms. auxiliary: a head trained beside it and saved with its checkpoints
    (None: none). modes: puts the model's parts in train or eval mode. weight_decay: on matrices and
    kernels only. runner: a stage that does not step an optimiser runs this instead."""

    number: int
    name: str
    parameters: Callable[[OmgLlava], list[nn.Parameter]] | None = None
    step: Step | None = None
    auxiliary: Callable[[OmgLlava, TrainConfig], nn.Module | None] | None = None
    modes: Callable[[OmgLlava], None] | None = None
    weight_decay: float = 0.0
    runner: Callable[[OmgLlava, TrainConfig, Path], None] | None = None


# -- stage 0: perception ---------------------------------------------------------------------------
def _perception_step(model: OmgLlava, rng, cfg: TrainConfig, semantic: nn.Module | None) -> dict[str, float]:
    names = model.config.decoder.class_names
    batch = data.perception_batch(rng, cfg.stage0_batch, 256, names, cfg.prompts_per_image)
    return stage0_step(model, batch, cfg, semantic)


def _semantic_head(model: OmgLlava, cfg: TrainConfig) -> nn.Module | None:
    dcfg = model.config.decoder
    return SemanticHead(dcfg.hidden_dim, dcfg.num_classes) if cfg.semantic_weight > 0 else None


def _all_training(model: OmgLlava) -> None:
    model.train()


# -- stages 1-4: the LLM side ----------------------------------------------------------------------
def _projector_parameters(model: OmgLlava) -> list[nn.Parameter]:
    return llm_side_parameters(model, with_llm=False)


def _llm_parameters(model: OmgLlava) -> list[nn.Parameter]:
    return llm_side_parameters(model, with_llm=True)


def _projector_step(model: OmgLlava, rng, cfg: TrainConfig, _: nn.Module | None) -> dict[str, float]:
    return stage1_step(model, rng, cfg)


def _instruction_step(model: OmgLlava, rng, cfg: TrainConfig, _: nn.Module | None) -> dict[str, float]:
    return stage2_step(model, rng, cfg)


def _counting_step(model: OmgLlava, rng, cfg: TrainConfig, _: nn.Module | None) -> dict[str, float]:
    return stage2_step(model, rng, cfg, cfg.stage3_task_weights)


def _fine_tuning_step(model: OmgLlava, rng, cfg: TrainConfig, attributes: nn.Module | None) -> dict[str, float]:
    return stage2_step(
        model,
        rng,
        cfg,
        cfg.stage4_task_weights,
        cfg.stage4_existence,
        cfg.stage4_align_weight,
        attributes,
        cfg.stage4_duplicate_share,
    )


def _attribute_head(model: OmgLlava, cfg: TrainConfig) -> nn.Module | None:
    if cfg.stage4_align_weight > 0 and cfg.align_target == "head":
        return AttributeHead(model.config.language_model.hidden_size)
    return None


def _frozen_perception(model: OmgLlava) -> None:
    model.train()
    model.image_encoder.eval()
    model.omg_decoder.eval()


# -- stage 5: the mask refiner ---------------------------------------------------------------------
def _refiner_step(model: OmgLlava, rng, cfg: TrainConfig, _: nn.Module | None) -> dict[str, float]:
    names = model.config.decoder.class_names
    batch = data.perception_batch(rng, cfg.stage5_batch, 256, names, cfg.prompts_per_image)
    return stage5_step(model, batch, cfg, rng)


def _refiner_only(model: OmgLlava) -> None:
    model.eval()
    model.mask_refiner.train()


# -- stage 6: the location pointer -----------------------------------------------------------------
def _fit_pointer(model: OmgLlava, cfg: TrainConfig, out: Path) -> None:
    from omg_llava_ros.training import pointer_fit

    pointer_fit.run_stage(model, cfg, out)


# -- stage 7: the pointer's explicit relation choice ---------------------------------------------
def _fit_relation_choice(model: OmgLlava, cfg: TrainConfig, out: Path) -> None:
    from omg_llava_ros.training import relation_choice_fit

    relation_choice_fit.run_stage(model, cfg, out)


STAGES: dict[int, Stage] = {
    0: Stage(
        0,
        "perception",
        perception_parameters,
        _perception_step,
        _semantic_head,
        _all_training,
        # Decaying norms, biases and layer scales pulls the residual blocks back towards zero.
        weight_decay=0.05,
    ),
    1: Stage(1, "projectors", _projector_parameters, _projector_step, modes=_frozen_perception),
    2: Stage(2, "instruction tuning", _llm_parameters, _instruction_step, modes=_frozen_perception),
    3: Stage(3, "counting and existence", _llm_parameters, _counting_step, modes=_frozen_perception),
    4: Stage(4, "fine-tuning", _llm_parameters, _fine_tuning_step, _attribute_head, _frozen_perception),
    5: Stage(5, "mask refiner", refiner_parameters, _refiner_step, modes=_refiner_only),
    6: Stage(6, "location pointer", runner=_fit_pointer),
    7: Stage(7, "relation choice", runner=_fit_relation_choice),
}
