"""Replay metrics: mask quality (``omg_llava_ros.metrics``, shared with eval) and timing.

Timing follows ros2_benchmark: latency = output time - input receive time per output; output fps
= outputs / (last output - first input); jitter = |Δt_i - Δt_(i-1)| of consecutive output
inter-arrival times (how unevenly results reach a consumer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from omg_llava_ros.metrics import IouAccumulator, mask_iou_counts, sample_iou

__all__ = ["IouAccumulator", "jitter_summary", "latency_summary", "mask_iou_counts", "output_fps", "sample_iou"]


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
