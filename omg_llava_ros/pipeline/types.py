"""Plain data in and out of the pipeline: frames, commands, results. No ROS, no torch.

Stamps are ``(sec, nanosec)`` tuples, exactly the two fields of ``builtin_interfaces/Time``, so a
header can be copied into a result and back without any float rounding (consumers match outputs
to frames with an *exact* time synchroniser).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

Stamp = tuple[int, int]

NANOSECONDS = 1_000_000_000


def stamp_to_ns(stamp: Stamp) -> int:
    """(sec, nanosec) -> integer nanoseconds (exact, unlike a float of seconds)."""
    return int(stamp[0]) * NANOSECONDS + int(stamp[1])


def ns_to_stamp(ns: int) -> Stamp:
    sec, nanosec = divmod(int(ns), NANOSECONDS)
    return sec, nanosec


def check_stamp(stamp: object, what: str = "stamp") -> Stamp:
    """Validate a (sec, nanosec) pair and return it as a tuple of ints."""
    if not isinstance(stamp, (tuple, list)) or len(stamp) != 2:
        raise ValueError(f"{what} must be a (sec, nanosec) pair, got {stamp!r}")
    sec, nanosec = stamp
    if isinstance(sec, bool) or isinstance(nanosec, bool):
        raise ValueError(f"{what} must hold integers, got {stamp!r}")
    try:
        sec_i, nanosec_i = int(sec), int(nanosec)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must hold integers, got {stamp!r}") from None
    if sec_i != sec or nanosec_i != nanosec:
        raise ValueError(f"{what} must hold integers, got {stamp!r}")
    if not 0 <= nanosec_i < NANOSECONDS:
        raise ValueError(f"{what} nanosec must be in [0, 1e9), got {nanosec_i}")
    return sec_i, nanosec_i


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics of the (colour) camera, as in sensor_msgs/CameraInfo.k.

    width/height: the image size the intrinsics belong to (0 = unknown, not checked).
    """

    fx: float
    fy: float
    cx: float
    cy: float
    width: int = 0
    height: int = 0

    def __post_init__(self) -> None:
        for name in ("fx", "fy", "cx", "cy"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"camera intrinsics {name} must be finite, got {getattr(self, name)}")
        # fx = fy = 0 is what an uncalibrated driver publishes; lifting with it divides by zero.
        if self.fx <= 0 or self.fy <= 0:
            raise ValueError(f"camera intrinsics need fx > 0 and fy > 0, got fx={self.fx}, fy={self.fy}")

    @classmethod
    def from_k(cls, k: Sequence[float] | np.ndarray, width: int = 0, height: int = 0) -> CameraIntrinsics:
        """From a row-major 3×3 camera matrix (CameraInfo.k: 9 numbers, or a 3×3 array)."""
        arr = np.asarray(k, dtype=np.float64).reshape(-1)
        if arr.size != 9:
            raise ValueError(f"camera matrix K needs 9 values, got {arr.size}")
        return cls(float(arr[0]), float(arr[4]), float(arr[2]), float(arr[5]), int(width), int(height))

    @property
    def matrix(self) -> np.ndarray:
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])


@dataclass
class Frame:
    """One camera frame.

    image: H×W×3 uint8 RGB. stamp/frame_id: the source image header, copied to every output.
    depth: optional H×W float32 metres registered to the image (NaN = no return), with the
    intrinsics of the colour camera; depth_stamp is the depth image's own stamp (for the
    time-offset check). received_at: when the transport received the image, on the pipeline's
    clock (time.monotonic by default); None means "now" at process time.
    warnings: notes from the transport side (e.g. "no depth frame near this stamp") that are
    carried into the result's warnings.
    """

    image: np.ndarray
    stamp: Stamp
    frame_id: str = ""
    depth: np.ndarray | None = None
    intrinsics: CameraIntrinsics | None = None
    depth_stamp: Stamp | None = None
    received_at: float | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Command:
    """A language command. id increases with every command (stop commands included).

    stamp: frames older than this are not used to answer it (None: any frame).
    text: what the LLM sees (after truncation and removal of control tokens); original_length is
    the received length, for logs.
    """

    id: int
    text: str
    stamp: Stamp | None = None
    received_at: float | None = None
    original_length: int = 0
    warnings: tuple[str, ...] = ()

    @property
    def is_stop(self) -> bool:
        return not self.text


@dataclass
class Target3D:
    """An object's depth points in the camera frame of the source image, metres.

    points: N×3 float32 (x right, y down, z forward: the optical frame). centroid: per-axis
    median, robust to mask pixels that spill onto the background behind the object.
    """

    points: np.ndarray
    centroid: np.ndarray

    @property
    def num_points(self) -> int:
        return int(len(self.points))


@dataclass
class DetectedObject:
    """One grounded object of a result.

    id: "1", "2", ... in [SEG] order, stable within one result; also the Detection2D id.
    mask_index: this object's value in the result's instance image, 0 when it owns no pixel there
    (empty mask, or entirely covered by an earlier object).
    box: (x0, y0, x1, y1) pixel bounds, end exclusive; None for an empty mask.
    """

    id: str
    phrase: str
    score: float
    box: tuple[int, int, int, int] | None
    mask_index: int
    mask: np.ndarray = field(repr=False)
    label: str | None = None
    target: Target3D | None = None


@dataclass
class Result:
    """What one processed frame produces, with everything needed to match it to frame and command."""

    stamp: Stamp
    frame_id: str
    command_id: int
    command: str
    text: str
    clean_text: str
    follow: bool
    objects: list[DetectedObject]
    instance_ids: np.ndarray  # H×W uint16, 0 = none, else DetectedObject.mask_index
    latency_ms: float
    image: np.ndarray = field(repr=False)  # the source frame (for overlays and reports)
    warnings: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[DetectedObject]:
        """Objects that have a 3D target, in [SEG] order (the first is the primary target)."""
        return [o for o in self.objects if o.target is not None and o.target.num_points > 0]
