"""Mask quality against ground truth, one definition for eval, replay and the tests.

cIoU = Σ intersections / Σ unions over a set of samples; gIoU = mean per-sample IoU, where an empty
prediction against an empty ground truth counts as 1 (DESIGN.md, "Metrics"). Both are None for an
empty set: no samples, no figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def mask_iou_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """(intersection, union) pixel counts of two boolean masks of the same shape."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and ground truth {g.shape} differ in shape")
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


def sample_iou(intersection: int, union: int) -> float:
    return 1.0 if union == 0 else intersection / union


@dataclass
class IouAccumulator:
    """Running cIoU/gIoU over the samples (frames, questions) added."""

    intersection: int = 0
    union: int = 0
    iou_sum: float = 0.0
    frames: int = 0

    def add_masks(self, pred: np.ndarray, gt: np.ndarray) -> float:
        """Add one sample from its boolean masks; returns its IoU."""
        return self.add(*mask_iou_counts(pred, gt))

    def add(self, intersection: int, union: int) -> float:
        self.intersection += intersection
        self.union += union
        iou = sample_iou(intersection, union)
        self.iou_sum += iou
        self.frames += 1
        return iou

    @property
    def ciou(self) -> float | None:
        if self.frames == 0:
            return None
        return 1.0 if self.union == 0 else self.intersection / self.union

    @property
    def giou(self) -> float | None:
        return self.iou_sum / self.frames if self.frames else None
