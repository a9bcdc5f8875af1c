"""Sine positional encodings of the OMG decoder (DETR style, as mmdet computes them).

- `sine_position_encoding`: per pixel of an h×w map, normalised cumulative coordinates scaled to
  2π, encoded with `num_feats` interleaved sin/cos features for y then x → 2·num_feats channels.
- `frame_position_term`: the decoder uses the 3-D (video) variant with one frame; its extra frame
  term is the same vector at every position. It is kept for fidelity — added to the keys only, it
  shifts every attention logit of a query equally and so cannot change the attention.
- `coordinate_to_encoding`: a normalised (cx, cy, w, h) box → 4·num_feats features (y, x, w, h),
  the position of a visual-prompt query.
"""

from __future__ import annotations

import math

import torch

TWO_PI = 2 * math.pi


def _frequencies(num_feats: int, temperature: float, device=None) -> torch.Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """(…, F) angles → (…, F) with sin on even and cos on odd features."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_encoding(
    height: int,
    width: int,
    num_feats: int,
    temperature: float = 10000.0,
    eps: float = 1e-6,
    device=None,
) -> torch.Tensor:
    """(h·w, 2·num_feats) encoding of an unpadded h×w map, rows first, [y-features, x-features]."""
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * TWO_PI
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * TWO_PI
    freqs = _frequencies(num_feats, temperature, device)
    pos_y = _interleave_sin_cos(y[:, None] / freqs)  # (h, F)
    pos_x = _interleave_sin_cos(x[:, None] / freqs)  # (w, F)
    pos = torch.cat(
        (pos_y[:, None, :].expand(height, width, num_feats), pos_x[None, :, :].expand(height, width, num_feats)),
        dim=-1,
    )
    return pos.reshape(height * width, 2 * num_feats)


def frame_position_term(num_feats: int, temperature: float = 10000.0, eps: float = 1e-6, device=None) -> torch.Tensor:
    """The (2·num_feats,) frame-axis term of the 3-D encoding for a single frame."""
    z = torch.tensor([1.0 / (1.0 + eps) * TWO_PI], device=device)
    return _interleave_sin_cos(z[:, None] / _frequencies(2 * num_feats, temperature, device))[0]


def coordinate_to_encoding(coords: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0) -> torch.Tensor:
    """(…, 2 or 4) normalised coordinates (x, y[, w, h]) → (…, 2 or 4 · num_feats), order y, x, w, h."""
    freqs = _frequencies(num_feats, temperature, coords.device)
    parts = [_interleave_sin_cos(coords[..., i, None] * TWO_PI / freqs) for i in range(coords.shape[-1])]
    if coords.shape[-1] == 2:
        return torch.cat((parts[1], parts[0]), dim=-1)
    if coords.shape[-1] == 4:
        return torch.cat((parts[1], parts[0], parts[2], parts[3]), dim=-1)
    raise ValueError(f"expected 2 or 4 coordinates, got {coords.shape[-1]}")


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
