"""Staged training of the embedded OMG-LLaVA on the tabletop world (the paper's recipe at CPU scale).

Stage 0  perception: encoder + OMG decoder for panoptic segmentation (30 colour-shape classes +
         `table`) and interactive segmentation from point, box and mask prompts; then frozen.
Stage 1  projector pretraining (LLM frozen): caption cross-entropy + 10 · MSE query reconstruction
         P_t(P_v(q)) ≈ q on the foreground object queries.
Stage 2  instruction tuning of projectors + LLM (trained fully: ours starts from scratch): answer
         cross-entropy + BCE/Dice on every `[SEG]` mask with deep supervision over the decoder
         layers, and the same `[SEG]` queries on moved frames (follow mode). The questions about one
         scene can share one LLM row (`max_text_tokens`), each question masked from the others.
Stage 3  (ours) stage 2 again, briefly, weighted to counting and existence.
Stage 4  (ours) stage 3 again, briefly, its existence "no" questions mostly about a colour that is
         on the table with a shape that is not, or a colour and a shape on different objects.
Stage 5  (ours) the mask refiner (`mask_refiner`) alone, everything else frozen: the decoder's
         panoptic and visual-prompt masks, refined, against the full-resolution ground truth. It
         depends on the perception module only, so it can run any time after stage 0.
Each stage runs a fixed number of steps, checkpoints every few minutes and resumes from its last
checkpoint; `train()` picks up where an interrupted run stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from omg_llava_ros.model.chat_template import Turn, first_user_text, user_block
from omg_llava_ros.model.config import OmgLlavaConfig, get_config
from omg_llava_ros.model.language_model import add_special_tokens, phrase_spans, train_tokenizer
from omg_llava_ros.model.mask_refiner import FLOOR_LOGIT, crop_box, upsample
from omg_llava_ros.model.omg_decoder import DecoderMemory, DecoderOutput, QueryConstraints, independent_query_sets
from omg_llava_ros.model.omg_llava import IMAGE_PLACEHOLDER, OmgLlava
from omg_llava_ros.model.pixel_shuffle import pixel_shuffle
from omg_llava_ros.model.prompt_encoder import EncodedPrompt
from omg_llava_ros.training import data
from omg_llava_ros.training.losses import (
    SET_BCE_WEIGHT,
    SET_DICE_WEIGHT,
    dice_loss,
    hungarian_match,
    mask_loss,
    resize_masks,
    set_criterion,
)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Each stage runs a fixed number of steps (the learning-rate schedule follows them), with a
    wall-clock cap in minutes as a safety net. On the 2-core CPU the defaults took 65 (stage 0,
    v1/v3, with other work running beside it) + 3 + 94 + 19 minutes (stages 1-3 of v5, 2026-11-28)
    + 14 (stage 4 of v6): a stage-2 step of 48 questions, 8 about each scene packed on one row per
    scene, took 1.1-1.3 s, a stage-4 step about 0.95 s. With the 6-layer LLM of v11 (and [SEG] masks
    decoded per image) stage 2 took 100 min (1.25-1.4 s a step) and stage 3 21 min; v12's stage 4
    30 min (2 s a step) and stage 5 8 min (0.75 s a step). v13's second stage-0 cycle: 2000 steps in
    38 min (1.15 s a step, nothing beside it); stage 4 again on its perception module 1.6 s a step.
    v14's third cycle: 1192 steps in 26 min; stage 4 again 28 min (1.85 s a step), stage 5 10 min.
    v15's fourth: 1500 steps in 29 min; stage 4 again 22 min, stage 5 10 min."""

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
    # (`build_sequence`), at most that many text tokens a row (0: one row per question, v3's path).
    # v3 (4 a scene, 32 a step, unpacked, 3500 + 1500 steps) against v5 (these defaults): counting
    # 0.56 -> 0.77, region captions by box / mask 0.57 / 0.70 -> 0.75 / 0.93, captions 0.60 -> 0.52.
    conversations_per_scene: int = 8
    max_text_tokens: int = 320
    stage0_lr: float = 3e-4
    # Stage 0 restarts its cosine schedule (warm restarts) at each `stage0_restarts` step, from that
    # restart's learning rate; () gives one cycle. v15's perception module is v1's 5400 steps, then
    # a cycle of 2000 at 1.5e-4 (v13: small objects' shapes 0.875 -> 0.957 right, their recall
    # 0.84 -> 0.87, captions spelled right by `perceive`'s labels 0.63 -> 0.745), one of 1192 at
    # 1e-4 (v14: 0.979, 0.889, 0.78) and one of 1500 at 8e-5 (v15: 0.988, 0.898, 0.82; 200 fresh
    # scenes each).
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
    # Stage 4 (ours): v5 (stages 0-3) answered "yes." to every existence question whose colour was on
    # the table (0/22 right when only the colour was, 0/11 when colour and shape were on different
    # objects), though its object tokens carry the shape (a linear probe reads it for 93% of them):
    # it had learnt to judge by the colour alone. So most "no" questions here cannot be answered so.
    stage4_task_weights: dict = field(default_factory=lambda: {**data.TASK_WEIGHTS, "existence": 6.0})
    stage4_existence: data.ExistenceNegatives = data.ExistenceNegatives(confusable=0.4, colour_only=0.4)
    # Share of stage-4 scenes with two objects alike (`data.with_duplicate`), where only positions
    # tell them apart; the task "referring_position" in the weights asks positional expressions.
    # Off in the recipe: 0.3 with "referring_position" at 2 on v15 (1500 steps) left referring
    # between objects alike at chance (README) — the frozen decoder cannot place a [SEG] query.
    stage4_duplicate_share: float = 0.0
    # Weight of the `[SEG]` location loss (models with `locate_objects`; `object_location`).
    location_weight: float = 0.5
    location_gate_init: float = 0.2
    # The pointer's relations and anchor (`OmgLlavaConfig.point_relations`, v22) and the weight of
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
    # Tried in stage 4, off in the recipe (weight 0): an auxiliary loss on the object tokens,
    # `align_layer` decoder layers into the LLM, classifying them by shape and colour
    # (`object_alignment_loss`), against the input embeddings of the shape and colour words
    # (`align_target` "words") or with a learned linear head ("head"). At weight 0.5 on v5, "words"
    # took existence from 0.78 to 0.83 and cost captions 0.075 and grounded captions 0.055; "head"
    # changed nothing (README).
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


# -- helpers ---------------------------------------------------------------------------------------
def to_encoded(prompt) -> EncodedPrompt:
    """A toyworld VisualPrompt (image pixels) → model-input prompt; the embedded model's input is the
    native square image, so the coordinates are the same."""
    if prompt.kind == "point":
        return EncodedPrompt("point", point=tuple(float(v) for v in prompt.point))
    if prompt.kind == "box":
        return EncodedPrompt("box", box=tuple(float(v) for v in prompt.box))
    return EncodedPrompt("mask", mask=np.asarray(prompt.mask, bool))


def select_memory(memory: DecoderMemory, index: torch.Tensor | slice) -> DecoderMemory:
    """The memory of the images `index` picks: a tensor of indices copies, a slice gives views."""
    return replace(memory, mask_features=memory.mask_features[index], memories=[m[index] for m in memory.memories])


def pixels_of(model: OmgLlava, images: list[np.ndarray]) -> torch.Tensor:
    return torch.cat([model.preprocess(img)[0] for img in images])


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


# Parts of `TrainConfig.budget_minutes` per stage: about the default recipe's split (perception,
# then instruction tuning, carry the quality), without stage 3, whose counting and existence
# questions stage 4's mix also asks.
BUDGET_SHARES = {0: 0.45, 1: 0.03, 2: 0.40, 3: 0.0, 4: 0.08, 5: 0.04, 6: 0.0}
# A budgeted stage measures its pace from its PACE_FROM-th step on (the first ones are slow) and
# fits its step count FIRST_FIT steps later, then again every REFIT_EVERY steps over all steps
# measured: the 90-minute run's stage 0 went 2.45 s a step over its first steps and 2.1 on
# average, and a single early fit left 5.6 of its 40.5 minutes unused.
PACE_FROM, FIRST_FIT, REFIT_EVERY = 5, 20, 100


def budgeted_steps(step: int, spent: float, pace: float, minutes: float, most: int) -> int:
    """Total steps of a stage that has spent `spent` s at `step`, going `pace` s a step, so that it
    ends within `minutes` (never more than `most`, never fewer than it has run)."""
    return max(step, min(most, step + int((minutes * 60 - spent) / pace)))


def cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def stage_lr(cfg: TrainConfig, stage: int, step: int, total: int | None = None) -> float:
    """The learning rate of `stage` at `step`: one warmup + cosine cycle over the stage's `total`
    steps (default: its configured steps); for stage 0 a new cycle starts at each of
    `stage0_restarts` before the last step, from its own rate."""
    total = total if total is not None else getattr(cfg, f"stage{stage}_steps")
    base = getattr(cfg, f"stage{stage}_lr")
    starts = [(0, base)]
    if stage == 0:
        starts += sorted((s, lr) for s, lr in cfg.stage0_restarts if 0 < s < total)
    ends = [s for s, _ in starts[1:]] + [total]
    cycle = next((i for i, end in enumerate(ends) if step < end), len(ends) - 1)
    (start, lr), end = starts[cycle], ends[cycle]
    return cosine_lr(step - start, end - start, lr)


class Clock:
    """Wall-clock time spent in a stage, across resumptions."""

    def __init__(self, minutes: float, spent: float = 0.0):
        self.budget = minutes * 60
        self.start = time.monotonic() - spent

    @property
    def spent(self) -> float:
        return time.monotonic() - self.start

    def done(self) -> bool:
        return self.spent >= self.budget


# -- checkpoints -----------------------------------------------------------------------------------
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


# -- model construction ----------------------------------------------------------------------------
def build_model(cfg: TrainConfig, out: Path) -> OmgLlava:
    """The embedded config with a tokenizer trained on the world's questions and answers, or with
    `init_from` that model directory's weights, tokenizer and config (its pointer given relations
    when `point_relations`, their weights at zero)."""
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
    config.language_model.vocab_size = rows
    torch.manual_seed(cfg.seed)
    model = OmgLlava(config, tokenizer=tokenizer)
    model._init_class_embed()
    if model.object_location is not None:
        # From zero the gate hardly moves (`object_location`): start it where v17's did.
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
    torch.manual_seed(cfg.seed)
    model = OmgLlava(config, tokenizer=base.tokenizer, llm=base.llm)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    new = {k for k in missing if k.startswith(("object_location.anchor_", "object_location.relation."))}
    if unexpected or set(missing) - new:
        raise ValueError(
            f"{cfg.init_from}: does not fit the model: missing {sorted(set(missing) - new)}, unexpected {unexpected}"
        )
    if not (out / "tokenizer").is_dir():
        base.tokenizer.save_pretrained(out / "tokenizer")
    return model


# -- stage 0: perception ---------------------------------------------------------------------------
PERCEPTION_PREFIXES = ("image_encoder.", "omg_decoder.")


def perception_parameters(model: OmgLlava) -> list[torch.nn.Parameter]:
    return list(model.image_encoder.parameters()) + list(model.omg_decoder.parameters())


class SemanticHead(torch.nn.Module):
    """Training-only: per-pixel class logits (B, K, h, w) from the stride-4 mask features (B, C, h, w).
    A linear map on purpose, so that the features themselves must separate the classes."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.proj = torch.nn.Conv2d(dim, num_classes, 1)

    def forward(self, mask_features: torch.Tensor) -> torch.Tensor:
        return self.proj(mask_features)


def semantic_targets(targets: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> torch.Tensor:
    """[(labels (M,), soft masks (M, P))] → (B, K, P) per-pixel class distributions."""
    out = torch.zeros(len(targets), num_classes, targets[0][1].shape[-1])
    for b, (labels, masks) in enumerate(targets):
        out[b].index_add_(0, labels, masks)
    return out / out.sum(1, keepdim=True).clamp(min=1e-6)


def semantic_loss(logits: torch.Tensor, targets: torch.Tensor, background_weight: float = 0.1) -> torch.Tensor:
    """Soft-target cross-entropy per pixel: logits (B, K, h, w), targets (B, K, h·w), the last class
    the table. Table pixels weigh `background_weight`: objects cover a tenth of an image, and an
    unweighted loss is met by calling everything table."""
    logp = F.log_softmax(logits.float().flatten(2), dim=1)
    ce = -(targets * logp).sum(1)
    weight = 1 - (1 - background_weight) * targets[:, -1]
    return (ce * weight).sum() / weight.sum()


def decode_with_prompts(
    model: OmgLlava, memory: DecoderMemory, prompts: list[data.PromptTarget], joint: bool = True, **decode_options
) -> tuple[DecoderOutput, list[torch.Tensor]]:
    """The panoptic queries of every image of `memory` and the visual prompts on them, in one decoder
    pass: each image's prompts ride beside its panoptic queries, each seeing only itself in
    self-attention (`independent_query_sets`), which decodes it exactly as alone. One prompt a batch
    row instead would copy its image's memory per prompt and its mask logits' backward would be an
    outer product per prompt: a third of a stage-0 step.

    Returns the panoptic output (the panoptic queries only) and, per prediction, the prompts' mask
    logits (P, 1, h, w) in the order of `prompts`. `joint=False` decodes them as inference does, a
    prompt a batch row (the same figures, slower; `bench --training` compares the two)."""
    dec = model.omg_decoder
    batch = memory.mask_features.shape[0]
    query, query_pos = dec.panoptic_queries(batch)
    if not prompts:
        return dec.decode(query, query_pos, memory, **decode_options), []
    encoded = [to_encoded(p.prompt) for p in prompts]
    pq, ppos = model.prompt_encoder.queries(encoded)
    pc = model.prompt_encoder.constraints(encoded, memory.level_shapes)
    image = torch.tensor([p.image_index for p in prompts])
    if not joint:
        out = dec.decode(query, query_pos, memory, **decode_options)
        return out, dec.decode(pq, ppos, select_memory(memory, image), pc).mask_logits
    shared = query.shape[1]
    slots, counts = [], [0] * batch  # each prompt's place among its image's prompts
    for i in image.tolist():
        slots.append(counts[i])
        counts[i] += 1
    slot, width = torch.tensor(slots), max(counts)

    def per_image(values: torch.Tensor, fill) -> torch.Tensor:
        """(P, 1, ...) per prompt → (B, width, ...) per image slot; unused slots hold `fill`."""
        out = values.new_full((batch, width, *values.shape[2:]), fill)
        out[image, slot] = values[:, 0]
        return out

    # Panoptic queries: everything allowed, attention from their own predictions.
    allowed = [torch.cat([a.new_ones(batch, shared, a.shape[-1]), per_image(a, True)], 1) for a in pc.allowed]
    use_prediction = torch.cat([pc.use_prediction.new_ones(batch, shared), per_image(pc.use_prediction, True)], 1)
    out = dec.decode(
        torch.cat([query, per_image(pq, 0.0)], 1),
        torch.cat([query_pos, per_image(ppos, 0.0)], 1),
        memory,
        QueryConstraints(allowed, use_prediction),
        self_blocked=independent_query_sets(shared, width, device=query.device),
        **decode_options,
    )
    panoptic = DecoderOutput(
        [m[:, :shared] for m in out.mask_logits],
        out.query[:, :shared],
        class_logits=None if out.class_logits is None else out.class_logits[:, :shared],
        iou=None if out.iou is None else out.iou[:, :shared],
        class_logits_per_layer=None
        if out.class_logits_per_layer is None
        else [c[:, :shared] for c in out.class_logits_per_layer],
    )
    return panoptic, [m[image, shared + slot][:, None] for m in out.mask_logits]


def stage0_step(
    model: OmgLlava,
    batch: data.PerceptionBatch,
    cfg: TrainConfig,
    semantic: SemanticHead | None = None,
    joint_prompts: bool = True,
) -> dict[str, float]:
    enc, dec = model.image_encoder, model.omg_decoder
    pixels = pixels_of(model, batch.images)
    with autocast(cfg):
        memory = dec.encode_memory(enc(pixels))
        out, prompt_masks = decode_with_prompts(model, memory, batch.prompts, joint_prompts, class_per_layer=True)
        size = tuple(memory.mask_features.shape[-2:])
        targets = [(torch.as_tensor(t.labels), resize_masks(t.masks, size).flatten(1)) for t in batch.targets]
        loss_set = set_criterion(out.class_logits_per_layer, out.mask_logits, targets, cfg.class_weight)
        loss_sem = memory.mask_features.new_zeros((), dtype=torch.float32)
        if semantic is not None:
            sem_targets = semantic_targets(targets, model.config.decoder.num_classes)
            loss_sem = semantic_loss(semantic(memory.mask_features), sem_targets)

        gt = resize_masks(np.stack([p.mask for p in batch.prompts]), size).flatten(1)
        loss_prompt = mask_loss(prompt_masks, gt) / len(prompt_masks)
        loss = loss_set + cfg.prompt_weight * loss_prompt + cfg.semantic_weight * loss_sem
    loss.backward()
    return scalars(loss=loss, set=loss_set, prompt=loss_prompt, semantic=loss_sem)


# -- stages 1 and 2: the LLM side ------------------------------------------------------------------
@dataclass
class VisualBatch:
    """Frozen perception outputs of a batch, and what the projectors need."""

    memory: DecoderMemory
    shuffled: torch.Tensor  # (B, T, 4·C4)
    prior: object  # PerceptionPrior
    object_masks: list[torch.Tensor] | None = None  # per image (n_b, h, w) mask logits of its object tokens


@torch.no_grad()
def encode_batch(model: OmgLlava, images: list[np.ndarray]) -> DecoderMemory:
    """The frozen decoder memory of `images`, without the panoptic pass (what follow frames need)."""
    return model.omg_decoder.encode_memory(model.image_encoder(pixels_of(model, images)))


@torch.no_grad()
def perceive_batch(model: OmgLlava, images: list[np.ndarray]) -> VisualBatch:
    enc, dec = model.image_encoder, model.omg_decoder
    pixels = pixels_of(model, images)
    feats = enc(pixels)
    memory = dec.encode_memory(feats)
    q, pos = dec.panoptic_queries(len(images))
    out = dec.decode(q, pos, memory, with_class=True)
    ratio = model.config.pixel_shuffle_ratio
    prior = model.perception_prior(out, pos, feats[-1].shape[-1] // ratio)
    return VisualBatch(memory, pixel_shuffle(feats[-1], ratio), prior, prior.object_masks)


def visual_tokens(model: OmgLlava, vb: VisualBatch, i: int) -> torch.Tensor:
    proj = model.visual_projector
    pixel = proj.pixel_tokens(vb.shuffled[i : i + 1], vb.prior.pixel_prior[i : i + 1])[0]
    return proj.image_sequence(pixel, proj.object_tokens(model.object_queries(vb.prior, i)))


@torch.no_grad()
def prompt_queries(model: OmgLlava, memory: DecoderMemory, i: int, prompts) -> torch.Tensor | None:
    """Decoded visual-prompt queries [feature; position] (N, 2C) of image i (frozen decoder)."""
    if not prompts:
        return None
    encoded = [to_encoded(p) for p in prompts]
    pe = model.prompt_encoder
    q, pos = pe.queries(encoded)
    out = model.omg_decoder.decode(
        q, pos, select_memory(memory, slice(i, i + 1)), pe.constraints(encoded, memory.level_shapes)
    )
    return torch.cat([out.query, pos], dim=-1)[:, 0]


@dataclass
class Sequence_:
    """One LLM training row: a scene's image prefix, then one or more questions with their answers.
    Each question sees the prefix and itself only (`segments`), at the positions it would have
    alone (`positions`): the loss is that of separate single-turn sequences, and the image tokens,
    ~80 of a short question's ~100, run once for all of them."""

    embeds: torch.Tensor  # (L, H)
    labels: torch.Tensor  # (L,) -100 outside the answers
    answer_index: torch.Tensor  # (L,) which answer each label belongs to, -1 outside the answers
    segments: torch.Tensor  # (L,) -1 for the shared prefix, k for question k's tokens
    positions: torch.Tensor  # (L,) position ids
    seg_positions: list[int]  # positions whose input token is [SEG], over all answers
    seg_answer: list[int]  # the answer each of those belongs to
    image_index: int
    target_masks: list[np.ndarray]
    object_positions: list[int] = field(default_factory=list)  # where the object tokens sit in the row
    anchor_masks: list[np.ndarray | None] = field(default_factory=list)  # per [SEG]: a form-5 anchor's mask
    phrase_spans: list[tuple[int, int]] = field(default_factory=list)  # per [SEG]: its phrase's positions


def build_sequence(model: OmgLlava, vb: VisualBatch, i: int, samples) -> Sequence_:
    """Questions about scene i packed on one shared image prefix (`<s><|im_start|>user\n<image>`).
    Answers whose [SEG] count does not match their masks get no mask loss (the official code drops
    such samples too)."""
    tok, tokens = model.tokenizer, model.tokens
    samples = samples if isinstance(samples, (list, tuple)) else [samples]
    prefix: list[int] | None = None
    turns: list[tuple[list[int], int]] = []  # (question + answer ids after the image, answer length)
    for sample in samples:
        ids = model.conversation_ids([Turn(first_user_text(sample.question))])
        cut = ids.index(IMAGE_PLACEHOLDER) + 1
        if prefix is None:
            prefix = ids[:cut]
        elif ids[:cut] != prefix:
            raise ValueError("the questions of one sequence must share the text before the image")
        answer = tok.encode(sample.answer, add_special_tokens=False) + [tokens.im_end]
        turns.append((ids[cut:] + answer, len(answer)))
    ids = prefix + [t for body, _ in turns for t in body]
    prompts = [p for sample in samples for p in sample.prompts]
    pq = prompt_queries(model, vb.memory, i, prompts)
    prompt_embeds = model.visual_projector.object_tokens(pq) if pq is not None else None
    state = SimpleNamespace(visual_tokens=visual_tokens(model, vb, i))
    ids_t = torch.tensor(ids)
    embeds = model.embed_ids(ids_t, state, prompt_embeds)
    shift = embeds.shape[0] - len(ids)  # the image placeholder expanded to the visual tokens
    n_prefix = len(prefix) + shift
    length = embeds.shape[0]
    labels = torch.full((length,), -100, dtype=torch.long)
    answer_index = torch.full((length,), -1, dtype=torch.long)
    segments = torch.full((length,), -1, dtype=torch.long)
    positions = torch.arange(length)
    seg_positions: list[int] = []
    seg_answer: list[int] = []
    masks: list[np.ndarray] = []
    anchors: list[np.ndarray | None] = []
    spans: list[tuple[int, int]] = []
    start = n_prefix  # where this turn starts in the expanded row
    for k, ((body, n_answer), sample) in enumerate(zip(turns, samples, strict=True)):
        end = start + len(body)
        segments[start:end] = k
        positions[start:end] = torch.arange(n_prefix, n_prefix + len(body))
        a = end - n_answer  # first answer token
        answer = ids_t[a - shift : end - shift]
        # Position p predicts token p + 1: the last question token predicts the first answer token.
        labels[a - 1 : end - 1] = answer
        answer_index[a - 1 : end - 1] = k
        segs = (torch.nonzero(answer == tokens.seg).flatten() + a).tolist()
        if len(segs) == len(sample.target_masks):
            spans += [
                (first + a, last + a)
                for first, last in phrase_spans(
                    answer.tolist(), [p - a for p in segs], (tokens.phrase_start, tokens.phrase_end)
                )
            ]
            seg_positions += segs
            seg_answer += [k] * len(segs)
            masks += list(sample.target_masks)
            anchors += list(sample.anchor_masks) or [None] * len(segs)
        start = end
    n_objects = len(vb.prior.object_tokens[i])
    first_object = prefix.index(IMAGE_PLACEHOLDER) + shift + 1 - n_objects  # the image's last n tokens
    objects = list(range(first_object, first_object + n_objects))
    return Sequence_(
        embeds, labels, answer_index, segments, positions, seg_positions, seg_answer, i, masks, objects, anchors, spans
    )


def run_llm(model: OmgLlava, seqs: list[Sequence_], layer: int | None = None):
    """Right-padded batch → (B, L, H) final-norm hidden states, (B, L) labels, (B, L) answer index,
    and with `layer` the (B, L, H) residual stream after that many decoder layers as a fourth.
    Attention: causal, within the shared prefix and the token's own question; padding sees itself."""
    length = max(s.embeds.shape[0] for s in seqs)
    hidden = seqs[0].embeds.shape[-1]
    embeds = seqs[0].embeds.new_zeros(len(seqs), length, hidden)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    groups = torch.full((len(seqs), length), -1, dtype=torch.long)
    segments = torch.full((len(seqs), length), -2, dtype=torch.long)  # -2: padding
    positions = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        n = s.embeds.shape[0]
        embeds[b, :n], labels[b, :n], groups[b, :n] = s.embeds, s.labels, s.answer_index
        segments[b, :n], positions[b, :n] = s.segments, s.positions
    index = torch.arange(length)
    causal = index[None, :] <= index[:, None]
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & (((key == -1) & (query != -2)) | (key == query))
    out = model.llm.base_model(
        inputs_embeds=embeds,
        attention_mask=allowed[:, None],
        position_ids=positions,
        output_hidden_states=layer is not None,
    )
    if layer is not None:
        return out.last_hidden_state, labels, groups, out.hidden_states[layer]
    return out.last_hidden_state, labels, groups


def answer_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sample", groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of (B, L, V) logits on (B, L) labels (-100 outside the answers), averaged over
    all answer tokens ("token") or per answer, then over answers ("sample"). `groups` (B, L) numbers
    the answers within a row (several turns per row); without it each row is one answer."""
    if reduction == "token":
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    if reduction != "sample":
        raise ValueError(f"text_loss must be 'sample' or 'token', not {reduction!r}")
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    valid = labels != -100
    if groups is None:
        groups = torch.zeros_like(labels)
    width = int(groups.max()) + 1 if valid.any() else 1
    key = (torch.arange(len(labels))[:, None] * width + groups.clamp(min=0))[valid]
    sums = per_token.new_zeros(len(labels) * width).index_add(0, key, per_token[valid])
    counts = per_token.new_zeros(len(labels) * width).index_add(0, key, torch.ones_like(per_token[valid]))
    has = counts > 0
    return (sums[has] / counts[has]).mean()


def seg_loss(model: OmgLlava, memory: DecoderMemory, seqs: list[Sequence_], hidden: torch.Tensor):
    """BCE + Dice over all decoder predictions for every `[SEG]` of `seqs` (rows of `hidden`), their
    images' decoder memory `memory`."""
    states, index, targets = [], [], []
    for b, s in enumerate(seqs):
        for pos, mask in zip(s.seg_positions, s.target_masks, strict=True):
            states.append(hidden[b, pos])
            index.append(s.image_index)
            targets.append(mask)
    if not states:
        return hidden.new_zeros(()), None
    q, pos = model.text_projector(torch.stack(states))
    size = tuple(memory.mask_features.shape[-2:])
    # One decoder pass per image, its [SEG] queries as a batch over that image's memory (batch 1,
    # broadcast): the memory's keys and values are projected once per image, not once per [SEG].
    # A query decodes alone either way (batch rows do not attend to each other).
    index_t = torch.tensor(index)
    order, per_image = [], []
    for image in sorted(set(index)):
        rows = torch.nonzero(index_t == image).flatten()
        order.append(rows)
        per_image.append(
            model.omg_decoder.decode(
                q[rows, None], pos[rows, None], select_memory(memory, slice(image, image + 1))
            ).mask_logits
        )
    mask_logits = [torch.cat(layer) for layer in zip(*per_image, strict=True)]  # rows in `order`
    gt = resize_masks(np.stack(targets), size).flatten(1)[torch.cat(order)]
    return mask_loss(mask_logits, gt) / len(mask_logits), (q, pos)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, h, w) and (m, h, w) bool masks → (n, m) IoU (0 where both are empty)."""
    inter = (a[:, None] & b[None]).flatten(2).sum(-1).float()
    union = (a[:, None] | b[None]).flatten(2).sum(-1).float()
    return inter / union.clamp(min=1)


def _best_tokens(masks: torch.Tensor, wanted: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, h, w) bool token masks, m ground-truth masks → (m,) the token overlapping each most and
    (m,) whether that overlap is IoU ≥ 0.5."""
    targets = resize_masks(np.stack(wanted), tuple(masks.shape[-2:])) > 0.5
    best_iou, best = pairwise_iou(targets, masks).max(-1)
    return best, best_iou >= 0.5


def location_loss(
    model: OmgLlava, vb: VisualBatch, seqs: list[Sequence_], hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each `[SEG]` state's pointer over its image's object tokens (`object_location`),
    towards the token whose mask overlaps the target most (IoU ≥ 0.5; other `[SEG]`s are skipped),
    and, with relations, of its anchor attention towards a form-5 expression's anchor token; zeros
    for a model without the head or a batch without such a `[SEG]`."""
    zero = hidden.new_zeros((), dtype=torch.float32)
    head = model.object_location
    if head is None:
        return zero, zero
    total, count, anchor_total, anchor_count = zero, 0, zero, 0
    for b, s in enumerate(seqs):
        masks = vb.object_masks[s.image_index] >= 0  # (n, h, w) the object tokens' masks
        if not s.seg_positions or len(masks) == 0:
            continue
        best, keep = _best_tokens(masks, s.target_masks)
        if not keep.any():
            continue
        centroids = vb.prior.object_centroids[s.image_index]
        areas = vb.prior.object_areas[s.image_index] if vb.prior.object_areas is not None else None
        seg, objects = hidden[b, s.seg_positions], hidden[b, s.object_positions]
        phrase = torch.stack([hidden[b, first:last].mean(0) for first, last in s.phrase_spans])
        scores = head.point(seg, objects, centroids, areas, phrase)
        total = total + F.cross_entropy(scores.float()[keep], best[keep], reduction="sum")
        count += int(keep.sum())
        named = [i for i, m in enumerate(s.anchor_masks) if m is not None]
        if head.relations and named:
            anchor, found = _best_tokens(masks, [s.anchor_masks[i] for i in named])
            if found.any():
                logits = head.anchor_scores(phrase[named], objects).float()[found]
                anchor_total = anchor_total + F.cross_entropy(logits, anchor[found], reduction="sum")
                anchor_count += int(found.sum())
    return total / max(count, 1), anchor_total / max(anchor_count, 1)


@torch.no_grad()
def object_attribute_labels(object_masks: torch.Tensor, rendered) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, h, w) mask logits of an image's object tokens and its ground truth → (n,) shape and (n,)
    colour indices (toyworld order) of the object each token covers (mask IoU > 0.5), else -100."""
    from omg_llava_ros.toyworld import COLORS, SHAPES

    pred = object_masks.float() >= 0
    gt = resize_masks(np.stack([o.mask for o in rendered.objects]), tuple(pred.shape[-2:])) >= 0.5
    best, which = pairwise_iou(pred, gt).max(1)  # a scene has at least one object
    shapes = torch.tensor([SHAPES.index(o.shape) for o in rendered.objects], dtype=torch.long)[which]
    colours = torch.tensor([list(COLORS).index(o.color) for o in rendered.objects], dtype=torch.long)[which]
    shapes[best <= 0.5] = -100
    colours[best <= 0.5] = -100
    return shapes, colours


def word_alignment_loss(model: OmgLlava, states: torch.Tensor, labels: torch.Tensor, words: list[str]) -> torch.Tensor:
    """Cross-entropy of (N, H) residual states on (N,) labels (-100: none), the logits being the cosine
    similarities (× 10) with the input embeddings of `words` (one token each)."""
    ids = [model.tokenizer.encode(" " + w, add_special_tokens=False) for w in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"every word must be one token: {dict(zip(words, ids, strict=True))}")
    table = model.llm.get_input_embeddings().weight[torch.tensor([i[0] for i in ids])]
    logits = 10 * F.normalize(states.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T
    if not (labels != -100).any():
        return logits.sum() * 0
    return F.cross_entropy(logits, labels, ignore_index=-100)


class AttributeHead(torch.nn.Module):
    """Training-only: shape (5) and colour (6) logits of an LLM residual state at an object token."""

    def __init__(self, hidden: int):
        super().__init__()
        self.shape = torch.nn.Linear(hidden, 5)
        self.colour = torch.nn.Linear(hidden, 6)


def object_alignment_loss(
    model: OmgLlava,
    vb: VisualBatch,
    seqs: list[Sequence_],
    chunks,
    batch,
    early: torch.Tensor,
    head: AttributeHead | None = None,
) -> torch.Tensor:
    """The object tokens of every row, read from the residual stream `early` (B, L, H), classified
    by shape and by colour (averaged): by `head`, or without one by their cosine similarity with
    the input embeddings of the shape and colour words. Each scene counts once per row it prefixes."""
    from omg_llava_ros.toyworld import COLORS, SHAPES

    states, shapes, colours = [], [], []
    for b, (seq, (scene, rows)) in enumerate(zip(seqs, chunks, strict=True)):
        shape, colour = object_attribute_labels(vb.object_masks[scene], batch[rows[0]].rendered)
        states.append(early[b, seq.object_positions])
        shapes.append(shape)
        colours.append(colour)
    states = torch.cat(states)
    if head is not None:
        shape, colour = torch.cat(shapes), torch.cat(colours)
        if not (shape != -100).any():
            return states.sum() * 0
        return 0.5 * (
            F.cross_entropy(head.shape(states.float()), shape, ignore_index=-100)
            + F.cross_entropy(head.colour(states.float()), colour, ignore_index=-100)
        )
    return 0.5 * (
        word_alignment_loss(model, states, torch.cat(shapes), list(SHAPES))
        + word_alignment_loss(model, states, torch.cat(colours), list(COLORS))
    )


def llm_side_parameters(model: OmgLlava, with_llm: bool) -> list[torch.nn.Parameter]:
    params = list(model.visual_projector.parameters()) + list(model.text_projector.parameters())
    if model.object_location is not None:
        params += list(model.object_location.parameters())
    if with_llm:
        params += list(model.llm.parameters())
    return params


def stage1_step(model: OmgLlava, rng, cfg: TrainConfig) -> dict[str, float]:
    batch = data.conversation_batch(rng, cfg.stage1_batch, 256, tasks=("caption",))
    vb = perceive_batch(model, [c.image for c in batch])
    with autocast(cfg):
        seqs = [build_sequence(model, vb, i, c.sample) for i, c in enumerate(batch)]
        hidden, labels, _ = run_llm(model, seqs)
        logits = model.llm.get_output_embeddings()(hidden).float()
        ce = answer_loss(logits, labels, "token")  # captions only: their tokens weigh alike
        queries = torch.cat(vb.prior.object_tokens)
        recon = model.text_projector.model(model.visual_projector.object_tokens(queries))
        reg = 10 * F.mse_loss(recon.float(), queries.float())
        loss = ce + reg
    loss.backward()
    return scalars(loss=loss, ce=ce, reg=reg)


def moved_copy(rng, rendered, steps: int):
    """The same scene after `steps` frames of motion, with masks for every object."""
    from omg_llava_ros.toyworld import render, step_scene

    scene = rendered.scene
    n = len(scene.objects)
    velocity = rng.uniform(-4, 4, (n, 2))
    spin = rng.uniform(-10, 10, n)
    for _ in range(steps):
        scene = step_scene(rng, scene, velocity, spin)
    return render(scene, size=rendered.size, rng=rng)


def pack_turns(model: OmgLlava, samples, keys: list, budget: int) -> list[list]:
    """Split one scene's questions into rows of at most `budget` text tokens each (the image tokens
    come on top), keeping their order; returns `keys` grouped the same way. A budget of 0 or less
    gives one row per question without tokenizing anything (the default recipe)."""
    if budget <= 0:
        return [[key] for key in keys]
    tok = model.tokenizer
    groups: list[list] = []
    used = 0
    for key, sample in zip(keys, samples, strict=True):
        n = len(tok.encode(user_block(sample.question) + sample.answer, add_special_tokens=False)) + 2
        if not groups or used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += n
    return groups


def plan_conversations(model: OmgLlava, batch, scene_of: list[int], cfg: TrainConfig) -> list[tuple[int, list[int]]]:
    """Which questions of a batch share a training row: [(scene, [question indices])], the questions
    about a scene on one image prefix, split where they would pass `cfg.max_text_tokens`."""
    chunks: list[tuple[int, list[int]]] = []
    for scene in sorted(set(scene_of)):
        rows = [i for i, s in enumerate(scene_of) if s == scene]
        samples = [batch[i].sample for i in rows]
        chunks += [(scene, part) for part in pack_turns(model, samples, rows, cfg.max_text_tokens)]
    return chunks


def stage2_step(
    model: OmgLlava,
    rng,
    cfg: TrainConfig,
    task_weights: dict | None = None,
    negatives: data.ExistenceNegatives | None = None,
    align_weight: float = 0.0,
    attributes: AttributeHead | None = None,
    duplicate_share: float = 0.0,
) -> dict[str, float]:
    batch = data.conversation_batch(
        rng,
        cfg.stage2_batch,
        256,
        per_scene=cfg.conversations_per_scene,
        weights=task_weights,
        negatives=negatives or data.ExistenceNegatives(),
        duplicate_share=duplicate_share,
    )
    images, scene_of = data.scene_index(batch)
    vb = perceive_batch(model, images)
    # Follow mode: referring samples also get a moved frame; their [SEG] query must find the object there.
    follow = [
        (i, moved_copy(rng, c.rendered, int(rng.integers(1, 10))))
        for i, c in enumerate(batch)
        if c.sample.task == "referring_segmentation" and rng.random() < 0.5
    ]
    chunks = plan_conversations(model, batch, scene_of, cfg)
    with autocast(cfg):
        seqs = [build_sequence(model, vb, scene, [batch[i].sample for i in rows]) for scene, rows in chunks]
        if align_weight > 0:
            hidden, labels, groups, early = run_llm(model, seqs, layer=cfg.align_layer)
        else:
            hidden, labels, groups = run_llm(model, seqs)
        logits = model.llm.get_output_embeddings()(hidden).float()
        ce = answer_loss(logits, labels, cfg.text_loss, groups)
        loss_seg, _ = seg_loss(model, vb.memory, seqs, hidden)
        loss_location, loss_anchor = location_loss(model, vb, seqs, hidden)
        loss_align = hidden.new_zeros((), dtype=torch.float32)
        if align_weight > 0:
            loss_align = object_alignment_loss(model, vb, seqs, chunks, batch, early, attributes)
        loss_follow = hidden.new_zeros(())
        where = {i: (row, k) for row, (_, rows) in enumerate(chunks) for k, i in enumerate(rows)}
        fseqs, frows, fimages = [], [], []
        for i, moved in follow:
            row, k = where[i]
            seq = seqs[row]
            positions = [p for p, a in zip(seq.seg_positions, seq.seg_answer, strict=True) if a == k]
            if len(positions) != 1:
                continue
            obj = batch[i].sample.object_ids[0]
            fseqs.append(
                replace(seq, seg_positions=positions, image_index=len(fimages), target_masks=[moved.objects[obj].mask])
            )
            frows.append(row)
            fimages.append(moved.image)
        if fseqs:
            loss_follow, _ = seg_loss(model, encode_batch(model, fimages), fseqs, hidden[torch.tensor(frows)])
        loss = (
            ce
            + loss_seg
            + 0.5 * loss_follow
            + align_weight * loss_align
            + cfg.location_weight * (loss_location + cfg.anchor_weight * loss_anchor)
        )
    loss.backward()
    return scalars(
        loss=loss, ce=ce, seg=loss_seg, follow=loss_follow, align=loss_align, location=loss_location, anchor=loss_anchor
    )


# -- stage 5: the mask refiner ---------------------------------------------------------------------
def refiner_parameters(model: OmgLlava) -> list[torch.nn.Parameter]:
    if model.mask_refiner is None:
        raise ValueError("stage 5 trains the mask refiner, and this model's config has none")
    return list(model.mask_refiner.parameters())


@torch.no_grad()
def decoded_masks(model: OmgLlava, batch: data.PerceptionBatch, pixels: torch.Tensor):
    """The frozen decoder's masks of a perception batch, as the refiner meets them: the panoptic
    queries matched to the ground truth (objects and table) and the visual prompts. Returns, per image,
    (mask logits (n, h, w), ground truth (n, S, S) float)."""
    dec = model.omg_decoder
    memory = dec.encode_memory(model.image_encoder(pixels))
    out, prompt_masks = decode_with_prompts(model, memory, batch.prompts, with_class=True)
    size = tuple(memory.mask_features.shape[-2:])
    per_image = []
    for i, t in enumerate(batch.targets):
        logits = out.mask_logits[-1][i].float()
        qi, ti = hungarian_match(
            out.class_logits[i], logits.flatten(1), torch.as_tensor(t.labels), resize_masks(t.masks, size).flatten(1)
        )
        per_image.append([logits[qi], torch.as_tensor(t.masks[ti.numpy()], dtype=torch.float32)])
    for k, p in enumerate(batch.prompts):
        entry = per_image[p.image_index]
        entry[0] = torch.cat([entry[0], prompt_masks[-1][k].float()])
        entry[1] = torch.cat([entry[1], torch.as_tensor(p.mask, dtype=torch.float32)[None]])
    return per_image


def refiner_crops(
    refiner, logits: torch.Tensor, features: torch.Tensor, gt: torch.Tensor, max_side: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's masks through the refiner on the crops it would see at inference (the mask's box
    with the head's context), each cut to at most `max_side`² at a random place (the head is local, so
    a window of a large mask such as the table trains it as the whole would). Returns the flattened
    (upsampled, refined, ground truth) pixels of all crops."""
    up = upsample(logits, features.shape[-1])
    ups, outs, gts = [], [], []
    for i in range(len(up)):
        box = crop_box((up[i] > FLOOR_LOGIT) | (gt[i] > 0.5))
        if box is None:
            continue
        windows = []
        for lo, hi in box:
            if hi - lo > max_side:
                lo = int(rng.integers(lo, hi - max_side + 1))
                hi = lo + max_side
            windows.append((lo, hi))
        (t, b), (left, r) = windows
        crop = up[i : i + 1, t:b, left:r]
        ups.append(crop.flatten())
        outs.append(refiner.correct(crop, features[:, :, t:b, left:r]).float().flatten())
        gts.append(gt[i, t:b, left:r].flatten())
    return torch.cat(ups), torch.cat(outs), torch.cat(gts)


def stage5_step(
    model: OmgLlava, batch: data.PerceptionBatch, cfg: TrainConfig, rng: np.random.Generator
) -> dict[str, float]:
    """BCE + Dice of the refined masks against the full-resolution ground truth, on the crops the
    refiner works on; the crops' IoUs before and after refinement are logged."""
    pixels = pixels_of(model, batch.images)
    per_image = decoded_masks(model, batch, pixels)
    refiner = model.mask_refiner
    bce, dice, before, after = [], [], [], []
    with autocast(cfg):
        features = refiner.image_features(pixels)
        for i, (logits, gt) in enumerate(per_image):
            up, out, target = refiner_crops(refiner, logits, features[i : i + 1], gt, cfg.stage5_crop, rng)
            bce.append(F.binary_cross_entropy_with_logits(out, target))
            dice.append(dice_loss(out[None], target[None])[0])
            before.append(binary_iou(up > 0, target > 0.5))
            after.append(binary_iou(out.detach() > 0, target > 0.5))
    loss = torch.stack(bce).mean() * SET_BCE_WEIGHT + torch.stack(dice).mean() * SET_DICE_WEIGHT
    loss.backward()
    return scalars(loss=loss, iou_before=torch.stack(before).mean(), iou_after=torch.stack(after).mean())


def binary_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    union = (pred | gt).sum()
    return (pred & gt).sum() / union if union else torch.ones(())


# -- the loop --------------------------------------------------------------------------------------
def run_stage(model: OmgLlava, cfg: TrainConfig, out: Path, stage: int, start: dict | None) -> None:
    minutes, total, lr = (getattr(cfg, f"stage{stage}_{name}") for name in ("minutes", "steps", "lr"))
    budgeted = cfg.budget_minutes is not None
    if budgeted:
        minutes = cfg.budget_minutes * BUDGET_SHARES[stage]
    model.requires_grad_(False)
    if stage == 0:
        params = perception_parameters(model)
    elif stage == 5:
        params = refiner_parameters(model)
    else:
        params = llm_side_parameters(model, with_llm=stage >= 2)
    for p in params:
        p.requires_grad_(True)
    semantic = attributes = None
    if stage == 4 and cfg.stage4_align_weight > 0 and cfg.align_target == "head":
        attributes = AttributeHead(model.config.language_model.hidden_size)
        params = params + list(attributes.parameters())
    if stage == 0 and cfg.semantic_weight > 0:
        dcfg = model.config.decoder
        semantic = SemanticHead(dcfg.hidden_dim, dcfg.num_classes)
        params = params + list(semantic.parameters())
    aux = semantic if semantic is not None else attributes  # saved and resumed with the checkpoints
    model.train()
    if stage > 0:
        model.image_encoder.eval()
        model.omg_decoder.eval()
    if stage == 5:
        model.eval()
        model.mask_refiner.train()
    # Weight decay on matrices and kernels only: decaying norms, biases and layer scales pulls the
    # residual blocks back towards zero.
    decay = 0.05 if stage == 0 else 0.0
    # The location gate and head start from nothing beside a trained LLM: they learn 10× faster.
    location = {id(p) for p in model.object_location.parameters()} if model.object_location is not None else set()
    fast = [p for p in params if id(p) in location]
    slow = [p for p in params if id(p) not in location]
    groups = [
        {"params": [p for p in slow if p.ndim > 1], "weight_decay": decay},
        {"params": [p for p in slow if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if fast:  # only in the stages that train the LLM side
        groups.append({"params": fast, "weight_decay": 0.0, "lr_scale": 10.0})
    opt = torch.optim.AdamW(groups, lr=lr)
    step, spent = 0, 0.0
    ckpt = out / f"stage{stage}"
    if start and start["stage"] == stage:
        step, spent = start["step"], start["spent"]
        total = start.get("total", total)
        if aux is not None and (ckpt / "aux.safetensors").is_file():
            from safetensors.torch import load_file

            aux.load_state_dict(load_file(ckpt / "aux.safetensors"))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        log.info("stage %d: resuming at step %d (%.1f min spent)", stage, step, spent / 60)
    clock = Clock(minutes, spent)
    rng = np.random.default_rng([cfg.seed, stage, step])
    last_save = time.monotonic()
    history: list[dict[str, float]] = []
    began = step  # this process's first step of the stage (resumed runs measure their own pace)
    paced_from = None  # (step, spent) where a budgeted stage starts measuring its pace
    cls_names = model.config.decoder.class_names
    while step < total and not clock.done():
        for group in opt.param_groups:
            group["lr"] = stage_lr(cfg, stage, step, total) * group.get("lr_scale", 1.0)
        if stage == 0:
            batch = data.perception_batch(rng, cfg.stage0_batch, 256, cls_names, cfg.prompts_per_image)
            stats = stage0_step(model, batch, cfg, semantic)
        elif stage == 1:
            stats = stage1_step(model, rng, cfg)
        elif stage == 2:
            stats = stage2_step(model, rng, cfg)
        elif stage == 3:
            stats = stage2_step(model, rng, cfg, cfg.stage3_task_weights)
        elif stage == 5:
            batch = data.perception_batch(rng, cfg.stage5_batch, 256, cls_names, cfg.prompts_per_image)
            stats = stage5_step(model, batch, cfg, rng)
        else:
            stats = stage2_step(
                model,
                rng,
                cfg,
                cfg.stage4_task_weights,
                cfg.stage4_existence,
                cfg.stage4_align_weight,
                attributes,
                cfg.stage4_duplicate_share,
            )
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if torch.isfinite(norm):
            opt.step()
        else:
            # One non-finite gradient would turn every weight into NaN (v12's stage 5 at step ~490).
            log.warning("stage %d step %d: non-finite gradient norm, step skipped", stage, step)
            stats = {**stats, "skipped": 1.0}
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append(stats)
        if budgeted and step == began + PACE_FROM:
            paced_from = (step, clock.spent)
        if budgeted and paced_from is not None and (step - paced_from[0]) % REFIT_EVERY == FIRST_FIT:
            pace = (clock.spent - paced_from[1]) / (step - paced_from[0])
            # Never past the configured steps: a refit may shorten but not lengthen beyond them.
            total = budgeted_steps(step, clock.spent, pace, minutes, getattr(cfg, f"stage{stage}_steps"))
            log.info("stage %d: %.2f s a step, %d steps fit its %.1f min", stage, pace, total, minutes)
        if step % 25 == 0:
            recent = history[-25:]
            mean = {k: round(float(np.mean([h.get(k, 0.0) for h in recent])), 4) for k in set().union(*recent)}
            log.info("stage %d step %d %.1f min %s", stage, step, clock.spent / 60, mean)
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps({"stage": stage, "step": step, "minutes": clock.spent / 60, **mean}) + "\n")
        if time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
            save_checkpoint(ckpt, model, opt, stage, step, clock.spent, aux, total if budgeted else None)
            last_save = time.monotonic()
    save_checkpoint(ckpt, model, opt, stage, step, clock.spent, aux, total if budgeted else None)
    (ckpt / "DONE").write_text(json.dumps({"steps": step, "minutes": clock.spent / 60}))
    log.info("stage %d done: %d steps in %.1f min", stage, step, clock.spent / 60)
    model.eval()
    model.requires_grad_(False)


def _jsonable(value):
    return asdict(value) if is_dataclass(value) else list(value)


def train(cfg: TrainConfig) -> OmgLlava:
    """Run (or resume) the stages in `cfg.stages`; returns the trained model."""
    torch.set_num_threads(cfg.threads)
    log.info("bf16 autocast: %s", "on" if uses_bf16(cfg) else "off (fp32)")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.__dict__, indent=2, default=_jsonable))
    model = build_model(cfg, out)
    t0 = time.monotonic()
    # Find the most advanced checkpoint to resume from.
    resume = None
    for stage in sorted(cfg.stages, reverse=True):
        p = load_progress(out / f"stage{stage}")
        if p is not None:
            resume = p
            break
    if resume is not None and resume["stage"] > 0:
        load_weights(model, out / f"stage{resume['stage']}")
    elif resume is not None or cfg.perception_from:
        # Stage 0 trains only the perception module: take just that from its checkpoint (the
        # LLM side may have changed shape since, e.g. another pixel-shuffle ratio).
        from safetensors.torch import load_file

        folder = out / "stage0" if resume is not None else Path(cfg.perception_from)
        state = load_file(folder / "model.safetensors")
        vision = {k: v for k, v in state.items() if k.startswith(PERCEPTION_PREFIXES)}
        missing = [k for k in model.state_dict() if k.startswith(PERCEPTION_PREFIXES) and k not in vision]
        if missing:
            raise ValueError(f"{folder} lacks perception weights, e.g. {missing[:3]}")
        model.load_state_dict(vision, strict=False)
    for stage in cfg.stages:
        if (out / f"stage{stage}" / "DONE").exists():
            continue
        if cfg.budget_minutes is not None and BUDGET_SHARES[stage] == 0:
            log.info("stage %d: no share of the %.0f-minute budget, skipped", stage, cfg.budget_minutes)
            continue
        start = resume if resume is not None and resume["stage"] == stage else None
        if stage == 6:
            from omg_llava_ros.training import pointer_fit

            pointer_fit.run_stage(model, cfg, out)
        else:
            run_stage(model, cfg, out, stage, start)
        resume = None
    log.info("training finished in %.1f min this run", (time.monotonic() - t0) / 60)
    return model
