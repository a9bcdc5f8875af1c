"""Losses: Mask2Former's set criterion for the perception module and OMG-LLaVA's mask loss on `[SEG]`.

Masks are compared at the decoder's stride-4 resolution (64² for the 256² embedded model), where a
full-image loss is cheap, instead of the official point sampling.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

# Official weights (OMG-LLaVA compute_seg_loss / Mask2Former): BCE 5 × 0.4, Dice 5 × 0.1 on [SEG];
# Mask2Former set criterion: class 2, BCE 5, Dice 5, background class weight 0.1.
SEG_BCE_WEIGHT = 2.0
SEG_DICE_WEIGHT = 0.5
SET_CLASS_WEIGHT = 2.0
SET_BCE_WEIGHT = 5.0
SET_DICE_WEIGHT = 5.0
NO_OBJECT_WEIGHT = 0.1


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, P) logits and targets → (N,) Dice loss (eps 1, as the official naive Dice)."""
    p = logits.sigmoid()
    num = 2 * (p * targets).sum(-1)
    den = p.sum(-1) + targets.sum(-1)
    return 1 - (num + 1) / (den + 1)


def bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)


def resize_masks(masks: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(M, H, W) bool → (M, h, w) float by area averaging (soft targets at the decoder resolution)."""
    t = torch.as_tensor(np.asarray(masks), dtype=torch.float32)
    if t.shape[-2:] == size:
        return t
    return F.adaptive_avg_pool2d(t[None], size)[0]


@torch.no_grad()
def hungarian_match(class_logits: torch.Tensor, mask_logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor):
    """One image: (Q, K+1), (Q, P), (M,), (M, P) → (query indices, target indices)."""
    prob = class_logits.float().softmax(-1)
    cost_class = -prob[:, labels]
    m = mask_logits.float()
    pos = F.binary_cross_entropy_with_logits(m, torch.ones_like(m), reduction="none")
    neg = F.binary_cross_entropy_with_logits(m, torch.zeros_like(m), reduction="none")
    cost_bce = (pos @ masks.T + neg @ (1 - masks).T) / m.shape[-1]
    p = m.sigmoid()
    cost_dice = 1 - (2 * p @ masks.T + 1) / (p.sum(-1)[:, None] + masks.sum(-1)[None] + 1)
    cost = SET_CLASS_WEIGHT * cost_class + SET_BCE_WEIGHT * cost_bce + SET_DICE_WEIGHT * cost_dice
    q, t = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(q, dtype=torch.long), torch.as_tensor(t, dtype=torch.long)


def set_criterion(
    class_logits: list[torch.Tensor],
    mask_logits: list[torch.Tensor],
    targets: list[tuple[torch.Tensor, torch.Tensor]],
    class_weight: float = SET_CLASS_WEIGHT,
) -> torch.Tensor:
    """Deep-supervised panoptic loss. class_logits[l]: (B, Q, K+1); mask_logits[l]: (B, Q, h, w);
    targets[b] = (labels (M,), masks (M, h·w) float). `class_weight` scales the classification term
    (Mask2Former: 2)."""
    total = class_logits[0].new_zeros((), dtype=torch.float32)
    num_classes = class_logits[0].shape[-1] - 1
    weight = torch.ones(num_classes + 1)
    weight[-1] = NO_OBJECT_WEIGHT
    for cls, masks in zip(class_logits, mask_logits, strict=True):
        b, q = cls.shape[:2]
        flat = masks.flatten(2).float()
        target_classes = torch.full((b, q), num_classes, dtype=torch.long)
        mask_terms = []
        for i, (labels, gt) in enumerate(targets):
            qi, ti = hungarian_match(cls[i], flat[i], labels, gt)
            target_classes[i, qi] = labels[ti]
            mask_terms.append((flat[i, qi], gt[ti]))
        total = total + class_weight * F.cross_entropy(cls.float().flatten(0, 1), target_classes.flatten(), weight)
        pred = torch.cat([p for p, _ in mask_terms])
        gt = torch.cat([g for _, g in mask_terms])
        total = total + SET_BCE_WEIGHT * bce_loss(pred, gt).mean() + SET_DICE_WEIGHT * dice_loss(pred, gt).mean()
    return total / len(class_logits)


def mask_loss(mask_logits: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Deep-supervised BCE + Dice for single queries: mask_logits[l] (N, 1, h, w); targets (N, h·w).
    Summed over predictions, as the official `[SEG]` loss."""
    total = targets.new_zeros(())
    for logits in mask_logits:
        flat = logits[:, 0].flatten(1).float()
        total = (
            total + SEG_BCE_WEIGHT * bce_loss(flat, targets).mean() + SEG_DICE_WEIGHT * dice_loss(flat, targets).mean()
        )
    return total
