"""Stage 5: the mask refiner alone, on the frozen decoder's panoptic and visual-prompt masks against
the full-resolution ground truth.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from omg_llava_ros.model.mask_refiner import FLOOR_LOGIT, crop_box, upsample
from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.training import data
from omg_llava_ros.training.config import TrainConfig, autocast, scalars
from omg_llava_ros.training.losses import (
    SET_BCE_WEIGHT,
    SET_DICE_WEIGHT,
    dice_loss,
    hungarian_match,
    resize_masks,
)
from omg_llava_ros.training.model_inputs import pixels_of
from omg_llava_ros.training.perception_stage import decode_with_prompts


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
