"""The mask refiner: identity when untrained, local to each mask, saved with the model, trained alone
in stage 5."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omg_llava_ros.model.config import get_config
from omg_llava_ros.model.mask_refiner import FLOOR_LOGIT, MARGIN, ImageGuide, MaskRefiner, crop_box, crop_boxes
from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.training import data, refiner_stage


def _blob_logits(side: int = 16) -> torch.Tensor:
    """Two masks on a side² grid: a small square blob, and nothing at all."""
    logits = torch.full((2, side, side), -10.0)
    logits[0, 5:8, 6:10] = 6.0
    return logits


def test_an_untrained_refiner_is_bilinear_upsampling():
    torch.manual_seed(0)
    refiner = MaskRefiner(8)
    features = refiner.image_features(torch.randn(1, 3, 64, 64))
    logits = _blob_logits()
    expected = F.interpolate(logits[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(refiner(logits, features), expected)


def test_the_refiner_changes_a_mask_only_near_it():
    torch.manual_seed(0)
    refiner = MaskRefiner(8)
    torch.nn.init.normal_(refiner.head[-1].weight, std=0.5)
    torch.nn.init.constant_(refiner.head[-1].bias, 1.0)
    features = refiner.image_features(torch.randn(1, 3, 64, 64))
    logits = _blob_logits()
    up = F.interpolate(logits[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    out = refiner(logits, features)
    changed = (out - up).abs() > 1e-6
    assert changed[0].any()
    rows, cols = torch.nonzero(changed[0], as_tuple=True)
    near = torch.nonzero(up[0] > -4.0)
    assert rows.min() >= near[:, 0].min() - MARGIN and rows.max() <= near[:, 0].max() + MARGIN
    assert cols.min() >= near[:, 1].min() - MARGIN and cols.max() <= near[:, 1].max() + MARGIN
    assert not changed[1].any()  # an empty mask stays empty


def test_the_embedded_config_has_a_refiner_and_the_official_one_none():
    assert get_config("embedded").mask_refiner_channels > 0
    assert get_config("official-7b").mask_refiner_channels == 0
    model = OmgLlava.from_config("tiny")
    assert model.mask_refiner is None
    assert not any(k.startswith("mask_refiner.") for k in model.state_dict())


def test_a_model_with_a_refiner_saves_and_loads_it(tmp_path):
    config = get_config("tiny")
    config.mask_refiner_channels = 4
    model = OmgLlava.from_config(config)
    torch.nn.init.normal_(model.mask_refiner.head[-1].weight, std=0.3)
    model.save_pretrained(tmp_path)
    loaded = OmgLlava.from_pretrained(tmp_path)
    assert loaded.mask_refiner is not None
    assert torch.equal(loaded.mask_refiner.head[-1].weight, model.mask_refiner.head[-1].weight)
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    masks = [s.mask for s in model.perceive(image)]
    assert [m.shape for m in masks] == [(48, 80)] * len(masks)
    assert all(np.array_equal(a, s.mask) for a, s in zip(masks, loaded.perceive(image), strict=True))


def test_refiner_crops_stay_within_the_crop_size():
    torch.manual_seed(0)
    refiner = MaskRefiner(4)
    features = refiner.image_features(torch.randn(1, 3, 64, 64))
    logits = torch.full((2, 16, 16), -10.0)
    logits[0] = 5.0  # a mask over everything: cut to a window
    logits[1, 2:4, 2:4] = 5.0  # a small one near the corner: whole, clipped at the image border
    gt = torch.zeros(2, 64, 64)
    up, out, target = refiner_stage.refiner_crops(refiner, logits, features, gt, 20, np.random.default_rng(0))
    assert up.shape == out.shape == target.shape
    small = (16 + MARGIN) ** 2  # rows and columns 0 .. 15 + MARGIN of the upsampled blob's box
    assert len(up) <= 20 * 20 + small


def test_stage5_trains_the_refiner_and_nothing_else(perception_setup):
    cfg, model = perception_setup
    cfg = dataclasses.replace(cfg, stage5_crop=48)
    rng = np.random.default_rng(5)
    batch = data.perception_batch(rng, 2, 256, model.config.decoder.class_names, prompts_per_image=1)
    params = refiner_stage.refiner_parameters(model)
    for p in params:
        p.requires_grad_(True)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("mask_refiner.")}
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(6):
        stats = refiner_stage.stage5_step(model, batch, cfg, np.random.default_rng(0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(stats)
    for p in params:
        p.requires_grad_(False)
    assert set(losses[0]) == {"loss", "iou_before", "iou_after"}
    assert losses[-1]["loss"] < losses[0]["loss"]
    assert losses[0]["iou_after"] == pytest.approx(losses[0]["iou_before"])  # untrained: the identity
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())


def test_stage5_needs_a_model_with_a_refiner():
    with pytest.raises(ValueError, match="no|none"):
        refiner_stage.refiner_parameters(OmgLlava.from_config("tiny"))


def test_features_computed_per_crop_equal_the_whole_images():
    torch.manual_seed(0)
    refiner = MaskRefiner(8)
    torch.nn.init.normal_(refiner.head[-1].weight, std=0.5)
    pixels = torch.randn(1, 3, 64, 64)
    whole = refiner.image_features(pixels)
    guide = ImageGuide(refiner, pixels)
    # inside, at the corner (the image's own zero padding) and along an edge
    for top, bottom, left, right in ((20, 35, 10, 30), (0, 9, 0, 12), (40, 64, 55, 64)):
        assert torch.allclose(guide.crop(top, bottom, left, right), whole[:, :, top:bottom, left:right], atol=1e-5)
    assert guide._full is None  # three small crops: never the whole image
    logits = _blob_logits()
    assert torch.allclose(refiner(logits, ImageGuide(refiner, pixels)), refiner(logits, whole), atol=1e-5)
    # crops that add up to the image: computed once for the whole image, then sliced
    big = ImageGuide(refiner, pixels)
    big.crop(0, 64, 0, 40)
    assert torch.allclose(big.crop(0, 64, 20, 64), whole[:, :, :, 20:], atol=1e-5)
    assert big._full is not None


def test_far_apart_regions_are_refined_in_boxes_of_their_own_with_the_same_result():
    torch.manual_seed(0)
    refiner = MaskRefiner(8)
    torch.nn.init.normal_(refiner.head[-1].weight, std=0.5)
    features = refiner.image_features(torch.randn(1, 3, 128, 128))
    logits = torch.full((1, 32, 32), -10.0)
    logits[0, 2:6, 2:6] = 5.0  # top left
    logits[0, 25:30, 24:30] = 5.0  # bottom right: one box around both would be most of the image
    up = F.interpolate(logits[:, None], size=(128, 128), mode="bilinear", align_corners=False)[:, 0]
    region = up[0] > FLOOR_LOGIT
    boxes = crop_boxes(region)
    assert len(boxes) == 2
    (one_rows, one_cols) = crop_box(region)
    split_area = sum((b - t) * (r - left) for (t, b), (left, r) in boxes)
    assert split_area < (one_rows[1] - one_rows[0]) * (one_cols[1] - one_cols[0]) / 2
    covered = torch.zeros_like(region)
    for (t, b), (left, r) in boxes:
        covered[t:b, left:r] = True
    assert covered[region].all()

    refined = refiner(logits, features)
    whole = up.clone()  # the same head over one box around everything
    (t, b), (left, r) = one_rows, one_cols
    whole[0, t:b, left:r] = refiner.correct(up[:, t:b, left:r], features[:, :, t:b, left:r])[0]
    assert torch.allclose(refined[0][region], whole[0][region], atol=1e-5)
