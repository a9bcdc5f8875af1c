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

import cv2
import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class PerceptionPrior:
    """pixel_prior: (B, T, 2C) per-token prior embedding; object_tokens: list of (n_b, 2C) per image;
    object_indices: list of (n_b,) query indices, in token order (ascending for the official
    selection; left to right, then stuff, for "merged"); prob: (B, Q, h, w) P on the token grid;
    object_masks: list of (n_b, h, w) mask logits of each object token (its query's, or one piece of
    them with "split"); object_centroids: list of (n_b, 2) mask centroids in [0, 1], where the
    model locates objects; object_areas: list of (n_b,) mask areas as fractions of the grid, 0 for
    stuff, where the pointer weighs relations."""

    pixel_prior: torch.Tensor
    object_tokens: list[torch.Tensor]
    object_indices: list[torch.Tensor]
    prob: torch.Tensor
    object_masks: list[torch.Tensor]
    object_centroids: list[torch.Tensor] | None = None
    object_areas: list[torch.Tensor] | None = None


# What the logits of a mask outside its piece become ("split"): well below zero.
OUTSIDE_PIECE_LOGIT = -10.0
# The least area of a piece that counts as an object of its own, in cells of the decoder's stride-4
# mask grid (`separate_pieces`).
PIECE_MIN_CELLS = 8


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
    num_thing_classes: int | None = None,
) -> PerceptionPrior:
    """class_logits (B, Q, K+1), mask_logits (B, Q, h, w), query_feat/pos (B, Q, C) → PerceptionPrior.
    object_grid: "tokens" selects the object tokens on the token grid (official), "mask" on the
    (h, w) grid of the mask logits, "merged" the mask-grid winners without duplicates, left to
    right (`merged_selection`), "split" as "merged" with one token per separate object-sized piece
    of a thing's mask (`split_pieces`)."""
    if object_grid not in ("tokens", "mask", "merged", "split"):
        raise ValueError(f"object_grid must be 'tokens', 'mask', 'merged' or 'split', got {object_grid!r}")
    queries = torch.cat([query_feat, query_pos.expand_as(query_feat)], dim=-1)  # (B, Q, 2C)
    s = confidence(class_logits)
    # Paper ("additive"): MS = softmax over queries of (sigmoid mask ⊙ score), no smoothing.
    scale = s if variant == "additive" else s * smooth_ratio + (1 - smooth_ratio)
    prob = exact_prior_resize(mask_logits, scale, input_size, grid)
    weights = prob.flatten(2).softmax(dim=1)  # over queries, per token: (B, Q, T)
    pixel_prior = torch.matmul(weights.transpose(1, 2), queries)  # (B, T, 2C)
    if variant == "none":
        pixel_prior = torch.zeros_like(pixel_prior)
    if object_grid in ("mask", "merged", "split"):
        winners = (scale[..., None, None] * mask_logits.sigmoid()).flatten(2).argmax(dim=1)  # (B, h·w)
    else:
        winners = prob.flatten(2).argmax(dim=1)  # (B, T)
    things = class_logits.shape[-1] - 1 if num_thing_classes is None else num_thing_classes
    best = class_logits[..., :-1].argmax(-1)  # (B, Q) best non-background class
    object_tokens, object_indices, object_masks = [], [], []
    for b in range(queries.shape[0]):
        idx = torch.unique(winners[b])  # sorted ascending, as the official boolean selection
        masks = None
        if object_grid in ("merged", "split"):
            idx = merged_selection(idx, s[b], best[b], mask_logits[b], things)
        if object_grid == "split":
            idx, masks = split_pieces(idx, best[b], mask_logits[b], things)
        object_indices.append(idx)
        object_tokens.append(queries[b, idx])
        object_masks.append(mask_logits[b, idx] if masks is None else masks)
    return PerceptionPrior(pixel_prior, object_tokens, object_indices, prob, object_masks)


def merged_selection(
    candidates: torch.Tensor,
    confidence: torch.Tensor,
    labels: torch.Tensor,
    mask_logits: torch.Tensor,
    num_thing_classes: int,
    iou_threshold: float = 0.5,
) -> torch.Tensor:
    """Object tokens without duplicates, in reading order: candidates (n,) query indices (the
    mask-grid winners), confidence (Q,) and labels (Q,) (best non-background class), mask_logits
    (Q, h, w) → query indices, things left to right by the x centroid of their masks, then one
    query per stuff class.

    Why: a small decoder often puts two queries on one object; both win some pixels, and a
    from-scratch LLM then counts the object twice. Mask non-maximum suppression in confidence order
    drops a thing whose mask (sigmoid ≥ 0.5) overlaps a more confident thing's mask by more than
    `iou_threshold`. Neighbours whose masks bleed into each other overlap far less than that; a
    greedy pixel-taking merge (Mask2Former's) dropped them, and its score threshold dropped good
    masks with a high no-object probability, so neither is used here.
    """
    masks = mask_logits[candidates].float() >= 0  # sigmoid ≥ 0.5
    order = confidence[candidates].argsort(descending=True, stable=True).tolist()
    xs = torch.arange(masks.shape[-1], dtype=torch.float32)
    accepted: list[int] = []
    things: list[tuple[float, int]] = []
    stuff: dict[int, int] = {}
    for k in order:
        q, label, area = int(candidates[k]), int(labels[candidates[k]]), int(masks[k].sum())
        if label >= num_thing_classes:
            stuff.setdefault(label, q)
            continue
        if area == 0:
            continue
        inter = (masks[accepted] & masks[k]).flatten(1).sum(1).float()
        union = masks[accepted].flatten(1).sum(1).float() + area - inter
        if len(accepted) and float((inter / union).max()) > iou_threshold:
            continue
        accepted.append(k)
        things.append((float((masks[k].float().sum(0) * xs).sum()) / area, q))
    ordered = [q for _, q in sorted(things)] + [stuff[k] for k in sorted(stuff)]
    return torch.tensor(ordered, dtype=torch.long)


def split_pieces(
    indices: torch.Tensor,
    labels: torch.Tensor,
    mask_logits: torch.Tensor,
    num_thing_classes: int,
    min_area: float = PIECE_MIN_CELLS,
    min_ratio: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One object token per separate piece of a thing's mask: indices (n,) as `merged_selection`
    gives them, labels (Q,), mask_logits (Q, h, w) → query indices (a query repeated once per piece)
    and (m, h, w) mask logits of each token, its query's logits with everything outside its piece at
    OUTSIDE_PIECE_LOGIT; things left to right by the x centroid of their piece, then stuff as given.

    Why: the small decoder often gives two objects alike (two red squares) one query whose mask
    covers both, and the LLM then counts and lists one object. A piece (8-connected, sigmoid ≥ 0.5)
    becomes an object of its own when it has at least `min_area` mask cells and `min_ratio` of the
    largest piece's area, and another thing's mask does not cover most of it (a mask bleeding onto
    its neighbour). On 300 scenes of the embedded model, every query covering two objects had a
    second piece of ≥ 6 cells and ≥ 0.1 of the first, against 9 in 1013 single-object queries.
    The token is the query's (same content, so the same colour and shape); the object-location term
    (`object_location`) then tells the pieces apart by their centroids.
    """
    things = [int(q) for q in indices if int(labels[q]) < num_thing_classes]
    stuff = [int(q) for q in indices if int(labels[q]) >= num_thing_classes]
    binary = (mask_logits[things] >= 0).cpu().numpy()
    outside = mask_logits.new_tensor(OUTSIDE_PIECE_LOGIT)
    pieces: list[tuple[float, int, torch.Tensor]] = []  # (x centroid, query, logits)
    for i, q in enumerate(things):
        others = np.delete(binary, i, axis=0).any(0) if len(things) > 1 else None
        found = separate_pieces(binary[i], others, min_area, min_ratio)
        for piece in found:
            x = float(np.nonzero(piece)[1].mean()) if piece.any() else 0.0
            if len(found) > 1:
                keep = torch.from_numpy(piece).to(mask_logits.device)
                pieces.append((x, q, torch.where(keep, mask_logits[q], outside)))
            else:
                pieces.append((x, q, mask_logits[q]))
    pieces.sort(key=lambda p: p[0])
    index = torch.tensor([q for _, q, _ in pieces] + stuff, dtype=torch.long, device=indices.device)
    logits = [m for _, _, m in pieces] + [mask_logits[q] for q in stuff]
    masks = torch.stack(logits) if logits else mask_logits[:0]
    return index, masks


def separate_pieces(
    mask: np.ndarray, covered: np.ndarray | None = None, min_area: float = PIECE_MIN_CELLS, min_ratio: float = 0.15
) -> list[np.ndarray]:
    """A thing's (h, w) bool mask → the masks of the objects in it: `[mask]` when it is one object,
    else the largest piece together with the bits too small to be objects, then each other piece
    (8-connected) of at least `min_area` cells and `min_ratio` of the largest piece, that `covered`
    (another thing's mask, if given) does not cover for the most part."""
    count, parts, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:  # background + at most one piece
        return [mask]
    areas = stats[1:, cv2.CC_STAT_AREA]
    largest = int(areas.argmax()) + 1
    split = [
        c
        for c in range(1, count)
        if c != largest
        and areas[c - 1] >= min_area
        and areas[c - 1] >= min_ratio * areas[largest - 1]
        and (covered is None or (covered & (parts == c)).sum() <= 0.5 * areas[c - 1])
    ]
    if not split:
        return [mask]
    return [mask & ~np.isin(parts, split)] + [parts == c for c in split]


def piece_followed(mask: np.ndarray, previous: np.ndarray, min_area: float = PIECE_MIN_CELLS) -> np.ndarray:
    """The part of a followed object's new (H, W) bool mask that is the object of `previous` (its
    mask on the last frame): with `separate_pieces` of it, the piece overlapping `previous` most (by
    centroid distance when none overlaps); else `mask` itself.

    Why: a query that covered two objects alike finds both on every new frame; followed from one of
    them (a split token's `[SEG]`, a split `perceive` segment), the mask must stay on that one.
    Objects move a few pixels a frame, so the right piece overlaps the last mask."""
    pieces = separate_pieces(mask, None, min_area)
    if len(pieces) == 1 or not previous.any():
        return mask
    overlaps = [int((p & previous).sum()) for p in pieces]
    if max(overlaps) > 0:
        return pieces[int(np.argmax(overlaps))]
    ys, xs = np.nonzero(previous)
    centre = np.array([xs.mean(), ys.mean()])
    dist = [np.linalg.norm(np.array([np.nonzero(p)[1].mean(), np.nonzero(p)[0].mean()]) - centre) for p in pieces]
    return pieces[int(np.argmin(dist))]


def literal_prior_resize(logits: torch.Tensor, scale: torch.Tensor, input_size: int, grid: tuple[int, int]):
    """The official computation, step by step (for tests; memory-hungry at full size)."""
    up = F.interpolate(logits, size=(input_size, input_size), mode="bilinear", align_corners=False)
    prob = scale[..., None, None] * up.sigmoid()
    return F.interpolate(prob, size=grid, mode="bilinear", align_corners=False)
