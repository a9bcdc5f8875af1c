"""The independent Pillow renderer draws the same world by the same rules as `render`, with its own
rasteriser and choices — what `eval --renderer pil` measures robustness with."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import AREA_RATIOS  # area / circumcircle area, closed form per shape

from omg_llava_ros.toyworld import render, sample_moving_scene, sample_scene
from omg_llava_ros.toyworld.render_pil import pil_options, random_render_pil, render_pil
from omg_llava_ros.toyworld.scene import SHAPES, Scene, make_object
from omg_llava_ros.training.evaluate import evaluate


def test_areas_and_centroids_agree_with_our_renderer():
    """Rotation and edge rules differ, the shapes do not: per object the areas agree within about a
    tenth (small stars differ most) and the centroids within about a pixel. Pillow's fill takes the
    pixels its edges touch, so at 1× its objects are up to 15% larger (a real renderer difference)."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        scene = sample_scene(rng)
        ours = render(scene, 256)
        for supersample in (1, 4):
            theirs = render_pil(scene, 256, rng, supersample=supersample)
            for a, b in zip(ours.objects, theirs.objects, strict=True):
                assert 0.98 <= b.area / a.area <= (1.2 if supersample == 1 else 1.12)
                assert math.dist(a.centroid, b.centroid) < 1.5
                assert (b.shape, b.color, b.size) == (a.shape, a.color, a.size)


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_has_its_closed_form_area(shape):
    obj = make_object(shape, "blue", (128.0, 128.0), 40, 17.0)
    area = render_pil(Scene((obj,), table_grey=120), 512, supersample=4).objects[0].area
    assert area / (math.pi * 80**2) == pytest.approx(AREA_RATIOS[shape], rel=0.02)


def test_masks_are_disjoint_and_the_image_matches_them():
    rng = np.random.default_rng(11)
    for _ in range(10):
        scene = sample_scene(rng)
        r = render_pil(scene, 256, rng, **pil_options(rng))
        masks = r.masks.astype(int)
        assert masks.sum(0).max() <= 1
        assert np.array_equal(r.panoptic > 0, masks.sum(0) > 0)
        for o in r.objects:
            inner = o.mask.copy()
            for axis in (0, 1):  # one pixel in from every edge: away from anti-aliased borders
                inner &= np.roll(o.mask, 1, axis) & np.roll(o.mask, -1, axis)
            pixels = r.image[inner].astype(float)
            # Noise of sigma <= 8 averages out over the object.
            assert np.abs(pixels.mean(0) - np.asarray(o.rgb)).max() < 3.0
        table = r.image[r.panoptic == 0].astype(float)
        assert np.abs(table.mean() - scene.table_grey) < 3.0


def test_noise_options():
    obj = make_object("circle", "red", (128.0, 128.0), 30, 0.0)
    scene = Scene((obj,), table_grey=120, noise_sigma=6.0, noise_seed=3)
    grey = render_pil(scene, 256, grey_noise=True).image.astype(int)
    colour = render_pil(scene, 256).image.astype(int)
    table = render_pil(scene, 256).panoptic == 0
    assert (grey[table, 0] == grey[table, 1]).all() and (grey[table, 1] == grey[table, 2]).all()
    assert (colour[table, 0] != colour[table, 1]).mean() > 0.5
    inside = ~table
    assert np.ptp(render_pil(scene, 256).image[inside], axis=0).max() == 0  # noise on the table only
    assert render_pil(scene, 256, noise_on_objects=True).image[inside].std() > 3.0
    # The same scene always renders the same image without a generator.
    assert np.array_equal(render_pil(scene, 256).image, render_pil(scene, 256).image)


def test_moving_scenes_can_be_drawn_by_another_renderer():
    rng = np.random.default_rng(2)
    moving = sample_moving_scene(rng, num_frames=3, draw=lambda s, px: random_render_pil(s, px, rng))
    assert len(moving.frames) == 3
    assert all(f.objects[moving.target].mask.any() for f in moving.frames)


def test_evaluate_draws_with_the_chosen_renderer(tiny_model):
    metrics = evaluate(tiny_model, samples=1, seed=3, sections=("referring",), renderer="pil")
    assert metrics["renderer"] == "pil" and 0.0 <= metrics["referring"]["ciou"] <= 1.0
    with pytest.raises(ValueError, match="renderer"):
        evaluate(tiny_model, samples=1, sections=("referring",), renderer="blender")
