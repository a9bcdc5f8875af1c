"""Mask + registered depth + pinhole intrinsics -> 3D points in the camera's optical frame."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from omg_llava_ros.pipeline.types import CameraIntrinsics


def _intrinsics(K: CameraIntrinsics | Sequence[float] | np.ndarray) -> CameraIntrinsics:
    return K if isinstance(K, CameraIntrinsics) else CameraIntrinsics.from_k(K)


def lift_to_3d(mask: np.ndarray, depth_m: np.ndarray, K: CameraIntrinsics | Sequence[float] | np.ndarray) -> np.ndarray:
    """The mask's pixels with a valid depth, back-projected: N×3 float32 (x, y, z) metres.

    Pixel (u, v) is column u, row v at the pixel's centre, the convention of CameraInfo.K and
    depth_image_proc: x = (u - cx) z / fx, y = (v - cy) z / fy. Invalid depth (NaN, inf, <= 0)
    is skipped. Raises ValueError when mask and depth differ in shape.
    """
    mask = np.asarray(mask)
    depth = np.asarray(depth_m)
    if mask.ndim != 2 or depth.ndim != 2:
        raise ValueError(f"mask and depth must be H×W, got {mask.shape} and {depth.shape}")
    if mask.shape != depth.shape:
        raise ValueError(f"mask {mask.shape[1]}x{mask.shape[0]} and depth {depth.shape[1]}x{depth.shape[0]} differ")
    k = _intrinsics(K)
    with np.errstate(invalid="ignore"):
        valid = mask.astype(bool) & np.isfinite(depth) & (depth > 0)
    v, u = np.nonzero(valid)
    z = depth[v, u].astype(np.float64)
    points = np.empty((len(z), 3), dtype=np.float32)
    points[:, 0] = (u - k.cx) * z / k.fx
    points[:, 1] = (v - k.cy) * z / k.fy
    points[:, 2] = z
    return points


def centroid(points: np.ndarray) -> np.ndarray:
    """Per-axis median of N×3 points (float64); NaNs for no points.

    The median, not the mean: mask edges often include a few background pixels metres behind the
    object, and a mean would drag the grasp target towards them.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(pts) == 0:
        return np.full(3, np.nan)
    return np.median(pts, axis=0)


def subsample(points: np.ndarray, max_points: int) -> np.ndarray:
    """At most max_points rows, evenly strided (deterministic, so clouds do not flicker)."""
    if max_points <= 0 or len(points) <= max_points:
        return points
    idx = np.linspace(0, len(points) - 1, max_points).round().astype(np.int64)
    return points[idx]
