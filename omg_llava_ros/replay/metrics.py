"""Replay metrics: mask quality against ground truth and timing, one definition everywhere.

cIoU = Σ intersections / Σ unions over a set of frames; gIoU = mean per-frame IoU, where an empty
prediction against an empty ground truth counts as 1 (DESIGN.md, "Metrics").

Timing follows ros2_benchmark: latency = output time - input receive time per output; output fps
= outputs / (last output - first input); jitter = |Δt_i - Δt_(i-1)| of consecutive output
inter-arrival times (how unevenly results reach a consumer).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """Running cIoU/gIoU over the frames added."""

    intersection: int = 0
    union: int = 0
    iou_sum: float = 0.0
    frames: int = 0

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


def _r(value: float, digits: int = 3) -> float:
    return round(float(value), digits)


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/max (and min/mean) in ms; None values when there was no output."""
    lat = np.asarray(latencies_ms, dtype=np.float64)
    if lat.size == 0:
        return {"p50": None, "p95": None, "max": None, "min": None, "mean": None}
    return {
        "p50": _r(np.percentile(lat, 50)),
        "p95": _r(np.percentile(lat, 95)),
        "max": _r(lat.max()),
        "min": _r(lat.min()),
        "mean": _r(lat.mean()),
    }


def jitter_summary(output_times_s: Sequence[float]) -> dict[str, float | None]:
    """Jitter of output arrival times (seconds, any origin) in ms: mean, max, std."""
    t = np.sort(np.asarray(output_times_s, dtype=np.float64))
    if t.size < 3:
        return {"mean": None, "max": None, "std": None}
    jitter = np.abs(np.diff(np.diff(t))) * 1000.0
    return {"mean": _r(jitter.mean()), "max": _r(jitter.max()), "std": _r(jitter.std())}


def output_fps(outputs: int, first_input_s: float | None, last_output_s: float | None) -> float | None:
    if outputs == 0 or first_input_s is None or last_output_s is None or last_output_s <= first_input_s:
        return None
    return _r(outputs / (last_output_s - first_input_s))
