"""Evaluation of a model on fresh tabletop scenes: every metric the embedded default must reach.

- referring segmentation by form (`referring_forms`, the headline): the target's expression drawn
  form first (uniform over the forms of toyworld.md that name it, then uniform within the form) and
  a uniform command template; cIoU (Σ I / Σ U) and gIoU (mean IoU, empty vs empty = 1) of the first
  `[SEG]` mask (none = empty) overall and per template, and `samples` more per form (1-6) whose
  targets that form names, for a per-form figure that every form gets equally;
- referring segmentation on the shortest expression (`referring`, mostly colour and shape forms);
- counting, attribute, existence, caption, region caption (point, box and mask prompts), region
  colour: exact-match accuracy of the answer text;
- grounded caption: exact match and mask mIoU (phrase i ↔ i-th `[SEG]`; a missing mask scores 0);
- panoptic quality from `perceive` (per class, averaged over the classes present);
- follow mode: mean IoU over the frames of moving scenes after one command on frame 0;
- referring between objects alike (not a target of the issue; a robot's "the leftmost cup"): scenes
  with two objects of the same colour and shape, one of them named by its shortest expression
  (mostly positional, "the topmost square"): cIoU, gIoU and the share of masks that found its twin.
Scenes are drawn from seeds the training never uses, rendered with a random anti-aliasing mode.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np

from omg_llava_ros.metrics import IouAccumulator, mask_iou_counts, sample_iou
from omg_llava_ros.model.omg_llava import OmgLlava, Prompt
from omg_llava_ros.toyworld import (
    ANTIALIAS_MODES,
    render,
    sample_conversation,
    sample_moving_scene,
    sample_referring_segmentation,
    sample_scene,
)
from omg_llava_ros.toyworld.conversations import REFERRING_TEMPLATES, SEG_TOKEN
from omg_llava_ros.toyworld.referring import enumerate_expressions, referable_objects
from omg_llava_ros.toyworld.render_pil import pil_options, random_render_pil, render_pil
from omg_llava_ros.toyworld.scene import MAX_OBJECTS
from omg_llava_ros.training.data import with_duplicate

EVAL_SEED_OFFSET = 10_000_000  # training seeds are small integers


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return sample_iou(*mask_iou_counts(a, b))


def to_model_prompt(p) -> Prompt:
    if p.kind == "point":
        return Prompt.point(*p.point)
    if p.kind == "box":
        return Prompt.box(*p.box)
    return Prompt.mask(p.mask)


RENDERERS = ("ours", "pil")


def _draw(rng: np.random.Generator, scene, size: int, renderer: str):
    """`scene` drawn by our renderer (a random anti-aliasing mode) or by the Pillow one (random options)."""
    if renderer == "pil":
        return random_render_pil(scene, size, rng)
    mode = ANTIALIAS_MODES[int(rng.integers(len(ANTIALIAS_MODES)))]
    return render(scene, size=size, rng=rng, antialias=mode)


def _scene(rng: np.random.Generator, size: int, renderer: str = "ours"):
    return _draw(rng, sample_scene(rng), size, renderer)


def panoptic_quality(pred: list, rendered, class_names: tuple[str, ...]) -> dict[str, list[float]]:
    """Per class: matched IoUs (TP), and FP / FN counts, for one image."""
    gts = [(f"{o.color} {o.shape}", o.mask) for o in rendered.objects] + [("table", rendered.panoptic == 0)]
    stats: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0, 0])  # iou_sum, tp, fp, fn
    used = set()
    for label, gmask in gts:
        best, best_j = 0.0, None
        for j, seg in enumerate(pred):
            if j in used or seg.label != label:
                continue
            v = iou(seg.mask, gmask)
            if v > best:
                best, best_j = v, j
        if best > 0.5:
            used.add(best_j)
            stats[label][0] += best
            stats[label][1] += 1
        else:
            stats[label][3] += 1
    for j, seg in enumerate(pred):
        if j not in used:
            stats[seg.label][2] += 1
    return stats


SECTIONS = (
    "referring_forms",
    "referring",
    "text",
    "region",
    "grounded_caption",
    "panoptic",
    "follow",
    "referring_alike",
)
FORMS = (1, 2, 3, 4, 5, 6)  # toyworld.md's referring forms


def form_sample(rng: np.random.Generator, form: int, size: int, renderer: str) -> tuple[Any, int, str]:
    """(rendered scene, target, expression): scenes are drawn until one of its objects has an
    expression of `form`; then a uniform such target and a uniform expression of it."""
    while True:
        rendered = _scene(rng, size, renderer)
        named = {
            t: [e.text for e in enumerate_expressions(rendered, t) if e.form == form]
            for t in range(len(rendered.objects))
        }
        targets = [t for t, texts in named.items() if texts]
        if targets:
            target = targets[int(rng.integers(len(targets)))]
            return rendered, target, named[target][int(rng.integers(len(named[target])))]


def _referring_by_form(model: OmgLlava, rng: np.random.Generator, samples: int, size: int, renderer: str) -> dict:
    """See the module docstring (`referring_forms`)."""
    overall, text_exact = IouAccumulator(), []
    by_form = {form: IouAccumulator() for form in FORMS}
    by_template = {template: IouAccumulator() for template in REFERRING_TEMPLATES}

    def ask(rendered, target: int, expression: str, form_acc: IouAccumulator | None) -> None:
        template = REFERRING_TEMPLATES[int(rng.integers(len(REFERRING_TEMPLATES)))]
        res = model.chat(rendered.image, template.format(ref=expression))
        gt = rendered.objects[target].mask
        pred = res.segments[0].mask if res.segments else np.zeros_like(gt)
        by_template[template].add_masks(pred, gt)
        if form_acc is None:
            overall.add_masks(pred, gt)
            text_exact.append(res.text == f"<p> {expression} </p> {SEG_TOKEN}.")
        else:
            form_acc.add_masks(pred, gt)

    for _ in range(samples):  # form first, as a user's expression may be of any form
        rendered = _scene(rng, size, renderer)
        targets = referable_objects(rendered)
        target = targets[int(rng.integers(len(targets)))]
        expressions = enumerate_expressions(rendered, target)
        forms = sorted({e.form for e in expressions})
        form = forms[int(rng.integers(len(forms)))]
        choices = [e.text for e in expressions if e.form == form]
        ask(rendered, target, choices[int(rng.integers(len(choices)))], None)
    for form in FORMS:  # each form equally
        for _ in range(samples):
            ask(*form_sample(rng, form, size, renderer), by_form[form])

    def figures(acc: IouAccumulator) -> dict:
        return {"ciou": acc.ciou, "giou": acc.giou, "n": acc.frames}

    return {
        "overall": {**figures(overall), "text_exact": float(np.mean(text_exact)) if text_exact else 0.0},
        "by_form": {str(form): figures(acc) for form, acc in by_form.items()},
        "by_template": {template: figures(acc) for template, acc in by_template.items()},
    }


def _alike_target(rng: np.random.Generator, size: int, renderer: str = "ours"):
    """A scene with two objects alike and one of them that some expression names, as (rendered,
    target, its twins)."""
    while True:
        scene = with_duplicate(rng, sample_scene(rng, num_objects=int(rng.integers(2, MAX_OBJECTS + 1))))
        rendered = _draw(rng, scene, size, renderer)
        names = [(o.color, o.shape) for o in rendered.objects]
        alike = [i for i in referable_objects(rendered) if names.count(names[i]) > 1]
        if alike:
            t = alike[int(rng.integers(len(alike)))]
            return rendered, t, [k for k in range(len(names)) if k != t and names[k] == names[t]]


def evaluate(
    model: OmgLlava,
    samples: int = 200,
    seed: int = 0,
    size: int = 256,
    follow_frames: int = 10,
    sections: tuple[str, ...] = SECTIONS,
    renderer: str = "ours",
) -> dict:
    """The metrics of `sections` on `samples` fresh scenes per task, drawn by `renderer` ("ours", or
    "pil": the independent Pillow renderer); returns a JSON-ready dict."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")
    if renderer not in RENDERERS:
        raise ValueError(f"unknown renderer {renderer!r}; known: {RENDERERS}")
    t0 = time.monotonic()
    rng = np.random.default_rng(EVAL_SEED_OFFSET + seed)
    out: dict = {"samples_per_task": samples, "seed": seed, "size": size, "renderer": renderer}

    if "referring_forms" in sections:
        # A generator of its own, so that the other sections draw the same scenes as before.
        form_rng = np.random.default_rng(EVAL_SEED_OFFSET + seed + 2)
        out["referring_forms"] = _referring_by_form(model, form_rng, samples, size, renderer)

    ref = IouAccumulator()
    exact: dict[str, list[bool]] = defaultdict(list)
    gcg_ious: list[float] = []
    for _ in range(samples if "referring" in sections else 0):
        rendered = _scene(rng, size, renderer)
        s = sample_conversation(rng, rendered, "referring_segmentation", ref_mode="shortest")
        res = model.chat(rendered.image, s.question)
        pred = res.segments[0].mask if res.segments else np.zeros_like(s.target_masks[0])
        ref.add_masks(pred, s.target_masks[0])
        exact["referring_text"].append(res.text == s.answer)
    if "referring" in sections:
        out["referring"] = {"ciou": ref.ciou, "giou": ref.giou, "text_exact": float(np.mean(exact["referring_text"]))}

    for task in ("counting", "attribute", "existence", "caption") if "text" in sections else ():
        for _ in range(samples):
            rendered = _scene(rng, size, renderer)
            s = sample_conversation(rng, rendered, task, ref_mode="shortest")
            exact[task].append(model.chat(rendered.image, s.question).text == s.answer)

    for kind in ("point", "box", "mask") if "region" in sections else ():
        for task in ("region_caption", "region_color"):
            for _ in range(samples if task == "region_caption" else max(1, samples // 4)):
                rendered = _scene(rng, size, renderer)
                s = _region_sample(rng, rendered, task, kind)
                res = model.chat(rendered.image, s.question, prompts=[to_model_prompt(p) for p in s.prompts])
                exact[f"{task}_{kind}"].append(res.text == s.answer)

    for _ in range(samples if "grounded_caption" in sections else 0):
        rendered = _scene(rng, size, renderer)
        s = sample_conversation(rng, rendered, "grounded_caption")
        res = model.chat(rendered.image, s.question)
        exact["grounded_caption"].append(res.text == s.answer)
        for i, gt in enumerate(s.target_masks):
            gcg_ious.append(iou(res.segments[i].mask, gt) if i < len(res.segments) else 0.0)
    out["exact"] = {k: float(np.mean(v)) for k, v in exact.items() if k != "referring_text"}
    if "grounded_caption" in sections:
        out["grounded_caption_miou"] = float(np.mean(gcg_ious)) if gcg_ious else 0.0

    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0, 0])
    for _ in range(samples if "panoptic" in sections else 0):
        rendered = _scene(rng, size, renderer)
        for label, st in panoptic_quality(
            model.perceive(rendered.image), rendered, model.config.decoder.class_names
        ).items():
            for k in range(4):
                totals[label][k] += st[k]
    pqs = []
    for iou_sum, tp, fp, fn in totals.values():
        denom = tp + 0.5 * fp + 0.5 * fn
        if denom:
            pqs.append(iou_sum / denom)
    if "panoptic" in sections:
        out["panoptic_quality"] = float(np.mean(pqs)) if pqs else 0.0

    follow_ious = []
    # The Pillow renderer's options (one set per moving scene) and noise come from a generator of
    # their own, so that "ours" draws the same scenes as before it existed.
    frame_rng = np.random.default_rng(EVAL_SEED_OFFSET + seed + 1) if renderer == "pil" else None
    for _ in range(max(1, samples // 4) if "follow" in sections else 0):
        draw = None
        if frame_rng is not None:
            options = pil_options(frame_rng)
            draw = lambda scene, px, o=options: render_pil(scene, px, frame_rng, **o)  # noqa: E731
        moving = sample_moving_scene(rng, num_frames=follow_frames, size=size, draw=draw)
        res = model.chat(moving.frames[0].image, moving.command.question)
        targets = moving.target_masks
        if not res.segments:
            follow_ious.extend([0.0] * len(targets))
            continue
        follow_ious.append(iou(res.segments[0].mask, targets[0]))
        segs = res.segments[:1]
        for frame, target in zip(moving.frames[1:], targets[1:], strict=True):
            followed = model.follow(frame.image, segs)
            follow_ious.append(iou(followed[0].mask, target))
    if "follow" in sections:
        out["follow_miou"] = float(np.mean(follow_ious))

    alike, twin = IouAccumulator(), []
    for _ in range(samples if "referring_alike" in sections else 0):
        rendered, t, twins = _alike_target(rng, size, renderer)
        s = sample_referring_segmentation(rng, rendered, target=t, ref_mode="shortest")
        res = model.chat(rendered.image, s.question)
        pred = res.segments[0].mask if res.segments else np.zeros_like(s.target_masks[0])
        alike.add_masks(pred, s.target_masks[0])
        twin.append(any(iou(pred, rendered.objects[k].mask) > 0.5 for k in twins))
    if "referring_alike" in sections:
        out["referring_alike"] = {"ciou": alike.ciou, "giou": alike.giou, "found_its_twin": float(np.mean(twin))}
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


def _region_sample(rng, rendered, task: str, kind: str):
    from omg_llava_ros.toyworld import sample_region_caption, sample_region_color

    fn = sample_region_caption if task == "region_caption" else sample_region_color
    return fn(rng, rendered, prompt_kind=kind)
