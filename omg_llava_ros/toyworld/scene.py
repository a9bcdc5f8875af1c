"""Vocabulary and scene sampler of the tabletop world (shared/toyworld.md, "Scenes").

A `Scene` is pure geometry and attributes; `render` turns it into pixels. Geometry is kept in native
256-px units (`NATIVE_SIZE`) so one scene renders at any canvas size by scaling linearly. Continuous
coordinates span [0, 256] and put the centre of pixel (column x, row y) at (x + 0.5, y + 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NATIVE_SIZE = 256

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (230, 210, 50),
    "purple": (150, 70, 190),
    "orange": (240, 140, 40),
}

# Circumradius ranges in native pixels.
SIZES: dict[str, tuple[float, float]] = {"small": (12.0, 20.0), "large": (28.0, 40.0)}

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")

MIN_OBJECTS = 1
MAX_OBJECTS = 6
MIN_GAP = 4.0  # native px between bounding circles
COLOR_JITTER = 15  # per channel, uniform integer in [-15, 15]
TABLE_GREY_RANGE: tuple[int, int] = (90, 170)  # inclusive
NOISE_SIGMA_RANGE: tuple[float, float] = (0.0, 8.0)
STAR_INNER_RATIO = 0.45
TABLE_CLASS = "table"  # the panoptic "stuff" class of label 0


@dataclass(frozen=True)
class ObjectSpec:
    """One object in native units. `rotation` is in degrees (0 for circles)."""

    shape: str
    color: str
    rgb: tuple[int, int, int]
    size: str
    radius: float  # circumradius
    center: tuple[float, float]  # (x, y)
    rotation: float = 0.0


@dataclass(frozen=True)
class Scene:
    """A tabletop scene. `noise_seed` makes the table noise, and so `render(scene)`, reproducible."""

    objects: tuple[ObjectSpec, ...]
    table_grey: int = 130
    noise_sigma: float = 0.0
    noise_seed: int = 0


def article(color: str) -> str:
    """The indefinite article before a colour word ("an orange star", "a red star")."""
    return "an" if color[0] in "aeiou" else "a"


def number_word(n: int) -> str:
    if not 0 <= n < len(NUMBER_WORDS):
        raise ValueError(f"no number word for {n}")
    return NUMBER_WORDS[n]


def size_word(radius: float) -> str:
    """The size class of a circumradius in native px (raises if it falls between the classes)."""
    for word, (lo, hi) in SIZES.items():
        if lo <= radius <= hi:
            return word
    raise ValueError(f"radius {radius} is in no size class")


def fits(
    center: tuple[float, float],
    radius: float,
    others: Sequence[ObjectSpec],
    canvas: float = NATIVE_SIZE,
    gap: float = MIN_GAP,
) -> bool:
    """Whether a bounding circle lies inside the canvas and at least `gap` from every other one."""
    x, y = center
    if x - radius < 0 or y - radius < 0 or x + radius > canvas or y + radius > canvas:
        return False
    return all(math.hypot(x - o.center[0], y - o.center[1]) >= radius + o.radius + gap for o in others)


def make_object(
    shape: str,
    color: str,
    center: tuple[float, float],
    radius: float,
    rotation: float = 0.0,
    rgb: tuple[int, int, int] | None = None,
) -> ObjectSpec:
    """Builds an object by hand (tests, demos); the size word follows from the radius."""
    if shape not in SHAPES or color not in COLORS:
        raise ValueError(f"unknown shape/colour {shape!r}/{color!r}")
    return ObjectSpec(
        shape=shape,
        color=color,
        rgb=COLORS[color] if rgb is None else rgb,
        size=size_word(radius),
        radius=float(radius),
        center=(float(center[0]), float(center[1])),
        rotation=0.0 if shape == "circle" else float(rotation) % 360.0,
    )


def jittered_rgb(rng: np.random.Generator, color: str) -> tuple[int, int, int]:
    """The RGB of one object of colour `color`: its nominal value with a per-channel jitter."""
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    c = np.clip(np.array(COLORS[color]) + jitter, 0, 255)
    return (int(c[0]), int(c[1]), int(c[2]))


def _sample_attributes(rng: np.random.Generator) -> tuple[str, str, tuple[int, int, int], str, float, float]:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    rgb = jittered_rgb(rng, color)
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    radius = float(rng.uniform(*SIZES[size]))
    # A circle has no visible orientation; keeping 0 makes its spec canonical.
    rotation = 0.0 if shape == "circle" else float(rng.uniform(0.0, 360.0))
    return shape, color, rgb, size, radius, rotation


def sample_scene(
    rng: np.random.Generator,
    num_objects: int | None = None,
    *,
    placement_tries: int = 50,
    max_restarts: int = 200,
) -> Scene:
    """Samples a scene obeying every rule of toyworld.md.

    Objects are placed one by one by rejection sampling; when one finds no free spot the whole
    layout restarts (keeping the object count), so crowded scenes stay possible without biasing
    the attribute distribution toward small objects more than necessary.
    """
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)) if num_objects is None else num_objects
    if not MIN_OBJECTS <= n <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be in [{MIN_OBJECTS}, {MAX_OBJECTS}], got {n}")
    table_grey = int(rng.integers(TABLE_GREY_RANGE[0], TABLE_GREY_RANGE[1] + 1))
    noise_sigma = float(rng.uniform(*NOISE_SIGMA_RANGE))
    noise_seed = int(rng.integers(2**63 - 1))
    for _ in range(max_restarts):
        objects: list[ObjectSpec] = []
        for _ in range(n):
            shape, color, rgb, size, radius, rotation = _sample_attributes(rng)
            for _ in range(placement_tries):
                center = (
                    float(rng.uniform(radius, NATIVE_SIZE - radius)),
                    float(rng.uniform(radius, NATIVE_SIZE - radius)),
                )
                if fits(center, radius, objects):
                    objects.append(ObjectSpec(shape, color, rgb, size, radius, center, rotation))
                    break
            else:
                break  # no room for this object: restart the layout
        if len(objects) == n:
            return Scene(tuple(objects), table_grey, noise_sigma, noise_seed)
    raise RuntimeError(f"could not place {n} objects in {max_restarts} restarts")
