"""Pixel shuffle (space-to-channel) of the last encoder stage into the LLM's pixel tokens.

With factor r, the (B, C, H, W) map becomes (B, (H/r)·(W/r), r·r·C): each token stacks the r×r
neighbourhood, and channel index (dy·r + dx)·C + c holds input channel c at offset (dy, dx) — the
order the official projector weights were trained on. Tokens are in row-major order.
"""

from __future__ import annotations

import torch


def pixel_shuffle(features: torch.Tensor, ratio: int = 2) -> torch.Tensor:
    """(B, C, H, W) → (B, H/r · W/r, r² · C)."""
    b, c, h, w = features.shape
    if h % ratio or w % ratio:
        raise ValueError(f"feature map {h}×{w} is not divisible by the shuffle ratio {ratio}")
    x = features.reshape(b, c, h // ratio, ratio, w // ratio, ratio)
    x = x.permute(0, 3, 5, 1, 2, 4)  # (B, dy, dx, C, H/r, W/r)
    x = x.reshape(b, ratio * ratio * c, (h // ratio) * (w // ratio))
    return x.transpose(1, 2)
