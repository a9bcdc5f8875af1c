"""Visual prompts (point, box, mask) → OMG-decoder queries with their attention constraints.

As the official code does it: every prompt becomes one query whose content is the mask token plus
the prompt-type embedding, and whose position is the sine encoding of a small box (±3 model pixels)
around one point, passed through `pos_linear`:
- point: that point; the query attends where its own predicted mask is;
- box: the box centre; attention is also confined to the box at every level;
- mask: the mask's most interior point (largest distance to the outside); attention is exactly the
  mask, resized (nearest) to each level.
The decoded query ([feature; position], 512-d) becomes the `<region>` token through the object MLP.
All coordinates here are in model-input pixels (the padded, resized square).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from omg_llava_ros.model.omg_decoder import OmgDecoder, QueryConstraints
from omg_llava_ros.model.positional_encoding import coordinate_to_encoding, inverse_sigmoid


@dataclass
class EncodedPrompt:
    """A prompt in model-input pixels. kind: 'point' | 'box' | 'mask'."""

    kind: str
    point: tuple[float, float] | None = None
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None  # bool (size, size)


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the mask pixel farthest from the outside (the canvas border counts as outside)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x), float(y)


def point_query_position(points: torch.Tensor, size: int, half: float) -> torch.Tensor:
    """(N, 2) points → (N, 4) normalised (cx, cy, w, h) of the ±half box, as the decoder sees it."""
    boxes = torch.cat([points - half, points + half], dim=-1) / size
    cxcywh = torch.stack(
        [
            (boxes[:, 0] + boxes[:, 2]) / 2,
            (boxes[:, 1] + boxes[:, 3]) / 2,
            boxes[:, 2] - boxes[:, 0],
            boxes[:, 3] - boxes[:, 1],
        ],
        dim=-1,
    )
    # The official code stores the box as inverse_sigmoid and reads it back with sigmoid.
    return inverse_sigmoid(cxcywh).sigmoid()


def box_allowed(box: tuple[float, float, float, float], size: int, shape: tuple[int, int]) -> torch.Tensor:
    """(h·w,) bool: the level cells inside the box, with the official rounding (floor, end + 1)."""
    h, w = shape
    x0, y0, x1, y1 = (float(np.clip(v / size, 0.0, 1.0)) for v in box)
    sx, ex = int(np.floor(x0 * w)), int(np.floor(x1 * w + 1))
    sy, ey = int(np.floor(y0 * h)), int(np.floor(y1 * h + 1))
    allowed = torch.zeros(h, w, dtype=torch.bool)
    allowed[sy:ey, sx:ex] = True
    return allowed.flatten()


def mask_allowed(mask: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(m, size=shape, mode="nearest")[0, 0] > 0.5).flatten()


class PromptEncoder:
    """Builds decoder queries and constraints for prompts on one image, using the decoder's weights."""

    def __init__(self, decoder: OmgDecoder, image_size: int, half_size: float = 3.0):
        self.decoder = decoder
        self.image_size = image_size
        self.half_size = half_size

    def anchor_points(self, prompts: list[EncodedPrompt]) -> torch.Tensor:
        points = []
        for p in prompts:
            if p.kind == "point":
                points.append(p.point)
            elif p.kind == "box":
                x0, y0, x1, y1 = p.box
                points.append(((x0 + x1) / 2, (y0 + y1) / 2))
            elif p.kind == "mask":
                points.append(interior_point(p.mask))
            else:
                raise ValueError(f"unknown prompt kind {p.kind!r}")
        return torch.tensor(points, dtype=torch.float32)

    def queries(self, prompts: list[EncodedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """→ (N, 1, C) query content and (N, 1, C) query position."""
        dec = self.decoder
        weight = dec.pos_linear.weight
        points = self.anchor_points(prompts).to(weight.device)
        coords = point_query_position(points, self.image_size, self.half_size)
        num_feats = dec.config.hidden_dim // 2
        pos = dec.pos_linear(coordinate_to_encoding(coords.to(weight.dtype), num_feats))
        # Label 0 for every prompt kind, as in the official code.
        content = dec.pb_embedding.weight[0] + dec.mask_tokens.weight[0]
        content = content.expand(len(prompts), -1)
        return content[:, None], pos[:, None]

    def constraints(self, prompts: list[EncodedPrompt], level_shapes: list[tuple[int, int]]) -> QueryConstraints:
        allowed, use_prediction = [], []
        for p in prompts:
            per_level = []
            for shape in level_shapes:
                if p.kind == "box":
                    per_level.append(box_allowed(p.box, self.image_size, shape))
                elif p.kind == "mask":
                    per_level.append(mask_allowed(p.mask, shape))
                else:
                    per_level.append(torch.ones(shape[0] * shape[1], dtype=torch.bool))
            allowed.append(per_level)
            use_prediction.append(p.kind != "mask")
        device = self.decoder.pos_linear.weight.device
        levels = [torch.stack([a[level] for a in allowed])[:, None].to(device) for level in range(len(level_shapes))]
        return QueryConstraints(levels, torch.tensor(use_prediction, device=device)[:, None])
