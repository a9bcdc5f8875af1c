"""Prompt snapping: points and boxes on a found object become that object's mask prompt."""

import numpy as np
import pytest
import torch

from omg_llava_ros.model.prompt_encoder import EncodedPrompt
from omg_llava_ros.model.prompt_snapping import object_masks, snap_prompts

SIZE = 64


def disc_logits(cx: float, cy: float, r: float, strength: float = 4.0, grid: int = 16) -> torch.Tensor:
    """Mask logits on a stride-4 grid, positive inside a disc of radius r (model pixels)."""
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * SIZE / grid
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    return strength * (r - torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)) / r


@pytest.fixture
def two_objects() -> torch.Tensor:
    return torch.stack([disc_logits(16, 16, 10), disc_logits(46, 44, 12)])


def test_a_point_on_an_object_becomes_its_mask(two_objects):
    (snapped,) = snap_prompts([EncodedPrompt("point", point=(44.0, 46.0))], two_objects, SIZE)
    assert snapped.kind == "mask"
    expected = (object_masks(two_objects, SIZE)[1] >= 0).numpy()
    assert np.array_equal(snapped.mask, expected)
    assert snapped.mask[44, 46] and not snapped.mask[16, 16]


def test_a_point_on_nothing_keeps_its_kind(two_objects):
    prompt = EncodedPrompt("point", point=(60.0, 2.0))
    assert snap_prompts([prompt], two_objects, SIZE) == [prompt]


def test_points_outside_the_canvas_are_clamped_not_an_error(two_objects):
    (snapped,) = snap_prompts([EncodedPrompt("point", point=(-5.0, 500.0))], two_objects, SIZE)
    assert snapped.kind == "point"


def test_the_more_certain_mask_owns_a_shared_pixel():
    weak = disc_logits(30, 32, 12, strength=1.0)
    strong = disc_logits(34, 32, 12, strength=8.0)
    for logits, owner in ((torch.stack([weak, strong]), 1), (torch.stack([strong, weak]), 0)):
        (snapped,) = snap_prompts([EncodedPrompt("point", point=(32.0, 32.0))], logits, SIZE)
        expected = (object_masks(logits, SIZE)[owner] >= 0).numpy()
        assert np.array_equal(snapped.mask, expected)


def test_a_loose_box_snaps_a_box_around_two_objects_does_not(two_objects):
    loose = EncodedPrompt("box", box=(33.0, 31.0, 60.0, 57.0))  # object 1 spans about 34-58, 32-56
    (snapped,) = snap_prompts([loose], two_objects, SIZE)
    assert snapped.kind == "mask" and snapped.mask[44, 46]
    both = EncodedPrompt("box", box=(4.0, 4.0, 60.0, 60.0))
    assert snap_prompts([both], two_objects, SIZE) == [both]


def test_mask_prompts_and_images_with_nothing_found_are_left_alone(two_objects):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[:8, :8] = True
    user_mask = EncodedPrompt("mask", mask=mask)
    point = EncodedPrompt("point", point=(16.0, 16.0))
    out = snap_prompts([user_mask, point], two_objects, SIZE)
    assert out[0] is user_mask and out[1].kind == "mask"
    assert snap_prompts([point], two_objects[:0], SIZE) == [point]


def test_the_model_snaps_only_when_configured(tiny_model, monkeypatch):
    """The official behaviour is the default; with `snap_prompts` a point on a found object gives the
    `<region>` token of that object's mask prompt, a point elsewhere its own."""
    from omg_llava_ros.model.omg_llava import Prompt

    image = np.full((64, 64, 3), 128, np.uint8)
    state = tiny_model.set_image(image)
    side = tiny_model.config.image_encoder.image_size
    grid = state.memory.mask_features.shape[-1]
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * side / grid
    yy, xx = torch.meshgrid(centres, centres, indexing="ij")
    found = (4.0 * (side / 8 - torch.sqrt((xx - side / 4) ** 2 + (yy - side / 4) ** 2)))[None]
    monkeypatch.setattr(tiny_model, "found_object_logits", lambda _state: found)
    scale = 64 / side
    on, off = Prompt.point(side / 4 * scale, side / 4 * scale), Prompt.point(0.9 * side * scale, 0.9 * side * scale)
    mask = Prompt.mask(np.ones((64, 64), bool))
    assert tiny_model.config.snap_prompts is False
    plain = tiny_model.prompt_embeddings([on, off, mask], state)
    monkeypatch.setattr(tiny_model.config, "snap_prompts", True)
    snapped = tiny_model.prompt_embeddings([on, off, mask], state)
    assert not torch.equal(snapped[0], plain[0])
    assert torch.equal(snapped[1], plain[1]) and torch.equal(snapped[2], plain[2])
