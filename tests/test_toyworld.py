"""Tests of the tabletop world against shared/toyworld.md.

The checks recompute the rules independently where it matters: a separate parser resolves every
referring expression form by brute force, geometry is compared to closed-form areas, answers are
compared to hand-written strings.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import cv2
import numpy as np
import pytest
from helpers import AREA_RATIOS

from omg_llava_ros.toyworld import (
    COLORS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    TASKS,
    ObjectSpec,
    RenderedScene,
    Scene,
    all_unique_expressions,
    box_prompt,
    caption_answer,
    enumerate_expressions,
    gcg_answer,
    left_to_right,
    make_object,
    mask_prompt,
    number_word,
    point_prompt,
    referable_objects,
    render,
    sample_conversation,
    sample_counting,
    sample_existence,
    sample_expression,
    sample_grounded_caption,
    sample_moving_scene,
    sample_prompt,
    sample_referring_segmentation,
    sample_region_caption,
    sample_region_color,
    sample_scene,
    shortest_expression,
)

EXTREMES = ("leftmost", "rightmost", "topmost", "bottommost")
RELATIONS = ("left of", "right of", "above", "below")


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def scene_of(*objects: ObjectSpec, grey: int = 130, sigma: float = 0.0, seed: int = 0) -> Scene:
    return Scene(tuple(objects), table_grey=grey, noise_sigma=sigma, noise_seed=seed)


def erode(mask: np.ndarray, k: int) -> np.ndarray:
    # Outside the canvas counts as background, so pixels on the border are edge pixels too.
    kernel = np.ones((k, k), np.uint8)
    return cv2.erode(mask.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def pairwise_gaps(objects: tuple[ObjectSpec, ...]) -> list[float]:
    return [
        math.dist(a.center, b.center) - a.radius - b.radius for i, a in enumerate(objects) for b in objects[i + 1 :]
    ]


def assert_scene_valid(scene: Scene) -> None:
    assert 1 <= len(scene.objects) <= 6
    for o in scene.objects:
        assert o.radius <= o.center[0] <= 256 - o.radius
        assert o.radius <= o.center[1] <= 256 - o.radius
    assert all(g >= 4.0 - 1e-9 for g in pairwise_gaps(scene.objects))


# --------------------------------------------------------------------------- vocabulary, scenes


def test_vocabulary_matches_contract():
    assert SHAPES == ("circle", "square", "triangle", "star", "cross")
    assert COLORS == {
        "red": (220, 50, 50),
        "green": (50, 170, 70),
        "blue": (50, 90, 220),
        "yellow": (230, 210, 50),
        "purple": (150, 70, 190),
        "orange": (240, 140, 40),
    }
    assert SIZES == {"small": (12.0, 20.0), "large": (28.0, 40.0)}
    assert NUMBER_WORDS == ("zero", "one", "two", "three", "four", "five", "six")
    assert [number_word(n) for n in range(7)] == list(NUMBER_WORDS)
    with pytest.raises(ValueError):
        number_word(7)


def test_sampled_scenes_obey_every_rule():
    counts, shapes, colors, sizes = set(), set(), set(), set()
    for seed in range(300):
        scene = sample_scene(rng(seed))
        assert_scene_valid(scene)
        assert 90 <= scene.table_grey <= 170 and isinstance(scene.table_grey, int)
        assert 0.0 <= scene.noise_sigma <= 8.0
        counts.add(len(scene.objects))
        for o in scene.objects:
            lo, hi = SIZES[o.size]
            assert lo <= o.radius <= hi
            centre = np.array(COLORS[o.color])
            assert np.all(np.abs(np.array(o.rgb) - centre) <= 15)
            if o.shape == "circle":
                assert o.rotation == 0.0
            else:
                assert 0.0 <= o.rotation < 360.0
            shapes.add(o.shape)
            colors.add(o.color)
            sizes.add(o.size)
    assert counts == {1, 2, 3, 4, 5, 6}
    assert shapes == set(SHAPES) and colors == set(COLORS) and sizes == set(SIZES)


def test_crowded_scenes_can_always_be_placed():
    for seed in range(60):
        scene = sample_scene(rng(seed), num_objects=6)
        assert len(scene.objects) == 6
        assert_scene_valid(scene)
    with pytest.raises(ValueError):
        sample_scene(rng(0), num_objects=7)


def test_rotation_and_jitter_are_spread_over_their_ranges():
    objs = [o for s in range(200) for o in sample_scene(rng(s)).objects]
    rotations = np.array([o.rotation for o in objs if o.shape != "circle"])
    jitter = np.array([np.array(o.rgb) - COLORS[o.color] for o in objs]).ravel()
    # Uniform on [0, 360): every 90-degree quadrant gets a fair share.
    assert np.all(np.histogram(rotations, bins=4, range=(0, 360))[0] > len(rotations) * 0.15)
    assert jitter.min() == -15 and jitter.max() == 15
    assert abs(jitter.mean()) < 1.5


# --------------------------------------------------------------------------- rendering


def test_ground_truth_is_consistent_with_the_image():
    for seed in range(40):
        scene = sample_scene(rng(seed))
        r = render(scene)
        assert r.image.shape == (256, 256, 3) and r.image.dtype == np.uint8
        assert len(r.objects) == len(scene.objects)
        masks = r.masks
        assert masks.sum(axis=0).max() <= 1  # disjoint
        expected_panoptic = np.zeros((256, 256), dtype=int)
        for k, o in enumerate(r.objects):
            expected_panoptic[o.mask] = k + 1
        assert np.array_equal(r.panoptic, expected_panoptic)
        yy, xx = np.mgrid[:256, :256]
        for o, spec in zip(r.objects, scene.objects, strict=True):
            ys, xs = np.nonzero(o.mask)
            assert o.area == len(xs) > 0
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert o.centroid == pytest.approx((xs.mean(), ys.mean()))
            # Every mask pixel centre lies inside the bounding circle.
            d = np.hypot(xx[o.mask] + 0.5 - spec.center[0], yy[o.mask] + 0.5 - spec.center[1])
            assert d.max() <= spec.radius + 1e-6
            # Without anti-aliasing the mask is exactly the pixels painted in the object's colour.
            assert np.all(r.image[o.mask] == np.array(spec.rgb))
            assert (o.shape, o.color, o.size, o.rgb) == (spec.shape, spec.color, spec.size, spec.rgb)


def test_object_colours_stay_near_their_centres_in_every_render_mode():
    for seed in range(20):
        scene = sample_scene(rng(seed))
        for mode in ("none", "supersample", "cv2"):
            for object_noise in (False, True):
                r = render(scene, antialias=mode, object_noise=object_noise)
                tol = 15 + 7 * scene.noise_sigma + 1 if object_noise else 15
                for o in r.objects:
                    inner = erode(o.mask, 3)
                    pixels = r.image[inner].astype(float)
                    centre = np.array(COLORS[o.color], dtype=float)
                    assert np.all(np.abs(pixels - centre) <= tol)
                    assert np.all(np.abs(pixels.mean(axis=0) - centre) <= 16)


def test_table_is_grey_with_gaussian_noise():
    obj = make_object("circle", "red", (40, 40), 15)
    quiet = render(scene_of(obj, grey=97, sigma=0.0))
    assert np.all(quiet.image[quiet.panoptic == 0] == 97)
    noisy = render(scene_of(obj, grey=150, sigma=8.0, seed=3))
    table = noisy.image[noisy.panoptic == 0].astype(float)
    assert table.mean() == pytest.approx(150, abs=0.2)
    assert table.std() == pytest.approx(8.0, abs=0.3)
    # Noise is per pixel and channel, not a shared grey offset.
    assert np.mean(table[:, 0] != table[:, 1]) > 0.5
    for seed in range(20):
        scene = sample_scene(rng(seed))
        r = render(scene)
        t = r.image[r.panoptic == 0].astype(float)
        assert abs(t.mean() - scene.table_grey) < 0.5
        assert np.all(np.abs(t - scene.table_grey) <= 7 * scene.noise_sigma + 1)


def test_render_is_reproducible_from_the_scene_alone():
    scene = sample_scene(rng(11))
    scene = replace(scene, noise_sigma=5.0)
    a, b = render(scene), render(scene)
    assert np.array_equal(a.image, b.image)
    c = render(scene, rng=rng(99))  # explicit noise source
    assert not np.array_equal(a.image, c.image)
    assert np.array_equal(a.panoptic, c.panoptic)


def test_antialiasing_changes_only_edge_pixels_and_never_masks():
    scene = replace(sample_scene(rng(5), num_objects=6), noise_sigma=3.0)
    plain = render(scene)
    near_edge = np.zeros((256, 256), dtype=bool)
    for o in plain.objects:
        near_edge |= cv2.dilate(o.mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~erode(o.mask, 5)
    for mode in ("supersample", "cv2", True):
        aa = render(scene, antialias=mode)
        assert np.array_equal(aa.panoptic, plain.panoptic)
        changed = np.any(aa.image != plain.image, axis=2)
        assert changed.any()
        assert not np.any(changed & ~near_edge)
    with pytest.raises(ValueError):
        render(scene, antialias="blur")  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_areas_match_closed_form(shape):
    for rotation in (0.0, 23.0, 61.0):
        obj = make_object(shape, "blue", (128.3, 127.6), 40, rotation)
        area = render(scene_of(obj), size=512).objects[0].area
        assert area / (math.pi * 80**2) == pytest.approx(AREA_RATIOS[shape], rel=0.01)
    # The shapes are clearly told apart by area at any size class.
    small = render(scene_of(make_object(shape, "blue", (60, 60), 14, 10.0))).objects[0].area
    assert small / (math.pi * 14**2) == pytest.approx(AREA_RATIOS[shape], rel=0.08)


def inside(shape: str, rotation: float, radius_frac: float, angle_deg: float) -> bool:
    """Whether the pixel at polar (radius_frac * R, angle) from the centre is in the mask."""
    cx = cy = 128.0
    obj = make_object(shape, "red", (cx, cy), 40, rotation)
    r = render(scene_of(obj), size=512)
    a = math.radians(angle_deg)
    x = (cx + 40 * radius_frac * math.cos(a)) * 2
    y = (cy + 40 * radius_frac * math.sin(a)) * 2
    return bool(r.objects[0].mask[int(y), int(x)])


def test_shape_geometry_probes():
    # Angles are in image coordinates (y down): -90 is up. At rotation 0 the triangle and star
    # point up; rotation turns them clockwise on screen.
    assert inside("triangle", 0, 0.9, -90) and not inside("triangle", 0, 0.6, 90)
    assert inside("triangle", 30, 0.9, -60) and not inside("triangle", 30, 0.9, -90)
    assert inside("star", 0, 0.9, -90) and inside("star", 0, 0.9, -18)
    assert not inside("star", 0, 0.6, -54)  # between two tips, beyond the 0.45 R inner radius
    assert inside("star", 0, 0.4, -54)
    assert inside("cross", 0, 0.9, 0) and inside("cross", 0, 0.9, 90)
    assert not inside("cross", 0, 0.5, 45)  # the notch between two arms
    assert inside("cross", 45, 0.9, 45) and not inside("cross", 45, 0.5, 90)
    assert inside("square", 0, 0.95, 45) and not inside("square", 0, 0.75, 0)  # apothem 0.707 R
    assert inside("circle", 0, 0.97, 33) and not inside("circle", 0, 1.03, 33)


@pytest.mark.parametrize("shape", SHAPES)
def test_circumradius_is_the_size(shape):
    obj = make_object(shape, "green", (128, 128), 40, 17.0)
    m = render(scene_of(obj), size=512).objects[0].mask
    ys, xs = np.nonzero(m)
    d = np.hypot(xs + 0.5 - 256, ys + 0.5 - 256)
    assert 78.5 <= d.max() <= 80.0


def test_star_has_fivefold_symmetry_and_square_does_not_look_like_its_rotation():
    def mask(shape, rot):
        return render(scene_of(make_object(shape, "red", (128, 128), 40, rot)), size=512).objects[0].mask

    def iou(a, b):
        return (a & b).sum() / (a | b).sum()

    assert iou(mask("star", 5), mask("star", 77)) > 0.97
    assert iou(mask("star", 5), mask("star", 41)) < 0.8
    assert iou(mask("square", 0), mask("square", 45)) < 0.9


def test_rendering_at_512_scales_geometry():
    for seed in range(10):
        scene = sample_scene(rng(seed))
        a, b = render(scene, 256), render(scene, 512)
        assert b.image.shape == (512, 512, 3)
        for oa, ob in zip(a.objects, b.objects, strict=True):
            assert ob.area / oa.area == pytest.approx(4.0, rel=0.06)
            # Centroids are pixel indices (pixel centre at index + 0.5): x_256 = x - 0.5 and
            # x_512 = 2x - 0.5 = 2 * x_256 + 0.5 for the same continuous x.
            assert ob.centroid[0] == pytest.approx(2 * oa.centroid[0] + 0.5, abs=0.6)
            assert ob.centroid[1] == pytest.approx(2 * oa.centroid[1] + 0.5, abs=0.6)
            assert np.all(np.abs(np.array(ob.box) - 2 * np.array(oa.box)) <= 2)
    with pytest.raises(ValueError):
        render(sample_scene(rng(0)), size=32)


# --------------------------------------------------------------------------- referring expressions


def on_that_side(rel: str, p: tuple[float, float], anchor: tuple[float, float]) -> bool:
    # Image coordinates: "above" means a smaller y.
    dx, dy = p[0] - anchor[0], p[1] - anchor[1]
    return {"left of": dx < 0, "right of": dx > 0, "above": dy < 0, "below": dy > 0}[rel]


def resolve(expr: str, r: RenderedScene) -> list[int]:
    """Independent resolver: every object the expression names (a unique one gives one index)."""
    objs = r.objects
    words = expr.split()
    assert words[0] == "the", expr
    rest = words[1:]

    def where(pred):
        return [i for i, o in enumerate(objs) if pred(o)]

    for rel in RELATIONS:
        if f" {rel} the " in expr:
            head, anchor_text = expr[len("the ") :].split(f" {rel} the ")
            a_color, a_shape = anchor_text.split()
            anchors = where(lambda o, c=a_color, s=a_shape: o.color == c and o.shape == s)
            if len(anchors) != 1:
                return []
            ax, ay = objs[anchors[0]].centroid
            cands = [
                i
                for i, o in enumerate(objs)
                if i != anchors[0] and o.shape == head and on_that_side(rel, o.centroid, (ax, ay))
            ]
            if not cands:
                return []
            dist = {i: math.hypot(objs[i].centroid[0] - ax, objs[i].centroid[1] - ay) for i in cands}
            best = min(dist.values())
            return [i for i in cands if dist[i] == best]
    if rest[0] in EXTREMES:
        noun = rest[1:]
        if noun == ["object"]:
            group = where(lambda o: True)
        elif len(noun) == 2 and noun[1] == "object":
            group = where(lambda o: o.color == noun[0])
        else:
            group = where(lambda o: o.shape == noun[0])
        axis, sign = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}[rest[0]]
        if not group:
            return []
        best = min(sign * objs[i].centroid[axis] for i in group)
        return [i for i in group if sign * objs[i].centroid[axis] == best]
    if rest[0] in ("largest", "smallest"):
        sign = -1 if rest[0] == "largest" else 1
        best = min(sign * o.area for o in objs)
        return where(lambda o: sign * o.area == best)
    if len(rest) == 1:
        return where(lambda o: o.shape == rest[0])
    if len(rest) == 2 and rest[1] == "object":
        return where(lambda o: o.color == rest[0])
    if len(rest) == 2:
        return where(lambda o: o.color == rest[0] and o.shape == rest[1])
    if len(rest) == 3:
        return where(lambda o: o.size == rest[0] and o.color == rest[1] and o.shape == rest[2])
    raise AssertionError(f"unparsable expression {expr!r}")


def form_of(expr: str) -> int:
    words = expr.split()
    if any(f" {rel} the " in expr for rel in RELATIONS):
        return 5
    if words[1] in EXTREMES:
        return 4
    if words[1] in ("largest", "smallest"):
        return 6
    if len(words) == 2 or words[-1] == "object":
        return 3
    return 1 if len(words) == 3 else 2


def every_syntactic_expression() -> list[str]:
    out = [f"the {c} {s}" for c in COLORS for s in SHAPES]
    out += [f"the {z} {c} {s}" for z in SIZES for c in COLORS for s in SHAPES]
    out += [f"the {s}" for s in SHAPES] + [f"the {c} object" for c in COLORS]
    for e in EXTREMES:
        out += [f"the {e} {s}" for s in SHAPES] + [f"the {e} {c} object" for c in COLORS]
        out.append(f"the {e} object")
    out += [f"the {s} {rel} the {c} {s2}" for s in SHAPES for rel in RELATIONS for c in COLORS for s2 in SHAPES]
    return out + ["the largest object", "the smallest object"]


ALL_EXPRESSIONS = every_syntactic_expression()


def ambiguous_scene(seed: int) -> RenderedScene:
    """A sampled layout with only two shapes and two colours, so forms 1-3 often fail."""
    g = rng(seed)
    scene = sample_scene(g, num_objects=int(g.integers(3, 7)))
    objs = []
    for o in scene.objects:
        shape = ("star", "circle")[int(g.integers(2))]
        color = ("red", "blue")[int(g.integers(2))]
        rotation = 0.0 if shape == "circle" else o.rotation
        objs.append(replace(o, shape=shape, color=color, rgb=COLORS[color], rotation=rotation))
    return render(replace(scene, objects=tuple(objs)))


def check_expressions_against_brute_force(r: RenderedScene) -> None:
    named = {e: resolve(e, r) for e in ALL_EXPRESSIONS}
    for t in range(len(r.objects)):
        truth = {e for e, ids in named.items() if ids == [t]}
        generated = all_unique_expressions(r, t)
        assert len(generated) == len(set(generated))
        assert set(generated) == truth
        short = shortest_expression(r, t)
        if not truth:
            assert short is None
            continue
        assert resolve(short, r) == [t]
        fewest = min(len(e.split()) for e in truth)
        assert len(short.split()) == fewest
        assert form_of(short) == min(form_of(e) for e in truth if len(e.split()) == fewest)
        assert generated[0] == short
        assert [len(e.split()) for e in generated] == sorted(len(e.split()) for e in generated)
        assert all(form_of(x.text) == x.form for x in enumerate_expressions(r, t))


def test_referring_expressions_match_brute_force_on_sampled_scenes():
    for seed in range(25):
        check_expressions_against_brute_force(render(sample_scene(rng(seed))))


def test_referring_expressions_match_brute_force_on_ambiguous_scenes():
    forms = set()
    for seed in range(25):
        r = ambiguous_scene(seed)
        check_expressions_against_brute_force(r)
        assert referable_objects(r)  # e.g. the leftmost object is always unique
        forms |= {form_of(shortest_expression(r, t)) for t in referable_objects(r)}
    # Crowded, repetitive scenes need the positional and relational forms as shortest.
    assert {1, 2, 4} <= forms


def test_shortest_expression_hand_built_cases():
    red_star = make_object("star", "red", (60, 60), 15)
    blue_star = make_object("star", "blue", (200, 60), 15)
    red_circle = make_object("circle", "red", (128, 180), 15)
    r = render(scene_of(red_star, blue_star, red_circle))
    assert shortest_expression(r, 0) == "the red star"
    assert shortest_expression(r, 1) == "the blue star"  # form 1 wins the 3-word tie with form 3
    assert shortest_expression(r, 2) == "the circle"

    # Twin small red stars: only position tells them apart.
    twins = render(scene_of(make_object("star", "red", (50, 128), 15), make_object("star", "red", (200, 128), 15)))
    assert shortest_expression(twins, 0) == "the leftmost star"
    assert shortest_expression(twins, 1) == "the rightmost star"
    # Same y for both: "topmost" is a tie and must not be offered.
    assert not any("topmost" in e or "bottommost" in e for e in all_unique_expressions(twins, 0))

    # Three red stars, the big one in the middle of both axes: only its area singles it out in
    # three words ("the large red star" also works but has four).
    mid = render(scene_of(
        make_object("star", "red", (60, 200), 15),
        make_object("star", "red", (128, 128), 38),
        make_object("star", "red", (200, 60), 15),
    ))  # fmt: skip
    assert shortest_expression(mid, 1) == "the largest object"
    assert "the large red star" in all_unique_expressions(mid, 1)

    # Four red small stars and a blue circle anchor above them: only form 5 names the middle star.
    rel = render(scene_of(
        make_object("star", "red", (40, 100), 12),
        make_object("star", "red", (128, 128), 16),
        make_object("star", "red", (216, 150), 18),
        make_object("star", "red", (128, 220), 18),
        make_object("circle", "blue", (128, 40), 38),
    ))  # fmt: skip
    assert shortest_expression(rel, 1) == "the star below the blue circle"
    assert {form_of(e) for e in all_unique_expressions(rel, 1)} == {5}


def test_equal_areas_are_no_extreme():
    a = make_object("circle", "red", (60, 60), 30)
    b = make_object("circle", "blue", (180, 180), 30)  # same sub-pixel phase: identical pixel counts
    r = render(scene_of(a, b))
    assert r.objects[0].area == r.objects[1].area
    for t in (0, 1):
        assert not any("largest" in e or "smallest" in e for e in all_unique_expressions(r, t))


# --------------------------------------------------------------------------- conversations


def test_single_orange_star_answers():
    star = make_object("star", "orange", (100, 140), 15, 12.0)
    r = render(scene_of(star))
    g = rng(0)
    assert caption_answer(r) == "one object: an orange star."
    assert gcg_answer(r) == "<p> an orange star </p> [SEG]."
    s = sample_grounded_caption(g, r)
    assert (s.question, s.answer) == ("Describe the image with segmentation masks.", "<p> an orange star </p> [SEG].")
    assert len(s.target_masks) == 1 and np.array_equal(s.target_masks[0], r.objects[0].mask)
    rc = sample_region_caption(g, r)
    assert (rc.question, rc.answer) == ("What is <region>?", "a small orange star.")
    assert len(rc.prompts) == 1 and rc.target_masks == []
    col = sample_region_color(g, r)
    assert (col.question, col.answer) == ("What color is <region>?", "orange.")
    seg = sample_referring_segmentation(g, r)
    assert seg.answer == "<p> the star </p> [SEG]."
    assert seg.question in {"Please segment the star.", "Segment the star.", "Where is the star?", "Pick up the star."}
    qa = {sample_existence(rng(s), r).question: sample_existence(rng(s), r).answer for s in range(40)}
    assert qa["Is there an orange star?"] == "yes."
    assert "Is there a orange star?" not in qa
    assert all(a == "no." for q, a in qa.items() if q != "Is there an orange star?")


def test_captions_list_objects_left_to_right():
    r = render(scene_of(
        make_object("circle", "red", (210, 60), 30),
        make_object("square", "orange", (50, 200), 15),
        make_object("star", "blue", (128, 128), 35, 40.0),
    ))  # fmt: skip
    assert left_to_right(r) == [1, 2, 0]
    assert caption_answer(r) == "three objects: an orange square, a blue star, and a red circle."
    assert gcg_answer(r) == (
        "<p> an orange square </p> [SEG], <p> a blue star </p> [SEG], and <p> a red circle </p> [SEG]."
    )
    s = sample_grounded_caption(rng(0), r)
    assert s.object_ids == [1, 2, 0]
    for m, k in zip(s.target_masks, [1, 2, 0], strict=True):
        assert np.array_equal(m, r.objects[k].mask)
    two = render(scene_of(make_object("circle", "red", (60, 60), 15), make_object("star", "blue", (180, 60), 15)))
    assert caption_answer(two) == "two objects: a red circle, and a blue star."
    assert gcg_answer(two) == "<p> a red circle </p> [SEG], and <p> a blue star </p> [SEG]."
    six = render(sample_scene(rng(1), num_objects=6))
    assert caption_answer(six).startswith("six objects: ")


def test_counting_questions_and_answers():
    r = render(scene_of(
        make_object("cross", "green", (40, 40), 15),
        make_object("cross", "red", (120, 40), 15),
        make_object("star", "green", (200, 40), 15),
        make_object("circle", "green", (40, 200), 15),
    ))  # fmt: skip
    expected = {
        "How many objects are there?": "four.",
        "How many crosses are there?": "two.",
        "How many stars are there?": "one.",
        "How many circles are there?": "one.",
        "How many squares are there?": "zero.",
        "How many triangles are there?": "zero.",
        "How many green objects are there?": "three.",
        "How many red objects are there?": "one.",
    }
    expected |= {f"How many {c} objects are there?": "zero." for c in ("blue", "yellow", "purple", "orange")}
    seen = {}
    for seed in range(300):
        s = sample_counting(rng(seed), r)
        assert s.task == "counting" and not s.target_masks
        seen[s.question] = s.answer
    assert seen == expected  # every question form appears and is answered right


def check_answer_format(s, r: RenderedScene) -> None:
    objs = r.objects
    assert not s.question.startswith("<image>")
    if s.task == "referring_segmentation":
        m = re.fullmatch(r"<p> (.+) </p> \[SEG\]\.", s.answer)
        assert m, s.answer
        ref = m.group(1)
        assert s.question in {f"Please segment {ref}.", f"Segment {ref}.", f"Where is {ref}?", f"Pick up {ref}."}
        assert resolve(ref, r) == s.object_ids
        assert len(s.target_masks) == 1 and np.array_equal(s.target_masks[0], objs[s.object_ids[0]].mask)
    elif s.task == "attribute":
        m = re.fullmatch(r"What (color|shape) is (.+)\?", s.question)
        assert m, s.question
        (t,) = resolve(m.group(2), r)
        assert s.answer == f"{getattr(objs[t], m.group(1))}."
    elif s.task == "counting":
        assert s.answer[:-1] in NUMBER_WORDS and s.answer.endswith(".")
    elif s.task == "existence":
        m = re.fullmatch(r"Is there (a|an) (\w+) (\w+)\?", s.question)
        assert m and m.group(1) == ("an" if m.group(2) == "orange" else "a")
        present = any(o.color == m.group(2) and o.shape == m.group(3) for o in objs)
        assert s.answer == ("yes." if present else "no.")
    elif s.task == "caption":
        assert s.question in {"Describe the image.", "What is on the table?"}
        assert s.answer == caption_answer(r)
    elif s.task == "grounded_caption":
        assert s.answer.count("[SEG]") == len(s.target_masks) == len(objs)
        xs = [objs[i].centroid[0] for i in s.object_ids]
        assert xs == sorted(xs)
    elif s.task in ("region_caption", "region_color"):
        (t,) = s.object_ids
        o = objs[t]
        assert s.answer == (f"a {o.size} {o.color} {o.shape}." if s.task == "region_caption" else f"{o.color}.")
        assert len(s.prompts) == 1
    else:
        raise AssertionError(s.task)


def test_sample_conversation_covers_every_task_with_correct_answers():
    seen_tasks, forms = set(), set()
    for seed in range(120):
        g = rng(seed)
        r = render(sample_scene(g))
        for mode in ("shortest", "any"):
            s = sample_conversation(g, r, ref_mode=mode)
            seen_tasks.add(s.task)
            check_answer_format(s, r)
            if s.task == "referring_segmentation":
                ref = s.answer[len("<p> ") : -len(" </p> [SEG].")]
                if mode == "shortest":
                    assert ref == shortest_expression(r, s.object_ids[0])
                forms.add(form_of(ref))
        for task in TASKS:
            check_answer_format(sample_conversation(g, r, task), r)
    assert seen_tasks == set(TASKS)
    assert forms >= {1, 3, 4, 5}


def test_any_mode_draws_every_form():
    forms = set()
    for seed in range(40):
        g = rng(seed)
        r = ambiguous_scene(seed) if seed % 2 else render(sample_scene(g))
        for t in referable_objects(r):
            forms.add(form_of(sample_expression(g, r, t, "any")))
    assert forms == {1, 2, 3, 4, 5, 6}
    with pytest.raises(ValueError):
        sample_conversation(rng(0), r, "dance")


# --------------------------------------------------------------------------- visual prompts


def test_visual_prompts_point_box_mask():
    kinds = set()
    for seed in range(30):
        g = rng(seed)
        for size in (256, 512):
            r = render(sample_scene(g), size)
            j = 4 * size // 256
            for o in r.objects:
                p = point_prompt(g, o)
                assert p.kind == "point" and o.mask[p.point[1], p.point[0]]
                b = box_prompt(g, o, size).box
                for side, ref in zip(b, o.box, strict=True):
                    assert abs(side - ref) <= j
                assert 0 <= b[0] < b[2] <= size and 0 <= b[1] < b[3] <= size
                m = mask_prompt(o)
                assert m.kind == "mask" and np.array_equal(m.mask, o.mask)
                kinds.add(sample_prompt(g, o, size).kind)
    assert kinds == {"point", "box", "mask"}
    # Jitter really moves the sides, by up to the full 4 px.
    o = render(scene_of(make_object("square", "red", (128, 128), 30))).objects[0]
    deltas = np.array([np.subtract(box_prompt(rng(s), o, 256).box, o.box) for s in range(200)])
    assert deltas.min() == -4 and deltas.max() == 4


def test_box_prompt_is_clipped_to_the_canvas():
    o = render(scene_of(make_object("circle", "red", (12.5, 243.5), 12.5))).objects[0]
    assert o.box[0] == 0 and o.box[3] == 256
    for s in range(50):
        x0, y0, x1, y1 = box_prompt(rng(s), o, 256).box
        assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256


# --------------------------------------------------------------------------- moving scenes


def test_moving_scenes_respect_motion_limits():
    moved_any = False
    for seed in range(8):
        ms = sample_moving_scene(rng(seed), num_frames=12)
        assert len(ms.frames) == len(ms.scenes) == 12
        first = ms.scenes[0]
        for prev, cur in zip(ms.scenes, ms.scenes[1:], strict=False):
            assert_scene_valid(cur)
            assert cur.table_grey == first.table_grey and cur.noise_sigma == first.noise_sigma
            assert cur.noise_seed != prev.noise_seed
            for a, b in zip(prev.objects, cur.objects, strict=True):
                assert (a.shape, a.color, a.rgb, a.size, a.radius) == (b.shape, b.color, b.rgb, b.size, b.radius)
                step = math.dist(a.center, b.center)
                assert step <= 6.0 + 1e-9
                turn = abs((b.rotation - a.rotation + 180.0) % 360.0 - 180.0)
                assert turn <= 10.0 + 1e-9
                if a.shape == "circle":
                    assert b.rotation == 0.0
                moved_any |= step > 1.0
        # The command names its target on frame 0, and the target's masks follow it.
        ref = ms.command.answer[len("<p> ") : -len(" </p> [SEG].")]
        assert resolve(ref, ms.frames[0]) == [ms.target]
        assert len(ms.target_masks) == 12
        for f, m in zip(ms.frames, ms.target_masks, strict=True):
            assert np.array_equal(m, f.panoptic == ms.target + 1)
    assert moved_any


def test_moving_scene_noise_is_redrawn_and_scales_with_size():
    ms = sample_moving_scene(rng(3), num_frames=3, size=512)
    assert ms.frames[0].image.shape == (512, 512, 3)
    for a, b in zip(ms.frames, ms.frames[1:], strict=False):
        for oa, ob in zip(a.objects, b.objects, strict=True):
            assert math.dist(oa.centroid, ob.centroid) <= 12.0 + 1.5
    if ms.scenes[0].noise_sigma > 0.5:
        table = (ms.frames[0].panoptic == 0) & (ms.frames[1].panoptic == 0)
        assert np.any(ms.frames[0].image[table] != ms.frames[1].image[table])


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_output():
    def generate(seed):
        g = rng(seed)
        r = render(sample_scene(g), antialias="supersample")
        samples = [sample_conversation(g, r, ref_mode="any") for _ in range(5)]
        ms = sample_moving_scene(g, num_frames=3)
        return r, samples, ms

    (r1, s1, m1), (r2, s2, m2) = generate(7), generate(7)
    assert r1.scene == r2.scene
    assert np.array_equal(r1.image, r2.image) and np.array_equal(r1.panoptic, r2.panoptic)
    for a, b in zip(s1, s2, strict=True):
        assert (a.task, a.question, a.answer, a.object_ids) == (b.task, b.question, b.answer, b.object_ids)
        assert len(a.prompts) == len(b.prompts)
        for pa, pb in zip(a.prompts, b.prompts, strict=True):
            assert (pa.kind, pa.point, pa.box) == (pb.kind, pb.point, pb.box)
    assert m1.scenes == m2.scenes and m1.command.question == m2.command.question
    assert all(np.array_equal(a.image, b.image) for a, b in zip(m1.frames, m2.frames, strict=True))
    r3, _, _ = generate(8)
    assert r3.scene != r1.scene and not np.array_equal(r3.image, r1.image)
