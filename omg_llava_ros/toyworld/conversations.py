"""Question/answer samples of every task in toyworld.md ("Conversations").

`Sample.question` is stored WITHOUT the leading `<image>` line: the model's chat template adds it, so
the user turn it builds is "<image>\\n" + question. Answers are the exact strings of the contract.

Choices made where toyworld.md leaves room (see also referring.py):
- plural of `cross` in counting questions is "crosses" (`PLURALS`), other shapes add "s";
- the article rule ("an" before orange) applies wherever an article precedes a colour word
  (captions, GCG, the existence question); region captions put the size first, so always "a";
- lists of two or more items use ", " between items and ", and " before the last one, also for two
  ("a red star, and a blue circle"), following the contract's pattern; one item has no "and".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from omg_llava_ros.toyworld.prompts import PromptKind, VisualPrompt, sample_prompt
from omg_llava_ros.toyworld.referring import referable_objects, sample_expression
from omg_llava_ros.toyworld.render import ObjectGT, RenderedScene
from omg_llava_ros.toyworld.scene import COLORS, SHAPES, article, number_word

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "[SEG]"
REGION_TOKEN = "<region>"

TASKS: tuple[str, ...] = (
    "referring_segmentation",
    "counting",
    "attribute",
    "existence",
    "caption",
    "grounded_caption",
    "region_caption",
    "region_color",
)

REFERRING_TEMPLATES: tuple[str, ...] = (
    "Please segment {ref}.",
    "Segment {ref}.",
    "Where is {ref}?",
    "Pick up {ref}.",
)
COUNT_SHAPE_TEMPLATE = "How many {shapes} are there?"
COUNT_COLOR_TEMPLATE = "How many {color} objects are there?"
COUNT_ALL_QUESTION = "How many objects are there?"
ATTRIBUTE_TEMPLATES: dict[str, str] = {"color": "What color is {ref}?", "shape": "What shape is {ref}?"}
EXISTENCE_TEMPLATE = "Is there {article} {color} {shape}?"
CAPTION_QUESTIONS: tuple[str, ...] = ("Describe the image.", "What is on the table?")
GCG_QUESTION = "Describe the image with segmentation masks."
REGION_CAPTION_QUESTION = f"What is {REGION_TOKEN}?"
REGION_COLOR_QUESTION = f"What color is {REGION_TOKEN}?"
PLURALS: dict[str, str] = {"cross": "crosses"}


@dataclass(eq=False)
class Sample:
    """One single-turn conversation about a rendered scene.

    `target_masks` holds one mask per [SEG] of the answer, in order. `prompts` are the visual prompts
    given with the question, one per `<region>`. `object_ids` are the objects the answer is about
    (the [SEG] objects in order; else the referred / prompted / counted / described objects).
    `anchor_masks` (training only, may be empty): per [SEG], the mask of the object a form-5
    expression is relative to ("the star left of *the red circle*"), or None.
    """

    task: str
    question: str
    answer: str
    target_masks: list[np.ndarray] = field(default_factory=list)
    prompts: list[VisualPrompt] = field(default_factory=list)
    object_ids: list[int] = field(default_factory=list)
    anchor_masks: list[np.ndarray | None] = field(default_factory=list)


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def describe(obj: ObjectGT) -> str:
    """`a {color} {shape}` with the right article."""
    return f"{article(obj.color)} {obj.color} {obj.shape}"


def join_items(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + ", and " + items[-1]


def left_to_right(rendered: RenderedScene) -> list[int]:
    """Object indices by centroid x (ties, practically never, by y then index)."""
    objs = rendered.objects
    return sorted(range(len(objs)), key=lambda i: (objs[i].centroid[0], objs[i].centroid[1], i))


def caption_answer(rendered: RenderedScene) -> str:
    order = left_to_right(rendered)
    n = len(order)
    noun = "object" if n == 1 else "objects"
    return f"{number_word(n)} {noun}: {join_items([describe(rendered.objects[i]) for i in order])}."


def gcg_answer(rendered: RenderedScene) -> str:
    order = left_to_right(rendered)
    return join_items([f"<p> {describe(rendered.objects[i])} </p> {SEG_TOKEN}" for i in order]) + "."


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _pick_target(rng: np.random.Generator, rendered: RenderedScene, target: int | None, referable: bool) -> int:
    if target is not None:
        return target
    pool = referable_objects(rendered) if referable else list(range(len(rendered.objects)))
    return pool[int(rng.integers(len(pool)))]


def _expression(rng: np.random.Generator, rendered: RenderedScene, target: int, ref_mode: str) -> str:
    ref = sample_expression(rng, rendered, target, ref_mode)
    if ref is None:
        raise ValueError(f"object {target} has no unique referring expression")
    return ref


def sample_referring_segmentation(
    rng: np.random.Generator,
    rendered: RenderedScene,
    target: int | None = None,
    ref_mode: str = "shortest",
) -> Sample:
    """`Please segment {ref}.` etc. -> `<p> {ref} </p> [SEG].` (`ref_mode`: "shortest" or "any")."""
    t = _pick_target(rng, rendered, target, referable=True)
    ref = _expression(rng, rendered, t, ref_mode)
    question = _pick(rng, REFERRING_TEMPLATES).format(ref=ref)
    answer = f"<p> {ref} </p> {SEG_TOKEN}."
    return Sample("referring_segmentation", question, answer, [rendered.objects[t].mask], [], [t])


def sample_counting(rng: np.random.Generator, rendered: RenderedScene) -> Sample:
    """Counts all objects, a shape or a colour. Half the shape/colour questions ask about one
    present in the scene, the others about any vocabulary word, so "zero." is common but not dominant."""
    objs = rendered.objects
    kind = _pick(rng, ("shape", "color", "all"))
    if kind == "all":
        ids = list(range(len(objs)))
        question = COUNT_ALL_QUESTION
    else:
        present = sorted({getattr(o, kind) for o in objs})
        vocab = SHAPES if kind == "shape" else tuple(COLORS)
        word = _pick(rng, present if rng.random() < 0.5 else vocab)
        ids = [i for i, o in enumerate(objs) if getattr(o, kind) == word]
        if kind == "shape":
            question = COUNT_SHAPE_TEMPLATE.format(shapes=plural(word))
        else:
            question = COUNT_COLOR_TEMPLATE.format(color=word)
    return Sample("counting", question, f"{number_word(len(ids))}.", [], [], ids)


def sample_attribute(
    rng: np.random.Generator,
    rendered: RenderedScene,
    target: int | None = None,
    attribute: str | None = None,
    ref_mode: str = "shortest",
) -> Sample:
    """`What color is {ref}?` -> `{color}.` / `What shape is {ref}?` -> `{shape}.`"""
    t = _pick_target(rng, rendered, target, referable=True)
    attr = attribute if attribute is not None else _pick(rng, tuple(ATTRIBUTE_TEMPLATES))
    ref = _expression(rng, rendered, t, ref_mode)
    value = getattr(rendered.objects[t], attr)
    return Sample("attribute", ATTRIBUTE_TEMPLATES[attr].format(ref=ref), f"{value}.", [], [], [t])


def existence_pairs(rendered: RenderedScene) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The (colour, shape) pairs on the table and those of the world that are not, both sorted."""
    present = sorted({(o.color, o.shape) for o in rendered.objects})
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    return present, absent


def existence_sample(rendered: RenderedScene, color: str, shape: str) -> Sample:
    """`Is there a {color} {shape}?` about `rendered`, with the world's answer."""
    ids = [i for i, o in enumerate(rendered.objects) if (o.color, o.shape) == (color, shape)]
    question = EXISTENCE_TEMPLATE.format(article=article(color), color=color, shape=shape)
    return Sample("existence", question, "yes." if ids else "no.", [], [], ids)


def sample_existence(rng: np.random.Generator, rendered: RenderedScene) -> Sample:
    """`Is there a {color} {shape}?`, half of the time about a pair present in the scene."""
    present, absent = existence_pairs(rendered)
    pool = present if (rng.random() < 0.5 or not absent) else absent
    return existence_sample(rendered, *pool[int(rng.integers(len(pool)))])


def sample_caption(rng: np.random.Generator, rendered: RenderedScene) -> Sample:
    question = _pick(rng, CAPTION_QUESTIONS)
    return Sample("caption", question, caption_answer(rendered), [], [], left_to_right(rendered))


def sample_grounded_caption(rng: np.random.Generator, rendered: RenderedScene) -> Sample:
    """GCG: one [SEG] per object, left to right. `rng` is unused (one question) but kept uniform."""
    del rng
    order = left_to_right(rendered)
    masks = [rendered.objects[i].mask for i in order]
    return Sample("grounded_caption", GCG_QUESTION, gcg_answer(rendered), masks, [], order)


def _region_sample(
    rng: np.random.Generator,
    rendered: RenderedScene,
    target: int | None,
    prompt_kind: PromptKind | None,
    task: str,
    question: str,
    answer: Callable[[ObjectGT], str],
) -> Sample:
    """A question about one object given as a visual prompt (target first, then its prompt)."""
    t = _pick_target(rng, rendered, target, referable=False)
    obj = rendered.objects[t]
    prompt = sample_prompt(rng, obj, rendered.size, prompt_kind)
    return Sample(task, question, answer(obj), [], [prompt], [t])


def sample_region_caption(
    rng: np.random.Generator,
    rendered: RenderedScene,
    target: int | None = None,
    prompt_kind: PromptKind | None = None,
) -> Sample:
    """`What is <region>?` -> `a {size} {color} {shape}.`"""
    return _region_sample(
        rng,
        rendered,
        target,
        prompt_kind,
        "region_caption",
        REGION_CAPTION_QUESTION,
        lambda obj: f"a {obj.size} {obj.color} {obj.shape}.",
    )


def sample_region_color(
    rng: np.random.Generator,
    rendered: RenderedScene,
    target: int | None = None,
    prompt_kind: PromptKind | None = None,
) -> Sample:
    """`What color is <region>?` -> `{color}.`"""
    return _region_sample(
        rng, rendered, target, prompt_kind, "region_color", REGION_COLOR_QUESTION, lambda obj: f"{obj.color}."
    )


def sample_conversation(
    rng: np.random.Generator,
    rendered: RenderedScene,
    task: str | None = None,
    *,
    ref_mode: str = "shortest",
    task_weights: Sequence[float] | None = None,
) -> Sample:
    """A sample of `task`, or of a task drawn from `TASKS` (uniformly unless `task_weights`).

    `ref_mode="any"` lets referring tasks use any unique expression (training variety);
    "shortest" is the evaluation rule.
    """
    if task is None:
        p = None if task_weights is None else np.asarray(task_weights, dtype=float) / np.sum(task_weights)
        task = TASKS[int(rng.choice(len(TASKS), p=p))]
    if task == "referring_segmentation":
        return sample_referring_segmentation(rng, rendered, ref_mode=ref_mode)
    if task == "attribute":
        return sample_attribute(rng, rendered, ref_mode=ref_mode)
    simple = {
        "counting": sample_counting,
        "existence": sample_existence,
        "caption": sample_caption,
        "grounded_caption": sample_grounded_caption,
        "region_caption": sample_region_caption,
        "region_color": sample_region_color,
    }
    if task not in simple:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return simple[task](rng, rendered)
