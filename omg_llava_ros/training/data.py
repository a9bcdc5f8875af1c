"""Training data generated on the fly from the tabletop world: augmented scenes with their panoptic
ground truth, visual prompts, and conversations of every task.

Augmentation aims at other renderers of the same world rather than this one: anti-aliasing on or
off (two methods), object noise, mild blur, global brightness/contrast/colour shifts, JPEG-like
re-encoding. Ground-truth masks never change.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from omg_llava_ros.toyworld import (
    ANTIALIAS_MODES,
    RenderedScene,
    Sample,
    render,
    sample_conversation,
    sample_prompt,
    sample_scene,
)
from omg_llava_ros.toyworld.conversations import REFERRING_TEMPLATES, SEG_TOKEN, existence_pairs, existence_sample
from omg_llava_ros.toyworld.referring import enumerate_expressions
from omg_llava_ros.toyworld.scene import Scene, jittered_rgb


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photometric changes a different renderer or camera could bring; geometry untouched."""
    img = image.astype(np.float32)
    if rng.random() < 0.3:
        sigma = rng.uniform(0.3, 0.9)
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    if rng.random() < 0.5:
        gain = rng.uniform(0.92, 1.08)
        bias = rng.uniform(-8, 8, size=3)
        img = img * gain + bias
    if rng.random() < 0.3:
        img = img + rng.normal(0, rng.uniform(1, 5), img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.2:
        ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))])
        if ok:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].copy()
    return img


def with_duplicate(rng: np.random.Generator, scene: Scene) -> Scene:
    """`scene` with one object given the colour and shape of another (its own size, place and a
    fresh colour jitter): two objects alike, which only their positions tell apart. Natural scenes
    have such a pair about one time in sixteen, and it is where referring fails (form 4, "the
    topmost square") and where a caption must count two of a kind."""
    objs = list(scene.objects)
    if len(objs) < 2:
        return scene
    src, dst = (int(i) for i in rng.choice(len(objs), size=2, replace=False))
    model = objs[src]
    rgb = jittered_rgb(rng, model.color)
    rotation = 0.0 if model.shape == "circle" else (objs[dst].rotation or float(rng.uniform(0.0, 360.0)))
    objs[dst] = replace(objs[dst], shape=model.shape, color=model.color, rgb=rgb, rotation=rotation)
    return replace(scene, objects=tuple(objs))


def random_scene(rng: np.random.Generator, size: int, augmented: bool = True, duplicate: bool = False) -> RenderedScene:
    scene = sample_scene(rng)
    if duplicate:
        scene = with_duplicate(rng, scene)
    mode = ANTIALIAS_MODES[int(rng.integers(len(ANTIALIAS_MODES)))] if augmented else "none"
    rendered = render(scene, size=size, rng=rng, antialias=mode, object_noise=augmented and rng.random() < 0.3)
    if augmented:
        rendered.image = augment(rendered.image, rng)
    return rendered


def class_index(obj, class_names: tuple[str, ...]) -> int:
    return class_names.index(f"{obj.color} {obj.shape}")


@dataclass
class PanopticTarget:
    """masks: (M, H, W) bool — objects then the table; labels: (M,) class indices."""

    masks: np.ndarray
    labels: np.ndarray


def panoptic_target(rendered: RenderedScene, class_names: tuple[str, ...]) -> PanopticTarget:
    masks = [o.mask for o in rendered.objects]
    labels = [class_index(o, class_names) for o in rendered.objects]
    masks.append(rendered.panoptic == 0)
    labels.append(class_names.index("table"))
    return PanopticTarget(np.stack(masks), np.asarray(labels, dtype=np.int64))


@dataclass
class PromptTarget:
    """A visual prompt on image `image_index` and the mask it should give."""

    image_index: int
    prompt: object  # toyworld VisualPrompt
    mask: np.ndarray


@dataclass
class PerceptionBatch:
    images: list[np.ndarray]
    targets: list[PanopticTarget]
    prompts: list[PromptTarget] = field(default_factory=list)


def perception_batch(
    rng: np.random.Generator, batch: int, size: int, class_names: tuple[str, ...], prompts_per_image: int = 2
) -> PerceptionBatch:
    scenes = [random_scene(rng, size) for _ in range(batch)]
    out = PerceptionBatch([s.image for s in scenes], [panoptic_target(s, class_names) for s in scenes])
    for i, s in enumerate(scenes):
        for _ in range(prompts_per_image):
            obj = s.objects[int(rng.integers(len(s.objects)))]
            out.prompts.append(PromptTarget(i, sample_prompt(rng, obj, size), obj.mask))
    return out


@dataclass
class ConversationSample:
    image: np.ndarray
    sample: Sample
    rendered: RenderedScene


# Stage-2 task mix: referring segmentation and GCG carry the mask loss. Counting and existence
# need an absent/how-many judgement over all object tokens, which the small LLM learns late: with
# ~12k existence questions it stayed at chance, while ~20k more (fine-tuning on those two tasks)
# took it to 0.98; so they get the largest shares. Captions and region captions have 2.0 and 2.5
# (from 1.5): region captions lost a third of their accuracy when their share was smaller.
TASK_WEIGHTS = {
    "referring_segmentation": 3.0,
    "counting": 4.0,
    "attribute": 1.0,
    "existence": 3.0,
    "caption": 2.0,
    "grounded_caption": 2.0,
    "region_caption": 2.5,
    "region_color": 1.0,
}


# Share of the "no" existence questions (training only) asked about a confusable pair: a colour
# and a shape that are both on the table, on different objects. Drawn uniformly, most absent
# pairs share nothing with the scene and are answered from either attribute alone. (Trained with
# these alone, the model still answered "yes." whenever the colour was on the table: stage 4.)
HARD_NEGATIVE_SHARE = 0.5


@dataclass(frozen=True)
class ExistenceNegatives:
    """Shares of the "no" existence questions (training only) by kind of absent pair; the rest are
    drawn uniformly from all absent pairs. confusable: its colour and its shape both on the table,
    on different objects; colour_only: its colour on the table, its shape nowhere (a model trained
    without them answered "yes." to all of those: it judged existence by the colour)."""

    confusable: float = HARD_NEGATIVE_SHARE
    colour_only: float = 0.0


def _absent_pairs_of_present_colours(rendered: RenderedScene, shape_on_table: bool) -> list[tuple[str, str]]:
    """Absent (colour, shape) pairs whose colour is in the scene and whose shape is (or is not)."""
    present, absent = existence_pairs(rendered)
    colors = {c for c, _ in present}
    shapes = {s for _, s in present}
    return sorted((c, s) for c, s in absent if c in colors and (s in shapes) == shape_on_table)


def confusable_pairs(rendered: RenderedScene) -> list[tuple[str, str]]:
    """Absent (colour, shape) pairs whose colour and shape each appear in the scene."""
    return _absent_pairs_of_present_colours(rendered, shape_on_table=True)


def colour_only_pairs(rendered: RenderedScene) -> list[tuple[str, str]]:
    """Absent (colour, shape) pairs whose colour is in the scene and whose shape is not."""
    return _absent_pairs_of_present_colours(rendered, shape_on_table=False)


def sample_training_existence(
    rng: np.random.Generator, rendered: RenderedScene, negatives: ExistenceNegatives = ExistenceNegatives()
) -> Sample:
    """Half the questions about a pair on the table (as toyworld), the others about an absent pair
    of the kinds and shares of `negatives` (a kind the scene cannot give falls back to uniform)."""
    present, absent = existence_pairs(rendered)
    if rng.random() < 0.5 or not absent:
        pool = present
    else:
        u = rng.random()
        confusable = confusable_pairs(rendered)
        colour_only = colour_only_pairs(rendered)
        if confusable and u < negatives.confusable:
            pool = confusable
        elif colour_only and negatives.confusable <= u < negatives.confusable + negatives.colour_only:
            pool = colour_only
        else:
            pool = absent
    return existence_sample(rendered, *pool[int(rng.integers(len(pool)))])


def sample_positional_referring(rng: np.random.Generator, rendered: RenderedScene) -> Sample:
    """A referring-segmentation sample whose expression is positional (form 4, "the leftmost red
    object"): half the time for an object that has no shorter name (as evaluation asks them),
    otherwise for any object that has one. Falls back to toyworld's sampler when no object has."""
    named = [(t, e) for t in range(len(rendered.objects)) for e in enumerate_expressions(rendered, t)]
    positional = [(t, e) for t, e in named if e.form == 4]
    shortest = {t: e for t, e in reversed(named)}  # enumerate_expressions lists shortest first
    hard = [(t, e) for t, e in positional if shortest[t].form == 4 and e.num_words == shortest[t].num_words]
    pool = hard if hard and rng.random() < 0.5 else positional
    if not pool:
        return sample_conversation(rng, rendered, "referring_segmentation", ref_mode="any")
    t, e = pool[int(rng.integers(len(pool)))]
    question = REFERRING_TEMPLATES[int(rng.integers(len(REFERRING_TEMPLATES)))].format(ref=e.text)
    answer = f"<p> {e.text} </p> {SEG_TOKEN}."
    return Sample("referring_segmentation", question, answer, [rendered.objects[t].mask], [], [t])


# The forms named by where objects are or how large (toyworld.md 4-6): "the leftmost star", "the
# star left of the red circle", "the largest object". Without questions of these forms asked form
# first, a model that met referring on the shortest expressions scored 0.59-0.73 cIoU on forms 5 and
# 6, nearly all by pointing at the wrong object token (`training.referring_probe`).
SPATIAL_FORMS = (4, 5, 6)


def sample_referring_of_forms(
    rng: np.random.Generator, rendered: RenderedScene, forms: tuple[int, ...] = SPATIAL_FORMS
) -> Sample:
    """A referring-segmentation sample whose expression has one of `forms`: the form drawn uniformly
    among those the scene has for some object, then a target and expression of it uniformly; a form-5
    expression carries its anchor's mask (`Sample.anchor_masks`). Falls back to toyworld's sampler
    when no object has such an expression."""
    named = [
        (t, e) for t in range(len(rendered.objects)) for e in enumerate_expressions(rendered, t) if e.form in forms
    ]
    if not named:
        return sample_conversation(rng, rendered, "referring_segmentation", ref_mode="any")
    present = sorted({e.form for _, e in named})
    form = present[int(rng.integers(len(present)))]
    pool = [(t, e) for t, e in named if e.form == form]
    t, e = pool[int(rng.integers(len(pool)))]
    question = REFERRING_TEMPLATES[int(rng.integers(len(REFERRING_TEMPLATES)))].format(ref=e.text)
    answer = f"<p> {e.text} </p> {SEG_TOKEN}."
    anchor = rendered.objects[e.anchor].mask if e.anchor is not None else None
    return Sample("referring_segmentation", question, answer, [rendered.objects[t].mask], [], [t], [anchor])


def sample_training_conversation(
    rng: np.random.Generator, rendered: RenderedScene, task: str, negatives: ExistenceNegatives = ExistenceNegatives()
) -> Sample:
    """toyworld's sampler, with hard negatives for existence; the answers keep the world's contract,
    only the question distribution changes. The training-only task "referring_position" asks
    referring segmentation with positional expressions (`sample_positional_referring`),
    "referring_spatial" with an expression of form 4, 5 or 6 (`sample_referring_of_forms`),
    "referring_relation" of form 5 alone ("the star left of the red circle")."""
    if task == "existence":
        return sample_training_existence(rng, rendered, negatives)
    if task == "referring_position":
        return sample_positional_referring(rng, rendered)
    if task == "referring_spatial":
        return sample_referring_of_forms(rng, rendered)
    if task == "referring_relation":
        return sample_referring_of_forms(rng, rendered, (5,))
    return sample_conversation(rng, rendered, task, ref_mode="any" if rng.random() < 0.5 else "shortest")


def conversation_batch(
    rng: np.random.Generator,
    batch: int,
    size: int,
    tasks: tuple[str, ...] | None = None,
    per_scene: int = 1,
    weights: dict[str, float] | None = None,
    negatives: ExistenceNegatives = ExistenceNegatives(),
    duplicate_share: float = 0.0,
) -> list[ConversationSample]:
    """`batch` conversations, `per_scene` consecutive ones about the same scene (each its own task):
    the frozen perception pass then runs once per scene, and it costs more than the LLM's. Tasks are
    drawn by `weights` (default TASK_WEIGHTS), restricted to `tasks` when given; existence questions
    have the "no" kinds of `negatives`; `duplicate_share` of the scenes have two objects alike
    (`with_duplicate`)."""
    table = TASK_WEIGHTS if weights is None else weights
    names = tasks or tuple(table)
    probs = np.asarray([table[t] for t in names], dtype=float)
    out: list[ConversationSample] = []
    rendered = None
    for i in range(batch):
        if i % per_scene == 0:
            rendered = random_scene(rng, size, duplicate=bool(rng.random() < duplicate_share))
        task = names[int(rng.choice(len(names), p=probs / probs.sum()))]
        sample = sample_training_conversation(rng, rendered, task, negatives)
        out.append(ConversationSample(rendered.image, sample, rendered))
    return out


def scene_index(batch: list[ConversationSample]) -> tuple[list[np.ndarray], list[int]]:
    """The distinct scene images of a batch and, per conversation, the index of its scene."""
    images: list[np.ndarray] = []
    index: list[int] = []
    seen: dict[int, int] = {}
    for c in batch:
        key = id(c.rendered)
        if key not in seen:
            seen[key] = len(images)
            images.append(c.image)
        index.append(seen[key])
    return images, index


def tokenizer_corpus(rng: np.random.Generator, n: int = 3000, size: int = 256) -> list[str]:
    """Questions and answers of every task, for training the tokenizer."""
    from omg_llava_ros.toyworld import TASKS

    texts = []
    for i in range(n):
        rendered = render(sample_scene(rng), size=size, rng=rng)
        s = sample_conversation(rng, rendered, TASKS[i % len(TASKS)], ref_mode="any")
        texts.append(s.question)
        texts.append(s.answer)
    return texts
