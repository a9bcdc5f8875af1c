"""Small overlay images over time, for the report, with bounded memory on long bags."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from omg_llava_ros.pipeline.overlay import render_overlay
from omg_llava_ros.pipeline.types import Result, Stamp


@dataclass(frozen=True)
class Thumbnail:
    stamp: Stamp
    log_time_ns: int
    follow: bool
    jpeg: bytes = field(repr=False)
    iou: float | None = None


def make_thumbnail(
    result: Result, log_time_ns: int = 0, max_side: int = 120, alpha: float = 0.5, iou: float | None = None
) -> Thumbnail:
    """The result's overlay, shrunk to max_side and JPEG-encoded."""
    import cv2

    rgb = render_overlay(result.image, result.instance_ids, alpha)
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:  # cv2 only fails on an empty image, which a Result cannot hold
        raise ValueError("could not encode the thumbnail")
    return Thumbnail(result.stamp, int(log_time_ns), result.follow, buf.tobytes(), iou)


class ThumbnailStrip:
    """Keeps evenly spaced thumbnails of a stream of unknown length in O(keep) memory.

    Every stride-th offer is kept; when 2*keep are held, every other one is dropped and the stride
    doubles, so what is held stays evenly spaced over everything offered so far.
    """

    def __init__(self, keep: int = 8) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.keep = keep
        self.stride = 1
        self.offered = 0
        self._items: list[Thumbnail] = []

    def wants_next(self) -> bool:
        """Whether the next offer will be kept (so the caller can skip rendering it)."""
        return self.offered % self.stride == 0

    def offer(self, thumb: Thumbnail | None) -> None:
        if self.wants_next() and thumb is not None:
            self._items.append(thumb)
            if len(self._items) >= 2 * self.keep:
                self._items = self._items[::2]
                self.stride *= 2
        self.offered += 1

    def selected(self) -> list[Thumbnail]:
        """At most keep thumbnails, first and last included, in time order."""
        items = self._items
        if len(items) <= self.keep:
            return list(items)
        idx = np.unique(np.linspace(0, len(items) - 1, self.keep).round().astype(int))
        return [items[i] for i in idx]
