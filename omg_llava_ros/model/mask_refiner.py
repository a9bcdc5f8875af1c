"""Mask refinement at the model's input resolution (ours; OMG-LLaVA has none).

The OMG decoder predicts masks on its stride-4 mask features: 64² for the embedded model's 256²
input. Upsampled bilinearly, those logits put boundaries 1-3 px off, which is a quarter of a small
object's area (mean mask IoU 0.71 for objects under 300 px against 0.90 for large ones). A small
convolutional head sees the upsampled logits beside features of the image's own pixels and corrects
them near the boundary, as CascadePSP and SAM-HQ refine masks with high-resolution image detail.

It runs after every mask decode (panoptic, visual prompt, `[SEG]`, follow) and changes nothing the
LLM sees: it is trained last (training stage 5) with everything else frozen.

Its two convolution stacks (`image_features`, `correct`) are what a vision backend may run faster
(`RefinerCompute`; ONNX Runtime on the CPU: `engines.refiner_graphs`); the choice of crops stays here.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Pixels of context the head needs around a mask: its receptive field is 1 + 2·(1 + 1 + 2 + 1 + 1).
MARGIN = 12
# Upsampled logits below this are left as they are: the head corrects boundaries, not far-away pixels.
FLOOR_LOGIT = -4.0
# The cost of one more head call, in refined pixels (measured on a 2-core CPU: ~0.3 ms a call).
BOX_OVERHEAD_PIXELS = 1500
# Pixels of context the image features need: the guide is two 3x3 convolutions.
GUIDE_MARGIN = 2


class RefinerCompute(Protocol):
    """Where the refiner's two convolution stacks run: the `MaskRefiner` module itself, or an engine
    over the same weights (a vision backend's `refiner`)."""

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def correct(self, up: torch.Tensor, features: torch.Tensor) -> torch.Tensor: ...


class MaskRefiner(nn.Module):
    """`channels` image features at full resolution (computed once per image) plus a mask's upsampled
    logits → a residual correction of those logits.

    image_features: pixels (B, 3, S, S) → (B, channels, S, S).
    forward: logits (N, h, w) at the decoder resolution, features (1, channels, S, S) → (N, S, S).
    """

    def __init__(self, channels: int = 16):
        super().__init__()
        self.guide = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1), nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1)
        )
        self.head = nn.Sequential(
            nn.Conv2d(channels + 1, channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=2, dilation=2),
            nn.GELU(),
            nn.Conv2d(channels, 1, 3, padding=1),
        )
        # Starts as the identity: plain bilinear upsampling.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.guide(pixels)

    def correct(self, up: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Upsampled logits (N, H, W) and features (N, channels, H, W) of the same crop → refined logits."""
        x = torch.cat([features, torch.tanh(up[:, None] / 4)], dim=1)
        return up + self.head(x.to(features.dtype))[:, 0].to(up.dtype)

    def forward(
        self, logits: torch.Tensor, features: torch.Tensor | ImageGuide, compute: RefinerCompute | None = None
    ) -> torch.Tensor:
        """features: the image's (1, channels, S, S), or an `ImageGuide` that computes them where needed;
        compute: where the head runs (default: this module)."""
        compute = compute or self
        up = upsample(logits, features.shape[-1])
        out = up.clone()
        # Each mask is refined only inside the boxes of its own regions (with the head's context
        # around them): objects are small, so this is a fraction of the image.
        for i in range(len(up)):
            for (top, bottom), (left, right) in crop_boxes(up[i] > FLOOR_LOGIT):
                crop = up[i : i + 1, top:bottom, left:right]
                if isinstance(features, ImageGuide):
                    window = features.crop(top, bottom, left, right)
                else:
                    window = features[:1, :, top:bottom, left:right]
                out[i, top:bottom, left:right] = compute.correct(crop, window)[0]
        return out


class ImageGuide:
    """The refiner's image features of one image, computed only where masks need them.

    A follow frame refines one or two small objects; the guide over the whole 256² image cost more
    than everything else the refiner does. Each crop is computed from the pixels around it (widened
    by the guide's own `GUIDE_MARGIN`, so the values equal the whole image's), until the crops asked
    for cover the image once: then the whole image's features are computed and kept.
    pixels: (1, 3, S, S) the model input; refiner: where the features are computed.
    """

    def __init__(self, refiner: RefinerCompute, pixels: torch.Tensor):
        self.refiner, self.pixels = refiner, pixels
        self.shape = pixels.shape
        self._full: torch.Tensor | None = None
        self._area = 0

    def full(self) -> torch.Tensor:
        if self._full is None:
            self._full = self.refiner.image_features(self.pixels)
        return self._full

    def crop(self, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
        """(1, channels, bottom - top, right - left): the features of rows top..bottom, columns left..right."""
        self._area += (bottom - top) * (right - left)
        if self._full is not None or self._area >= self.shape[-1] * self.shape[-2]:
            return self.full()[:, :, top:bottom, left:right]
        size_y, size_x = self.shape[-2:]
        y0, x0 = max(top - GUIDE_MARGIN, 0), max(left - GUIDE_MARGIN, 0)
        y1, x1 = min(bottom + GUIDE_MARGIN, size_y), min(right + GUIDE_MARGIN, size_x)
        features = self.refiner.image_features(self.pixels[:, :, y0:y1, x0:x1])
        return features[:, :, top - y0 : bottom - y0, left - x0 : right - x0]


def upsample(logits: torch.Tensor, side: int) -> torch.Tensor:
    """(N, h, w) decoder logits → (N, side, side), bilinear."""
    return F.interpolate(logits[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)[:, 0]


Box = tuple[tuple[int, int], tuple[int, int]]


def crop_boxes(region: torch.Tensor) -> list[Box]:
    """Disjoint boxes, each as `crop_box` gives, that cover every pixel of a bool (H, W) region with
    the head's context `MARGIN` around it.

    Why not one box: a query's logits are often above `FLOOR_LOGIT` on a second object far away (the
    other squares, for "the leftmost square"), and one box around both is most of the image (190 x 227
    pixels instead of two 50 x 50 ones). The head's output at a pixel depends only on the `MARGIN`
    pixels around it, so refining each group of nearby pixels in its own box changes no pixel of
    the region (outside it, at logits ≤ `FLOOR_LOGIT`, only the context at a box's edge differs);
    boxes that overlap are merged so that none is refined twice.
    """
    import cv2

    mask = region.cpu().numpy().astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    height, width = mask.shape
    boxes = [
        [max(y - MARGIN, 0), min(y + h + MARGIN, height), max(x - MARGIN, 0), min(x + w + MARGIN, width)]
        for x, y, w, h in stats[1:count, :4].tolist()
    ]
    merged = True
    while merged:  # union overlapping boxes until none overlap
        merged = False
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                p, q = boxes[a], boxes[b]
                if p[0] < q[1] and q[0] < p[1] and p[2] < q[3] and q[2] < p[3]:
                    boxes[a] = [min(p[0], q[0]), max(p[1], q[1]), min(p[2], q[2]), max(p[3], q[3])]
                    del boxes[b]
                    merged = True
                    break
            if merged:
                break
    if not boxes:
        return []
    # Each head call costs about as much as refining BOX_OVERHEAD_PIXELS more pixels: one box around
    # everything when splitting would not save that.
    one = [min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes)]
    if len(boxes) > 1 and sum(_area(b) + BOX_OVERHEAD_PIXELS for b in boxes) >= _area(one) + BOX_OVERHEAD_PIXELS:
        boxes = [one]
    return [((t, b), (left, right)) for t, b, left, right in boxes]


def _area(box: list[int]) -> int:
    return (box[1] - box[0]) * (box[3] - box[2])


def crop_box(region: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The (rows, columns) ranges the refiner works on for a bool (H, W) region: its box widened by
    the head's context `MARGIN`, clipped to the image; None for an empty region."""
    rows, cols = torch.nonzero(region, as_tuple=True)
    if len(rows) == 0:
        return None
    return tuple(
        (max(int(idx.min()) - MARGIN, 0), min(int(idx.max()) + MARGIN + 1, size))
        for idx, size in ((rows, region.shape[0]), (cols, region.shape[1]))
    )
