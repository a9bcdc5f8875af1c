"""Instance-id images and the colour overlay for viewing (plain numpy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# A fixed palette so an object keeps its colour across frames in follow mode (id 1 is always red).
PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [255, 225, 25],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 190],
    ],
    dtype=np.uint8,
)


def instance_image(masks: Sequence[np.ndarray], shape: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
    """Paint masks into an H×W uint16 id image (mask i -> i + 1) and return the ids actually present.

    Where masks overlap the earlier mask wins: the first [SEG] is the object the command asked
    for, so it should not lose pixels to later ones. An id that owns no pixel is reported as 0.
    """
    if len(masks) > np.iinfo(np.uint16).max:
        raise ValueError(f"at most 65535 objects fit a uint16 instance image, got {len(masks)}")
    ids = np.zeros(shape, dtype=np.uint16)
    for i in range(len(masks) - 1, -1, -1):
        mask = np.asarray(masks[i], dtype=bool)
        if mask.shape != tuple(shape):
            raise ValueError(f"mask {i} has shape {mask.shape}, expected {tuple(shape)}")
        ids[mask] = i + 1
    present = np.zeros(len(masks) + 1, dtype=bool)
    present[np.unique(ids)] = True
    return ids, [i + 1 if present[i + 1] else 0 for i in range(len(masks))]


def render_overlay(image: np.ndarray, instance_ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB image with each instance tinted in its palette colour (H×W×3 uint8, a new array)."""
    rgb = np.asarray(image, dtype=np.uint8)
    ids = np.asarray(instance_ids)
    if rgb.shape[:2] != ids.shape:
        raise ValueError(f"image {rgb.shape[:2]} and instance ids {ids.shape} differ in size")
    out = rgb.astype(np.float32)
    hit = ids > 0
    if hit.any():
        colours = PALETTE[(ids[hit].astype(np.int64) - 1) % len(PALETTE)].astype(np.float32)
        out[hit] = (1.0 - alpha) * out[hit] + alpha * colours
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
