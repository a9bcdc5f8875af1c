"""Mask refinement at the model's input resolution (ours; OMG-LLaVA has none).

The OMG decoder predicts masks on its stride-4 mask features: 64² for the embedded model's 256²
input. Upsampled bilinearly, those logits put boundaries 1-3 px off, which is a quarter of a small
object's area (mean mask IoU 0.71 for objects under 300 px against 0.90 for large ones). A small
convolutional head sees the upsampled logits beside features of the image's own pixels and corrects
them near the boundary, as CascadePSP and SAM-HQ refine masks with high-resolution image detail.

It runs after every mask decode (panoptic, visual prompt, `[SEG]`, follow) and changes nothing the
LLM sees: it is trained last (training stage 5) with everything else frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Pixels of context the head needs around a mask: its receptive field is 1 + 2·(1 + 1 + 2 + 1 + 1).
MARGIN = 12
# Upsampled logits below this are left as they are: the head corrects boundaries, not far-away pixels.
FLOOR_LOGIT = -4.0


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

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        up = upsample(logits, features.shape[-1])
        out = up.clone()
        # Each mask is refined only inside its own box (with the head's context around it): objects
        # are small, so this is a fraction of the image.
        for i in range(len(up)):
            box = crop_box(up[i] > FLOOR_LOGIT)
            if box is None:
                continue
            (top, bottom), (left, right) = box
            crop = up[i : i + 1, top:bottom, left:right]
            out[i, top:bottom, left:right] = self.correct(crop, features[:1, :, top:bottom, left:right])[0]
        return out


def upsample(logits: torch.Tensor, side: int) -> torch.Tensor:
    """(N, h, w) decoder logits → (N, side, side), bilinear."""
    return F.interpolate(logits[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)[:, 0]


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
