"""Stage 0: the perception module (encoder + OMG decoder) for panoptic segmentation and visual
prompts, with a dense semantic head as an auxiliary loss; then frozen.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from omg_llava_ros.model.omg_decoder import DecoderMemory, DecoderOutput, QueryConstraints, independent_query_sets
from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.training import data
from omg_llava_ros.training.config import TrainConfig, autocast, scalars
from omg_llava_ros.training.losses import (
    mask_loss,
    resize_masks,
    set_criterion,
)
from omg_llava_ros.training.model_inputs import pixels_of, select_memory, to_encoded

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
