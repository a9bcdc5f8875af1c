"""Perception-prior embedding (PPE): the panoptic result folded into the LLM's pixel tokens.

The official code (the variant the released weights expect), per image, last decoder layer:
  s_q = max over non-background classes of softmax(class logits)         (confidence)
  P_q = (ratio·s_q + (1 − ratio)) · sigmoid(mask logits at input size)    (ratio 0.5)
  P   resized bilinearly to the pixel-token grid; W = softmax over queries, per pixel
  E   = W · [Q_feat ; Q_pos]   → concatenated to the pixel-shuffled image features
  object-centric tokens = [Q_feat ; Q_pos] of the queries that win the argmax of P at ≥ 1 token.
The paper writes it differently (MS = softmax(M ⊙ S), T = MS·Q + F, added); that variant is kept as
"additive" for the ablation, and "none" zeroes the prior.

"At input size" matters because the sigmoid is taken after the upsampling: the official code
upsamples the stride-4 logits to the model input size, applies the sigmoid and only then resizes
to the token grid. Doing it literally costs a (queries × S × S) tensor; `exact_prior_resize` gets the
same numbers from the few input-size rows and columns the final bilinear resize actually reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PerceptionPrior:
    """pixel_prior: (B, T, 2C) per-token prior embedding; object_tokens: list of (n_b, 2C) per image;
    object_indices: list of (n_b,) query indices, ascending; prob: (B, Q, h, w) P on the token grid."""

    pixel_prior: torch.Tensor
    object_tokens: list[torch.Tensor]
    object_indices: list[torch.Tensor]
    prob: torch.Tensor


def bilinear_matrix(src: int, dst: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(dst, src) matrix M with M @ x == 1-D bilinear resize of x (align_corners=False)."""
    scale = src / dst
    pos = ((torch.arange(dst, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0)
    lo = pos.floor().long().clamp(max=src - 1)
    hi = (lo + 1).clamp(max=src - 1)
    frac = pos - lo
    m = torch.zeros(dst, src, dtype=torch.float64)
    rows = torch.arange(dst)
    m[rows, lo] += 1 - frac
    m[rows, hi] += frac
    return m.to(dtype=dtype, device=device)


def exact_prior_resize(
    logits: torch.Tensor, scale: torch.Tensor, input_size: int, grid: tuple[int, int]
) -> torch.Tensor:
    """interp(scale · sigmoid(interp(logits, input_size)), grid), without the input-size tensor.

    logits (B, Q, h, w); scale (B, Q). Separable: each bilinear resize is a matrix per axis; only the
    input-size rows/columns with a non-zero weight in the final resize are computed.
    """
    b, q, h, w = logits.shape
    dt, dev = logits.dtype, logits.device
    out_h = bilinear_matrix(input_size, grid[0], dt, dev)  # (gh, S)
    out_w = bilinear_matrix(input_size, grid[1], dt, dev)  # (gw, S)
    rows = out_h.abs().sum(0).nonzero().flatten()
    cols = out_w.abs().sum(0).nonzero().flatten()
    up_h = bilinear_matrix(h, input_size, dt, dev)[rows]  # (r, h)
    up_w = bilinear_matrix(w, input_size, dt, dev)[cols]  # (c, w)
    sub = torch.matmul(torch.matmul(up_h, logits), up_w.T)  # (B, Q, r, c) at input size
    prob = scale[..., None, None] * sub.sigmoid()
    return torch.matmul(torch.matmul(out_h[:, rows], prob), out_w[:, cols].T)


def confidence(class_logits: torch.Tensor) -> torch.Tensor:
    """(B, Q, K+1) → (B, Q) best non-background probability."""
    return class_logits.softmax(-1)[..., :-1].amax(-1)


def perception_prior(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    query_feat: torch.Tensor,
    query_pos: torch.Tensor,
    input_size: int,
    grid: tuple[int, int],
    smooth_ratio: float = 0.5,
    variant: str = "concat",
    object_grid: str = "tokens",
) -> PerceptionPrior:
    """class_logits (B, Q, K+1), mask_logits (B, Q, h, w), query_feat/pos (B, Q, C) → PerceptionPrior.
    object_grid: "tokens" selects the object tokens on the token grid (official), "mask" on the
    (h, w) grid of the mask logits."""
    if object_grid not in ("tokens", "mask"):
        raise ValueError(f"object_grid must be 'tokens' or 'mask', got {object_grid!r}")
    queries = torch.cat([query_feat, query_pos.expand_as(query_feat)], dim=-1)  # (B, Q, 2C)
    s = confidence(class_logits)
    # Paper ("additive"): MS = softmax over queries of (sigmoid mask ⊙ score), no smoothing.
    scale = s if variant == "additive" else s * smooth_ratio + (1 - smooth_ratio)
    prob = exact_prior_resize(mask_logits, scale, input_size, grid)
    weights = prob.flatten(2).softmax(dim=1)  # over queries, per token: (B, Q, T)
    pixel_prior = torch.matmul(weights.transpose(1, 2), queries)  # (B, T, 2C)
    if variant == "none":
        pixel_prior = torch.zeros_like(pixel_prior)
    if object_grid == "mask":
        winners = (scale[..., None, None] * mask_logits.sigmoid()).flatten(2).argmax(dim=1)  # (B, h·w)
    else:
        winners = prob.flatten(2).argmax(dim=1)  # (B, T)
    object_tokens, object_indices = [], []
    for b in range(queries.shape[0]):
        idx = torch.unique(winners[b])  # sorted ascending, as the official boolean selection
        object_indices.append(idx)
        object_tokens.append(queries[b, idx])
    return PerceptionPrior(pixel_prior, object_tokens, object_indices, prob)


def literal_prior_resize(logits: torch.Tensor, scale: torch.Tensor, input_size: int, grid: tuple[int, int]):
    """The official computation, step by step (for tests; memory-hungry at full size)."""
    up = F.interpolate(logits, size=(input_size, input_size), mode="bilinear", align_corners=False)
    prob = scale[..., None, None] * up.sigmoid()
    return F.interpolate(prob, size=grid, mode="bilinear", align_corners=False)
