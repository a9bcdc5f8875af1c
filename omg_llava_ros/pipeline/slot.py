"""Hand-over between transport callbacks and the worker thread.

``LatestFrameSlot`` keeps only the newest item: inference is slower than the camera, and a queue
would make every output later than the one before (latency grows without bound). Replaced items
are counted as skipped, the number users need to see when the node cannot keep up.

``StampedBuffer`` keeps the last few items of a side stream (depth) to pair them with a frame by
stamp, like an approximate time synchroniser with a bounded slop.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from omg_llava_ros.pipeline.types import NANOSECONDS, Stamp, stamp_to_ns

T = TypeVar("T")


@dataclass(frozen=True)
class SlotStats:
    received: int  # items put
    taken: int  # items handed to the worker
    skipped: int  # items replaced before the worker took them


class LatestFrameSlot(Generic[T]):
    """A one-item mailbox: ``put`` replaces an unconsumed item (counted as skipped), ``take`` blocks."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._has_item = False
        self._closed = False
        self._received = 0
        self._taken = 0
        self._skipped = 0

    def put(self, item: T) -> bool:
        """Store item as the newest; returns True when it replaced one the worker never took."""
        with self._cond:
            replaced = self._has_item
            if replaced:
                self._skipped += 1
            self._item, self._has_item = item, True
            self._received += 1
            self._cond.notify()
            return replaced

    def take(self, timeout: float | None = None) -> T | None:
        """The newest item, removing it; None on timeout or once closed and empty."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._has_item or self._closed, timeout):
                return None
            if not self._has_item:
                return None
            item, self._item, self._has_item = self._item, None, False
            self._taken += 1
            return item

    def clear(self) -> None:
        """Drop a waiting item without counting it (e.g. on deactivate)."""
        with self._cond:
            self._item, self._has_item = None, False

    def close(self) -> None:
        """Wake every waiting ``take``; later takes return what is left, then None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False

    @property
    def stats(self) -> SlotStats:
        with self._cond:
            return SlotStats(self._received, self._taken, self._skipped)

    @property
    def skipped(self) -> int:
        with self._cond:
            return self._skipped


class StampedBuffer(Generic[T]):
    """The last ``capacity`` (stamp, item) pairs; ``closest(stamp)`` pairs a frame with one of them."""

    def __init__(self, capacity: int = 8) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._items: deque[tuple[int, Stamp, T]] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, stamp: Stamp, item: T) -> None:
        with self._lock:
            self._items.append((stamp_to_ns(stamp), stamp, item))

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def closest(self, stamp: Stamp) -> tuple[Stamp, T, float] | None:
        """(its stamp, item, |offset| in seconds) of the item nearest in time, or None when empty."""
        target = stamp_to_ns(stamp)
        with self._lock:
            if not self._items:
                return None
            ns, item_stamp, item = min(self._items, key=lambda entry: abs(entry[0] - target))
        return item_stamp, item, abs(ns - target) / NANOSECONDS
