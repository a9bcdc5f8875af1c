"""Visual prompts that stand for `<region>` in region questions (toyworld.md, "Conversations").

Coordinates are image pixels: points are (x, y) = (column, row) indices; boxes are (x0, y0, x1, y1)
with x1, y1 exclusive, as in the renderer's ground truth. Deliberately independent of the model
package's prompt class; convert at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from omg_llava_ros.toyworld.render import ObjectGT
from omg_llava_ros.toyworld.scene import NATIVE_SIZE

PromptKind = Literal["point", "box", "mask"]
PROMPT_KINDS: tuple[PromptKind, ...] = ("point", "box", "mask")
BOX_JITTER = 4  # native px per side


@dataclass(frozen=True, eq=False)
class VisualPrompt:
    kind: PromptKind
    point: tuple[int, int] | None = None
    box: tuple[int, int, int, int] | None = None
    mask: np.ndarray | None = None  # bool (H, W)


def point_prompt(rng: np.random.Generator, obj: ObjectGT) -> VisualPrompt:
    """A pixel of the object, uniformly from its mask."""
    ys, xs = np.nonzero(obj.mask)
    i = int(rng.integers(len(xs)))
    return VisualPrompt("point", point=(int(xs[i]), int(ys[i])))


def box_prompt(rng: np.random.Generator, obj: ObjectGT, canvas_size: int) -> VisualPrompt:
    """The object's box with each side moved independently by up to 4 native px, clipped."""
    j = round(BOX_JITTER * canvas_size / NATIVE_SIZE)
    d = rng.integers(-j, j + 1, size=4)
    x0, y0, x1, y1 = (int(v) for v in np.asarray(obj.box) + d)
    x0, y0 = min(max(x0, 0), canvas_size - 1), min(max(y0, 0), canvas_size - 1)
    # Keep at least one pixel so the box is never empty.
    x1, y1 = min(max(x1, x0 + 1), canvas_size), min(max(y1, y0 + 1), canvas_size)
    return VisualPrompt("box", box=(x0, y0, x1, y1))


def mask_prompt(obj: ObjectGT) -> VisualPrompt:
    return VisualPrompt("mask", mask=obj.mask.copy())


def sample_prompt(
    rng: np.random.Generator, obj: ObjectGT, canvas_size: int, kind: PromptKind | None = None
) -> VisualPrompt:
    """A prompt of `kind`, or of a uniformly drawn kind."""
    if kind is None:
        kind = PROMPT_KINDS[int(rng.integers(len(PROMPT_KINDS)))]
    if kind == "point":
        return point_prompt(rng, obj)
    if kind == "box":
        return box_prompt(rng, obj, canvas_size)
    if kind == "mask":
        return mask_prompt(obj)
    raise ValueError(f"kind must be one of {PROMPT_KINDS}, got {kind!r}")
