"""The shipped embedded model: it loads from the package with no download and no pickle, and a reduced
version of every metric of `omg-llava-ros eval` holds on fresh seeds (the full figures, on 200
samples per task, are printed by `omg-llava-ros eval`)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from omg_llava_ros import OmgLlava
from omg_llava_ros.model.omg_llava import EMBEDDED_DIR
from omg_llava_ros.training.evaluate import evaluate


@pytest.fixture(scope="module")
def embedded():
    return OmgLlava.from_pretrained()


@pytest.fixture(scope="module")
def metrics(embedded):
    return evaluate(embedded, samples=16, seed=20261127)


def test_shipped_files_are_small_and_pickle_free():
    files = [p for p in Path(EMBEDDED_DIR).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 10**6  # the bound: 40 MB
    assert any(p.suffix == ".safetensors" for p in files)
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]


def test_loads_with_no_argument(embedded):
    assert embedded.config.name == "embedded"
    assert embedded.tokenizer is not None


# The README has the shipped model's figures on 200 samples per task. These bounds sit well below
# what it measures there (v21: referring answer text 1.00, cIoU 0.90; attribute 0.99, existence
# 0.975; region caption with a point / box / mask 0.97 / 0.97 / 0.975, region colour with a mask
# 1.00; caption 0.90; grounded-caption mask mIoU 0.87; panoptic quality 0.91; follow mode 0.90)
# and on 16 samples of other seeds, so that a broken checkpoint, loader or pipeline fails here
# while 16-sample noise does not.
def test_referring_answers_copy_the_expression_and_ground_the_object(metrics):
    assert metrics["referring"]["text_exact"] >= 0.9
    assert metrics["referring"]["ciou"] >= 0.6


def test_colour_and_region_answers(metrics):
    assert metrics["exact"]["region_color_mask"] >= 0.85
    assert metrics["exact"]["attribute"] >= 0.65
    assert metrics["exact"]["region_caption_mask"] >= 0.45
    # Point and box prompts snapped to the found object (without: 0.41 and 0.75 on 200 samples).
    assert metrics["exact"]["region_caption_point"] >= 0.6
    assert metrics["exact"]["region_caption_box"] >= 0.6


def test_existence_answers_look_at_the_scene(metrics):
    # Half of the questions are about absent pairs: answering "yes." (or "no.") always gives 0.5.
    assert metrics["exact"]["existence"] >= 0.65


def test_captions_and_their_masks(metrics):
    assert metrics["exact"]["caption"] >= 0.25
    assert metrics["grounded_caption_miou"] >= 0.4


def test_panoptic_quality(metrics):
    assert metrics["panoptic_quality"] >= 0.65


def test_follow_mode_keeps_the_object(metrics):
    assert metrics["follow_miou"] >= 0.55


@pytest.fixture(scope="module")
def by_form(embedded):
    return evaluate(embedded, samples=24, seed=20261204, sections=("referring_forms",))["referring_forms"]


def test_referring_holds_for_every_form_of_expression(by_form):
    """The spatial forms too ("the leftmost star", "the star left of the red circle", "the largest
    object"). On these 24 questions a form, v21 (before the pointer read relations) scored cIoU /
    gIoU 0.38 / 0.55 on form 5 and 0.53 / 0.60 on form 6; v22 0.66 / 0.79 and 0.86 / 0.82; v23
    (the relation choice) 0.95 / 0.925 on form 5. gIoU is bounded for the spatial forms: at 24
    samples one large object missed moves cIoU by 0.2."""
    forms = by_form["by_form"]
    for form in ("1", "2", "3"):
        assert forms[form]["ciou"] >= 0.8, (form, forms)
    for form in ("4", "6"):
        assert forms[form]["giou"] >= 0.7 and forms[form]["ciou"] >= 0.6, (form, forms)
    assert forms["5"]["giou"] >= 0.82 and forms["5"]["ciou"] >= 0.82, forms
    assert by_form["overall"]["text_exact"] >= 0.9 and by_form["overall"]["ciou"] >= 0.8


def test_every_metric_is_reported(metrics):
    for task in ("counting", "attribute", "existence", "caption", "grounded_caption"):
        assert 0.0 <= metrics["exact"][task] <= 1.0
    for kind in ("point", "box", "mask"):
        assert f"region_caption_{kind}" in metrics["exact"]
    assert 0.0 <= metrics["grounded_caption_miou"] <= 1.0
    alike = metrics["referring_alike"]
    assert 0.0 <= alike["ciou"] <= 1.0 and 0.0 <= alike["found_its_twin"] <= 1.0
    assert 0.0 <= metrics["follow_miou"] <= 1.0


def test_objects_alike_each_get_a_token_and_a_segment(embedded):
    """Two objects alike often share one decoder query; "split" object tokens and `perceive` give
    each its own (v19 on 300 scenes: 50 queries covered two objects; v21 on these 12 scenes: right
    token counts 7 merged / 10 split, every object its own segment 4 / 9)."""
    from omg_llava_ros.training.evaluate import _alike_target

    rng = np.random.default_rng(20261129)
    things = embedded.config.decoder.num_thing_classes
    table = set(embedded.config.decoder.class_names[things:])
    counted = {"merged": 0, "split": 0}  # the shipped "split" last: `perceive` below uses it
    separate = 0
    scenes = 12
    try:
        for _ in range(scenes):
            rendered, _, _ = _alike_target(rng, 256)
            for grid in counted:
                embedded.config.object_token_grid = grid
                embedded.predictor.reset_image()
                state = embedded.set_image(rendered.image)
                counted[grid] += len(embedded.found_object_logits(state)) == len(rendered.objects)
            found = [s.mask for s in embedded.perceive(rendered.image) if s.label not in table]
            separate += all(any(_iou(f, o.mask) > 0.5 for f in found) for o in rendered.objects)
    finally:
        embedded.config.object_token_grid = "split"
        embedded.predictor.reset_image()
    assert counted["split"] >= 0.75 * scenes and counted["split"] >= counted["merged"]
    assert separate >= 2 * scenes // 3


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_onnxruntime_gives_the_same_answers(embedded, tmp_path):
    """Issue 4's parity on the embedded model: identical text and masks (IoU ≥ 0.99 on average)."""
    from omg_llava_ros.engines import EngineOptions, OrtOptions, select_backend
    from omg_llava_ros.toyworld import render, sample_conversation, sample_scene

    torch_vision = embedded.vision
    options = EngineOptions(cache_dir=tmp_path, build_if_missing=True, ort=OrtOptions(device="cpu"))
    ort_vision = select_backend("onnxruntime", embedded, options)
    rng = np.random.default_rng(4242)
    ious = []
    try:
        for _ in range(4):
            rendered = render(sample_scene(rng), rng=rng)
            sample = sample_conversation(rng, rendered, "referring_segmentation")
            answers = []
            for vision in (torch_vision, ort_vision):
                embedded.vision = vision
                embedded.predictor.reset_image()
                answers.append(embedded.chat(rendered.image, sample.question))
            assert answers[0].text == answers[1].text
            for a, b in zip(answers[0].segments, answers[1].segments, strict=True):
                union = np.logical_or(a.mask, b.mask).sum()
                ious.append(1.0 if union == 0 else np.logical_and(a.mask, b.mask).sum() / union)
    finally:
        embedded.vision = torch_vision
        embedded.predictor.reset_image()
    assert np.mean(ious) >= 0.99


def test_a_seg_mask_mostly_outside_the_chosen_object_becomes_that_object(embedded):
    """Whatever a `[SEG]` query decodes, once the pointer has chosen an object the mask returned is
    mostly that object (re-decoded inside it, or its own mask where that still fails)."""
    from omg_llava_ros.toyworld import render, sample_scene

    rng = np.random.default_rng(77)
    rendered = render(sample_scene(rng, num_objects=4), rng=rng)
    state = embedded.set_image(rendered.image, perception=True)
    regions = state.prior.object_masks[0]
    points = state.prior.object_centroids[0]
    assert len(regions) >= 2
    width = embedded.config.decoder.hidden_dim
    queries = torch.randn(len(regions), 2, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        segments = embedded._masks_for_queries(queries, state, points, regions)
        chosen = embedded._logits_to_image(regions.float(), state) > 0
    for segment, mask in zip(segments, chosen.cpu().numpy(), strict=True):
        overlap = np.logical_and(segment.mask, mask).sum() / np.logical_or(segment.mask, mask).sum()
        assert overlap >= 0.5
