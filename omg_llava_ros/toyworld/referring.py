"""Referring expressions of the tabletop world (toyworld.md, forms 1-6), always unique in their scene.

Semantics (by ground-truth centroid, image coordinates with y pointing down):
- forms 1-3 name every object with the given attributes;
- form 4 names the object of the group with the strictly smallest x (leftmost), largest x
  (rightmost), smallest y (topmost) or largest y (bottommost); a group of one also counts;
- form 5: the anchor `the {color} {shape}` must itself be unique; the candidates are the objects of
  the target's shape whose centroid is strictly on that side (x smaller for "left of", y smaller for
  "above", ...), and the expression names the one nearest to the anchor (Euclidean, by centroid);
- form 6 names the object with the strictly largest / smallest mask area.
An expression is unique when it names exactly one object (no tie anywhere).

"Shortest" counts words; ties go to the earlier form (1 before 3 before 4 ...) and, within a form,
to the enumeration order below, so `the red star` wins over `the red object` and `the leftmost star`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from omg_llava_ros.toyworld.render import RenderedScene

EXTREMES: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
AREA_EXTREMES: tuple[str, ...] = ("largest", "smallest")


class ObjectFacts(Protocol):
    """What referring needs of an object (satisfied by `ObjectGT`)."""

    shape: str
    color: str
    size: str
    centroid: tuple[float, float]
    area: int


@dataclass(frozen=True)
class Expression:
    text: str
    form: int  # 1..6 as numbered in toyworld.md
    anchor: int | None = None  # form 5: the index of the object the relation is taken from

    @property
    def num_words(self) -> int:
        return len(self.text.split())


def _objects(scene_gt: RenderedScene | Sequence[ObjectFacts]) -> Sequence[ObjectFacts]:
    return scene_gt.objects if isinstance(scene_gt, RenderedScene) else scene_gt


def _unique_argmin(values: Sequence[float]) -> int | None:
    """Index of the strict minimum, or None on a tie (or when empty)."""
    if not values:
        return None
    best = min(values)
    hits = [i for i, v in enumerate(values) if v == best]
    return hits[0] if len(hits) == 1 else None


def _extreme_key(extreme: str, o: ObjectFacts) -> float:
    x, y = o.centroid
    return {"leftmost": x, "rightmost": -x, "topmost": y, "bottommost": -y}[extreme]


def on_side(relation: str, obj: ObjectFacts, anchor: ObjectFacts) -> bool:
    """Whether `obj`'s centroid is strictly on the `relation` side of `anchor`'s."""
    (x, y), (ax, ay) = obj.centroid, anchor.centroid
    return {"left of": x < ax, "right of": x > ax, "above": y < ay, "below": y > ay}[relation]


def _relation_target(objs: Sequence[ObjectFacts], shape: str, relation: str, anchor: int) -> int | None:
    a = objs[anchor]
    cands = [i for i, o in enumerate(objs) if i != anchor and o.shape == shape and on_side(relation, o, a)]
    dists = [math.dist(objs[i].centroid, a.centroid) for i in cands]
    best = _unique_argmin(dists)
    return None if best is None else cands[best]


def enumerate_expressions(scene_gt: RenderedScene | Sequence[ObjectFacts], target: int) -> list[Expression]:
    """Every unique expression of every form for `target`, in form and enumeration order."""
    objs = _objects(scene_gt)
    t = objs[target]

    def n_with(pred: Callable[[ObjectFacts], bool]) -> int:
        return sum(1 for o in objs if pred(o))

    out: list[Expression] = []

    # Form 1 and 2: attribute conjunctions.
    if n_with(lambda o: o.color == t.color and o.shape == t.shape) == 1:
        out.append(Expression(f"the {t.color} {t.shape}", 1))
    if n_with(lambda o: o.size == t.size and o.color == t.color and o.shape == t.shape) == 1:
        out.append(Expression(f"the {t.size} {t.color} {t.shape}", 2))
    # Form 3: a single attribute.
    if n_with(lambda o: o.shape == t.shape) == 1:
        out.append(Expression(f"the {t.shape}", 3))
    if n_with(lambda o: o.color == t.color) == 1:
        out.append(Expression(f"the {t.color} object", 3))
    # Form 4: positional superlatives within a group that contains the target.
    groups = (
        (t.shape, lambda o: o.shape == t.shape),
        (f"{t.color} object", lambda o: o.color == t.color),
        ("object", lambda o: True),
    )
    for extreme in EXTREMES:
        for noun, member in groups:
            idx = [i for i, o in enumerate(objs) if member(o)]
            best = _unique_argmin([_extreme_key(extreme, objs[i]) for i in idx])
            if best is not None and idx[best] == target:
                out.append(Expression(f"the {extreme} {noun}", 4))
    # Form 5: relative to a uniquely named anchor.
    named = [(o.color, o.shape) for o in objs]
    for a, anchor in enumerate(objs):
        if a == target or named.count((anchor.color, anchor.shape)) != 1:
            continue
        for relation in RELATIONS:
            if _relation_target(objs, t.shape, relation, a) == target:
                out.append(Expression(f"the {t.shape} {relation} the {anchor.color} {anchor.shape}", 5, a))
    # Form 6: area superlatives.
    areas = [float(o.area) for o in objs]
    if _unique_argmin([-v for v in areas]) == target:
        out.append(Expression("the largest object", 6))
    if _unique_argmin(areas) == target:
        out.append(Expression("the smallest object", 6))
    # Stable sort: shortest first, ties keep form / enumeration order.
    return sorted(out, key=lambda e: e.num_words)


def all_unique_expressions(scene_gt: RenderedScene | Sequence[ObjectFacts], target: int) -> list[str]:
    """All unique expressions for `target`, shortest first (training may use any of them)."""
    return [e.text for e in enumerate_expressions(scene_gt, target)]


def shortest_expression(scene_gt: RenderedScene | Sequence[ObjectFacts], target: int) -> str | None:
    """The expression used for evaluation targets, or None if no form names `target` uniquely."""
    exprs = enumerate_expressions(scene_gt, target)
    return exprs[0].text if exprs else None


def referable_objects(scene_gt: RenderedScene | Sequence[ObjectFacts]) -> list[int]:
    """Indices of the objects that at least one form names uniquely (in a scene, never empty)."""
    objs = _objects(scene_gt)
    return [i for i in range(len(objs)) if enumerate_expressions(objs, i)]


def sample_expression(
    rng: np.random.Generator,
    scene_gt: RenderedScene | Sequence[ObjectFacts],
    target: int,
    mode: str = "shortest",
) -> str | None:
    """`mode="shortest"`: the evaluation rule. `mode="any"`: a uniformly drawn form among those
    available, then a uniform expression of it (a plain uniform draw would be mostly form 5)."""
    exprs = enumerate_expressions(scene_gt, target)
    if not exprs:
        return None
    if mode == "shortest":
        return exprs[0].text
    if mode != "any":
        raise ValueError(f"mode must be 'shortest' or 'any', got {mode!r}")
    forms = sorted({e.form for e in exprs})
    form = forms[int(rng.integers(len(forms)))]
    choices = [e for e in exprs if e.form == form]
    return choices[int(rng.integers(len(choices)))].text
