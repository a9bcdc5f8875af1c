"""A second renderer of the tabletop world, written apart from `render.py`, for robustness checks.

The embedded model is judged on scenes that other renderers draw by the same rules (toyworld.md),
and our own renderer's quirks are what training sees. This one shares only the scene description
(`Scene`, `ObjectSpec`) and rasterises with Pillow's polygon and ellipse fill — other edge rules,
its own vertex layout (each shape starts at a different angle), pixel centres at +0.5 — and its own
choices where the rules leave room: noise the same on all three channels or not, over the objects
or not, and anti-aliasing by drawing at `supersample`× and box-filtering down. The ground-truth
mask of an object is the pixels its (down-sampled) coverage fills at least half of.
`eval --renderer pil` draws its scenes with it.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from omg_llava_ros.toyworld.render import MIN_RENDER_SIZE, RenderedScene, object_ground_truth
from omg_llava_ros.toyworld.scene import NATIVE_SIZE, STAR_INNER_RATIO, ObjectSpec, Scene


def outline(obj: ObjectSpec, scale: float) -> list[tuple[float, float]]:
    """The shape's polygon in pixel-edge coordinates (pixel (i, j) spans [i, i+1) × [j, j+1))."""
    cx, cy, r = (obj.center[0] + 0.5) * scale, (obj.center[1] + 0.5) * scale, obj.radius * scale
    a0 = math.radians(obj.rotation)

    def ring(radii: list[float], step: float, start: float) -> list[tuple[float, float]]:
        return [
            (cx + rr * math.cos(a0 + start + i * step), cy + rr * math.sin(a0 + start + i * step))
            for i, rr in enumerate(radii)
        ]

    if obj.shape == "square":
        return ring([r] * 4, math.pi / 2, 0.0)
    if obj.shape == "triangle":
        return ring([r] * 3, 2 * math.pi / 3, 0.0)
    if obj.shape == "star":
        return ring([r, r * STAR_INNER_RATIO] * 5, math.pi / 5, 0.0)
    if obj.shape == "cross":
        # Twelve corners of a plus sign of span 2L and arm width 2L/3; the arm ends' outer corners
        # lie on the circumcircle: r² = L² + (L/3)².
        half = r * 3.0 / math.sqrt(10.0)
        w = half / 3.0
        local = [(w, -half), (w, -w), (half, -w), (half, w), (w, w), (w, half)]
        local += [(-x, -y) for x, y in local]
        c, s = math.cos(a0), math.sin(a0)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in local]
    raise ValueError(f"no outline for shape {obj.shape!r}")


def _coverage(obj: ObjectSpec, size: int, supersample: int) -> np.ndarray:
    """Fraction of each pixel the shape covers, float32 (size, size)."""
    big = size * supersample
    layer = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(layer)
    scale = big / NATIVE_SIZE
    if obj.shape == "circle":
        cx, cy, r = (obj.center[0] + 0.5) * scale, (obj.center[1] + 0.5) * scale, obj.radius * scale
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(outline(obj, scale), fill=255)
    if supersample > 1:
        layer = layer.resize((size, size), Image.Resampling.BOX)
    return np.asarray(layer, dtype=np.float32) / 255.0


def render_pil(
    scene: Scene,
    size: int = NATIVE_SIZE,
    rng: np.random.Generator | None = None,
    *,
    supersample: int = 1,
    grey_noise: bool = False,
    noise_on_objects: bool = False,
) -> RenderedScene:
    """Draws `scene` at `size`² with Pillow. Noise comes from `rng` when given, else from the scene's
    seed; `grey_noise` adds one value per pixel to all channels; `noise_on_objects` noises the whole
    image instead of the table only."""
    if size < MIN_RENDER_SIZE:
        raise ValueError(f"size must be >= {MIN_RENDER_SIZE}, got {size}")
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    noise_rng = rng if rng is not None else np.random.default_rng(scene.noise_seed)
    channels = 1 if grey_noise else 3
    noise = noise_rng.normal(0.0, scene.noise_sigma, (size, size, channels)).astype(np.float32)

    canvas = np.full((size, size, 3), float(scene.table_grey), np.float32)
    if not noise_on_objects:
        canvas += noise
    panoptic = np.zeros((size, size), np.uint8)
    for k, obj in enumerate(scene.objects):
        alpha = _coverage(obj, size, supersample)
        panoptic[(alpha >= 0.5) & (panoptic == 0)] = k + 1
        canvas = canvas * (1.0 - alpha[..., None]) + np.asarray(obj.rgb, np.float32) * alpha[..., None]
    if noise_on_objects:
        canvas += noise
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    objects = [object_ground_truth(k, obj, panoptic) for k, obj in enumerate(scene.objects)]
    return RenderedScene(image=image, panoptic=panoptic, objects=objects, scene=scene, size=size)


def pil_options(rng: np.random.Generator) -> dict:
    """Random `render_pil` options: 1× or 4× supersampling, grey or colour noise, on the table or
    everywhere."""
    return {
        "supersample": (1, 4)[int(rng.integers(2))],
        "grey_noise": bool(rng.integers(2)),
        "noise_on_objects": bool(rng.integers(2)),
    }


def random_render_pil(scene: Scene, size: int, rng: np.random.Generator) -> RenderedScene:
    """`render_pil` with options drawn from `rng` (`pil_options`), its noise too."""
    return render_pil(scene, size, rng, **pil_options(rng))
