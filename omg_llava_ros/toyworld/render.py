"""Renderer of tabletop scenes with exact ground truth.

A pixel belongs to an object's mask iff its centre lies inside the ideal shape (scaled to the canvas).
Shapes are unions of convex polygons (or a disc), tested analytically on the pixel grid of the
object's bounding crop, so the masks do not depend on a rasteriser's edge rules and stay disjoint at
any canvas size (bounding circles never overlap). Anti-aliasing only changes the image, never the
masks: "supersample" blends by the fraction of 4x4 sub-pixel centres inside the shape, "cv2" uses
OpenCV's LINE_AA polygon fill (a different edge profile, for rendering variety in training).

Pixel conventions of the ground truth: (x, y) = (column, row) indices; boxes are (x0, y0, x1, y1)
with x1, y1 exclusive; centroids are the mean (x, y) index of the mask's pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from omg_llava_ros.toyworld.scene import (
    NATIVE_SIZE,
    STAR_INNER_RATIO,
    TABLE_CLASS,
    ObjectSpec,
    Scene,
)

AntiAlias = Literal["none", "supersample", "cv2"]
ANTIALIAS_MODES: tuple[AntiAlias, ...] = ("none", "supersample", "cv2")
MIN_RENDER_SIZE = 64  # below this the thinnest parts (star core) may cover no pixel centre
SUPERSAMPLE = 4
_CIRCLE_OUTLINE_VERTICES = 96  # < 0.05 px radial error at 512 px, only used by the cv2 mode
# Cross: the outer arm corners lie on the circumcircle; half-length L, half-width L/3 (arm width =
# span/3), so R^2 = L^2 + (L/3)^2.
_CROSS_HALF_LENGTH = 3.0 / math.sqrt(10.0)


@dataclass(eq=False)
class ObjectGT:
    """Ground truth of one rendered object; its panoptic label is `index + 1`."""

    index: int
    shape: str
    color: str
    size: str
    rgb: tuple[int, int, int]
    mask: np.ndarray  # bool (H, W)
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)
    centroid: tuple[float, float]  # (x, y)
    area: int

    @property
    def panoptic_id(self) -> int:
        return self.index + 1


@dataclass(eq=False)
class RenderedScene:
    """An RGB uint8 image with its ground truth. `panoptic`: 0 = table, k = objects[k - 1]."""

    image: np.ndarray  # uint8 (H, W, 3), RGB
    panoptic: np.ndarray  # uint8 (H, W)
    objects: list[ObjectGT]
    scene: Scene
    size: int
    stuff_class: str = TABLE_CLASS

    @property
    def masks(self) -> np.ndarray:
        """Object masks stacked as bool (N, H, W), in object order."""
        if not self.objects:
            return np.zeros((0, self.size, self.size), dtype=bool)
        return np.stack([o.mask for o in self.objects])


def _ring(center: tuple[float, float], radius: float, angles_deg: np.ndarray) -> np.ndarray:
    a = np.deg2rad(angles_deg)
    return np.stack([center[0] + radius * np.cos(a), center[1] + radius * np.sin(a)], axis=1)


def _rotate(center: tuple[float, float], local: np.ndarray, rotation_deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    rot = np.array([[c, -s], [s, c]])
    return local @ rot.T + np.asarray(center)


def shape_parts(obj: ObjectSpec, scale: float = 1.0) -> list[np.ndarray]:
    """The shape as convex polygons (each (K, 2) in continuous canvas coordinates).

    Angles grow clockwise on screen (y points down); at rotation 0 the triangle and the star point
    up and the square and cross are axis-aligned. Not defined for circles (they are discs).
    """
    c = (obj.center[0] * scale, obj.center[1] * scale)
    r = obj.radius * scale
    rot = obj.rotation
    k = np.arange
    if obj.shape == "square":
        return [_ring(c, r, rot + 45.0 + 90.0 * k(4))]
    if obj.shape == "triangle":
        return [_ring(c, r, rot - 90.0 + 120.0 * k(3))]
    if obj.shape == "star":
        outer = _ring(c, r, rot - 90.0 + 72.0 * k(5))
        inner = _ring(c, r * STAR_INNER_RATIO, rot - 90.0 + 36.0 + 72.0 * k(5))
        # Inner pentagon plus one triangle per tip: the star is not convex, these pieces are.
        tips = [np.stack([inner[i - 1], outer[i], inner[i]]) for i in range(5)]
        return [inner, *tips]
    if obj.shape == "cross":
        half, w = r * _CROSS_HALF_LENGTH, r * _CROSS_HALF_LENGTH / 3.0
        bar = np.array([[-half, -w], [half, -w], [half, w], [-half, w]])
        return [_rotate(c, bar, rot), _rotate(c, bar[:, ::-1], rot)]
    raise ValueError(f"no polygon parts for shape {obj.shape!r}")


def shape_outline(obj: ObjectSpec, scale: float = 1.0) -> np.ndarray:
    """The outline as one simple polygon (K, 2) in continuous canvas coordinates."""
    c = (obj.center[0] * scale, obj.center[1] * scale)
    r = obj.radius * scale
    rot = obj.rotation
    if obj.shape == "circle":
        return _ring(c, r, 360.0 * np.arange(_CIRCLE_OUTLINE_VERTICES) / _CIRCLE_OUTLINE_VERTICES)
    if obj.shape in ("square", "triangle"):
        return shape_parts(obj, scale)[0]
    if obj.shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, r, r * STAR_INNER_RATIO)
        a = np.deg2rad(rot - 90.0 + 36.0 * np.arange(10))
        return np.stack([c[0] + radii * np.cos(a), c[1] + radii * np.sin(a)], axis=1)
    if obj.shape == "cross":
        h, w = _CROSS_HALF_LENGTH, _CROSS_HALF_LENGTH / 3.0
        local = r * np.array(
            [[w, -h], [w, -w], [h, -w], [h, w], [w, w], [w, h],
             [-w, h], [-w, w], [-h, w], [-h, -w], [-w, -w], [-w, -h]]
        )  # fmt: skip
        return _rotate(c, local, rot)
    raise ValueError(f"unknown shape {obj.shape!r}")


def _inside_convex(poly: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    # Orientation-agnostic: a point is inside iff it is on the same side of every edge as the
    # polygon's interior (signed area tells which side that is). Boundary points count as inside.
    x, y = poly[:, 0], poly[:, 1]
    sign = 1.0 if np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) >= 0 else -1.0
    inside = np.ones(np.broadcast_shapes(px.shape, py.shape), dtype=bool)
    for i in range(len(poly)):
        ax, ay = poly[i]
        bx, by = poly[(i + 1) % len(poly)]
        inside &= sign * ((bx - ax) * (py - ay) - (by - ay) * (px - ax)) >= 0
    return inside


def coverage(obj: ObjectSpec, scale: float, x0: int, y0: int, width: int, height: int, samples: int = 1) -> np.ndarray:
    """Fraction of `samples`^2 regular sub-pixel points inside the shape, per pixel of the crop.

    With samples=1 this is the binary mask (pixel centre inside), as a float array.
    """
    offsets = (np.arange(samples) + 0.5) / samples
    px = (x0 + np.arange(width)[:, None] + offsets[None, :]).reshape(1, -1)
    py = (y0 + np.arange(height)[:, None] + offsets[None, :]).reshape(-1, 1)
    if obj.shape == "circle":
        cx, cy, r = obj.center[0] * scale, obj.center[1] * scale, obj.radius * scale
        inside = (px - cx) ** 2 + (py - cy) ** 2 <= r * r
    else:
        inside = np.zeros((py.shape[0], px.shape[1]), dtype=bool)
        for part in shape_parts(obj, scale):
            inside |= _inside_convex(part, px, py)
    if samples == 1:
        return inside.astype(np.float32)
    return inside.reshape(height, samples, width, samples).mean(axis=(1, 3), dtype=np.float32)


def _cv2_alpha(obj: ObjectSpec, scale: float, x0: int, y0: int, width: int, height: int) -> np.ndarray:
    shift = 4
    # OpenCV puts pixel centres on integer coordinates, ours at +0.5.
    pts = np.round((shape_outline(obj, scale) - [x0 + 0.5, y0 + 0.5]) * (1 << shift)).astype(np.int32)
    canvas = np.zeros((height, width), dtype=np.uint8)
    cv2.fillPoly(canvas, [pts], 255, lineType=cv2.LINE_AA, shift=shift)
    return canvas.astype(np.float32) / 255.0


def _crop(obj: ObjectSpec, scale: float, size: int) -> tuple[int, int, int, int]:
    # One pixel of margin so anti-aliased edges are never cut off.
    cx, cy, r = obj.center[0] * scale, obj.center[1] * scale, obj.radius * scale
    x0, y0 = max(0, math.floor(cx - r) - 1), max(0, math.floor(cy - r) - 1)
    x1, y1 = min(size, math.ceil(cx + r) + 2), min(size, math.ceil(cy + r) + 2)
    return x0, y0, x1, y1


def object_ground_truth(
    index: int, obj: ObjectSpec, panoptic: np.ndarray, crop: tuple[int, int, int, int] | None = None
) -> ObjectGT:
    """The ground truth of object `index` from a panoptic map (its pixels are label `index + 1`);
    `crop` (x0, y0, x1, y1), when given, bounds where they are looked for."""
    height, width = panoptic.shape
    x0, y0, x1, y1 = crop if crop is not None else (0, 0, width, height)
    ys, xs = np.nonzero(panoptic[y0:y1, x0:x1] == index + 1)
    if len(xs) == 0:
        raise ValueError(f"object {index} covers no pixel at size {width}")
    xs, ys = xs + x0, ys + y0
    return ObjectGT(
        index=index,
        shape=obj.shape,
        color=obj.color,
        size=obj.size,
        rgb=obj.rgb,
        mask=panoptic == index + 1,
        box=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
        centroid=(float(xs.mean()), float(ys.mean())),
        area=len(xs),
    )


def render(
    scene: Scene,
    size: int = NATIVE_SIZE,
    rng: np.random.Generator | None = None,
    *,
    antialias: AntiAlias | bool = "none",
    object_noise: bool = False,
) -> RenderedScene:
    """Renders `scene` on a `size` x `size` canvas (geometry scales by size / 256).

    The table noise is drawn from `rng` when given (e.g. per frame of a moving scene), otherwise
    from `scene.noise_seed`, so the same scene always renders the same image. Noise is i.i.d. per
    pixel and channel. toyworld.md puts the noise on the table only (default); `object_noise=True`
    adds the same noise field over the objects too, an optional training augmentation.
    `antialias=True` means "supersample".
    """
    if size < MIN_RENDER_SIZE:
        raise ValueError(f"size must be >= {MIN_RENDER_SIZE}, got {size}")
    mode = ("supersample" if antialias else "none") if isinstance(antialias, bool) else antialias
    if mode not in ANTIALIAS_MODES:
        raise ValueError(f"antialias must be one of {ANTIALIAS_MODES}, got {antialias!r}")
    if len(scene.objects) > 255:
        raise ValueError("at most 255 objects fit a uint8 panoptic map")
    scale = size / NATIVE_SIZE
    noise_rng = rng if rng is not None else np.random.default_rng(scene.noise_seed)
    noise = None
    if scene.noise_sigma > 0:
        noise = noise_rng.normal(0.0, scene.noise_sigma, size=(size, size, 3)).astype(np.float32)

    img = np.full((size, size, 3), float(scene.table_grey), dtype=np.float32)
    if noise is not None and not object_noise:
        img += noise
    panoptic = np.zeros((size, size), dtype=np.uint8)
    crops: list[tuple[int, int, int, int]] = []
    for k, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = _crop(obj, scale, size)
        crops.append((x0, y0, x1, y1))
        w, h = x1 - x0, y1 - y0
        inside = coverage(obj, scale, x0, y0, w, h) > 0
        pan = panoptic[y0:y1, x0:x1]
        pan[inside & (pan == 0)] = k + 1  # never overwrite: masks stay disjoint even if misused
        if mode == "none":
            alpha = inside.astype(np.float32)
        elif mode == "supersample":
            alpha = coverage(obj, scale, x0, y0, w, h, SUPERSAMPLE)
        else:
            alpha = _cv2_alpha(obj, scale, x0, y0, w, h)
        a = alpha[..., None]
        region = img[y0:y1, x0:x1]
        region[:] = region * (1.0 - a) + np.asarray(obj.rgb, dtype=np.float32) * a
    if noise is not None and object_noise:
        img += noise
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    objects = [
        object_ground_truth(k, obj, panoptic, crop)
        for k, (obj, crop) in enumerate(zip(scene.objects, crops, strict=True))
    ]
    return RenderedScene(image=image, panoptic=panoptic, objects=objects, scene=scene, size=size)
