"""The training configuration: every stage's steps, learning rates, batches and loss weights."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omg_llava_ros.training import data


@dataclass
class TrainConfig:
    """Every stage's steps, learning rates, batches and loss weights; field names `stage{N}_steps`,
    `stage{N}_lr`, `stage{N}_minutes` are how `trainer.run_stage` finds a stage's. Each stage runs
    a fixed number of steps (the learning-rate schedule follows them), with a wall-clock cap in
    minutes as a safety net; the stage times measured on the 2-core CPU are in
    docs/TRAINING_HISTORY.md (stage 0 about 1.1-2.1 s a step, stage 2 1.25-1.4 s, stage 4 1.6-2 s)."""

    out_dir: str = "runs/embedded"
    seed: int = 0
    stage0_steps: int = 10092
    stage1_steps: int = 250
    stage2_steps: int = 4500
    stage3_steps: int = 1000
    stage4_steps: int = 900
    stage5_steps: int = 600
    stage0_minutes: float = 200.0
    stage1_minutes: float = 15.0
    stage2_minutes: float = 150.0
    stage3_minutes: float = 40.0
    stage4_minutes: float = 30.0
    stage5_minutes: float = 20.0
    stage0_batch: int = 8
    stage1_batch: int = 16
    stage2_batch: int = 48
    stage5_batch: int = 8
    stage5_crop: int = 96
    # Stage 2 asks several questions about each scene: its perception pass (frozen, no gradient)
    # took half of a step's time with one question per scene. `max_text_tokens` > 0 puts them on
    # one LLM row: one copy of the image tokens, each question masked from the others
    # (`build_sequence`), at most that many text tokens a row (0: one row per question). Against 4
    # unpacked questions a scene, more questions a step this way raised counting 0.56 -> 0.77 and
    # region captions by box / mask 0.57 / 0.70 -> 0.75 / 0.93 (captions 0.60 -> 0.52).
    conversations_per_scene: int = 8
    max_text_tokens: int = 320
    stage0_lr: float = 3e-4
    # Stage 0 restarts its cosine schedule (warm restarts) at each `stage0_restarts` step, from that
    # restart's learning rate; () gives one cycle. Each further cycle sharpened small objects: their
    # shapes right 0.875 -> 0.957 -> 0.979 -> 0.988, their recall 0.84 -> 0.87 -> 0.889 -> 0.898
    # (200 fresh scenes each).
    stage0_restarts: tuple[tuple[int, float], ...] = ((5400, 1.5e-4), (7400, 1e-4), (8592, 8e-5))
    stage1_lr: float = 1e-3
    stage2_lr: float = 5e-4
    stage3_lr: float = 3e-4
    stage4_lr: float = 2e-4
    stage5_lr: float = 1e-3
    # Stage 3 (ours; the paper has two): stage 2 again, briefly, with most questions on counting and
    # existence. After stage 2 the LLM still answered "yes." and "one." whatever the scene: judging
    # that nothing (or how many) of the object tokens match needs more such questions than the
    # stage-2 mix gives, and the other tasks keep half their stage-2 rate so that they are not lost.
    stage3_task_weights: dict = field(default_factory=lambda: {**data.TASK_WEIGHTS, "counting": 8.0, "existence": 6.0})
    # Stage 4 (ours): after stages 0-3 the model answered "yes." to every existence question whose colour was on
    # the table (0/22 right when only the colour was, 0/11 when colour and shape were on different
    # objects), though its object tokens carry the shape (a linear probe reads it for 93% of them):
    # it had learnt to judge by the colour alone. So most "no" questions here cannot be answered so.
    stage4_task_weights: dict = field(default_factory=lambda: {**data.TASK_WEIGHTS, "existence": 6.0})
    stage4_existence: data.ExistenceNegatives = data.ExistenceNegatives(confusable=0.4, colour_only=0.4)
    # Share of stage-4 scenes with two objects alike (`data.with_duplicate`), where only positions
    # tell them apart; the task "referring_position" in the weights asks positional expressions.
    # Off in the recipe: 0.3 with "referring_position" at 2 (1500 steps) left referring between
    # objects alike at chance — the frozen decoder cannot place a [SEG] query; the pointer does.
    stage4_duplicate_share: float = 0.0
    # Weight of the `[SEG]` location loss (models with `locate_objects`; `object_location`).
    location_weight: float = 0.5
    location_gate_init: float = 0.2
    # The pointer's relations and anchor (`OmgLlavaConfig.point_relations`) and the weight of
    # the anchor's cross-entropy beside the pointer's (both times `location_weight`).
    point_relations: bool = True
    anchor_weight: float = 0.5
    # Stage 6 (ours, `training.pointer_fit`): the pointer alone, fitted on `stage6_records` questions'
    # recorded states (`stage6_per_form` of each form a scene offers, `stage6_pil_share` of the scenes
    # drawn by the Pillow renderer) for `stage6_steps` of `stage6_batch` at `stage6_lr`.
    stage6_records: int = 20000
    stage6_per_form: dict = field(default_factory=lambda: {5: 4})
    stage6_pil_share: float = 0.3
    stage6_steps: int = 3000
    stage6_batch: int = 64
    stage6_lr: float = 1e-3
    stage6_anchor_weight: float = 1.0
    # Stage 7 (ours, `training.relation_choice_fit`): the pointer's explicit relation choice
    # (`OmgLlavaConfig.relation_shapes` shapes; 0 leaves a model without it), its three heads fitted
    # alone on `stage7_records` questions recorded as stage 6's (the last `stage7_held_out` held out)
    # for `stage7_steps` of `stage6_batch` at `stage7_lr`.
    relation_shapes: int = 0
    stage7_records: int = 8000
    stage7_held_out: int = 1000
    stage7_steps: int = 1500
    stage7_lr: float = 3e-3
    # Tried in stage 4, off in the recipe (weight 0): an auxiliary loss on the object tokens,
    # `align_layer` decoder layers into the LLM, classifying them by shape and colour
    # (`object_alignment_loss`), against the input embeddings of the shape and colour words
    # (`align_target` "words") or with a learned linear head ("head"). At weight 0.5 "words" took
    # existence from 0.78 to 0.83 and cost captions 0.075 and grounded captions 0.055; "head"
    # changed nothing.
    stage4_align_weight: float = 0.0
    align_layer: int = 1
    align_target: str = "words"
    checkpoint_minutes: float = 5.0
    # Shape is the slow attribute to learn (colour comes almost at once); Mask2Former's class
    # weight of 2 left shape near chance after 2400 steps, so the class term is weighted up.
    class_weight: float = 6.0
    # Dense auxiliary loss (training only): every stride-4 pixel classified into its object's
    # colour-shape class by a linear head on the mask features. The class term gives one signal per
    # object; this one asks every pixel of the features for the shape, where the queries (and so
    # the LLM) read it. Its own accuracy is a cheap probe of what the features know.
    semantic_weight: float = 2.0
    # Visual prompts per training image and the weight of their mask loss: at weight 1 (masks
    # weighed 5× less than the panoptic ones) point prompts reached only 0.29 IoU after 2 800 steps.
    prompts_per_image: int = 3
    prompt_weight: float = 5.0
    perception_prior: str = "concat"
    # Stage-2/3 text loss: "sample" averages each answer's tokens, then the answers; "token" averages
    # all answer tokens of the batch. With "token", a one-word answer ("yes.", "two.") weighed
    # about 1/150 of a 32-question batch beside captions and GCG, and existence stayed at chance.
    text_loss: str = "sample"
    # bf16 autocast: None (default) uses it where the CPU computes bf16 natively (avx512_bf16 or
    # AMX; 1.55x faster there than fp32). Elsewhere it is emulated: on an AVX2-only CPU
    # (2026-11-28) a bf16 matmul ran 370x slower than fp32 and a stage-4 step took 20 s, not 1.5.
    bf16: bool | None = None
    threads: int = 2
    stages: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    # A wall-clock budget for the whole run (`train --minutes`), None: the step counts above. Each
    # stage gets its `BUDGET_SHARES` part, measures its pace as it goes and sets its step count (and
    # so its learning-rate schedule) to what fits; stages with no share are skipped.
    budget_minutes: float | None = None
    perception_from: str | None = None  # reuse a trained stage-0 checkpoint (for the ablation)
    # Start from a trained model directory ("embedded": the shipped one) instead of from scratch,
    # for fine-tuning stages (`training.recipe`).
    init_from: str | None = None
    extra: dict = field(default_factory=dict)


def cpu_has_native_bf16() -> bool:
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def uses_bf16(cfg: TrainConfig) -> bool:
    return cpu_has_native_bf16() if cfg.bf16 is None else cfg.bf16


def autocast(cfg: TrainConfig):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=uses_bf16(cfg))


def scalars(**terms: torch.Tensor) -> dict[str, float]:
    """A step's loss terms as plain floats, for the log."""
    return {k: float(v.detach()) for k, v in terms.items()}
