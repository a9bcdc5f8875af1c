"""Write small rosbag2 bags by hand: any encoding, any storage, and deliberately broken messages.

For tests and for reproducing a problem someone reported with a bag ("one frame with a short
data field") without a ROS install.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omg_llava_ros.pipeline.types import ns_to_stamp
from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.image_conversion import mono8_fields, rgb_to_image_fields

# Raw encodings image_fields can produce from an RGB image (besides rgb_to_image_fields' four).
RAW_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC3", "mono16")
COMPRESSED_FORMATS = ("jpeg", "png")


def grey(rgb: np.ndarray) -> np.ndarray:
    """The single channel image_fields stores for mono encodings (the red channel: exact, no rounding)."""
    return np.ascontiguousarray(np.asarray(rgb)[..., 0])


def image_fields(rgb: np.ndarray, encoding: str, stamp_ns: int, frame_id: str = "camera") -> dict[str, Any]:
    """sensor_msgs/Image fields holding ``rgb`` in ``encoding`` (mono encodings keep the red channel)."""
    header = m.header_fields(ns_to_stamp(stamp_ns), frame_id)
    if encoding in ("rgb8", "bgr8", "rgba8", "bgra8"):
        return {"header": header, **rgb_to_image_fields(rgb, encoding)}
    if encoding == "8UC3":  # OpenCV's layout: BGR without saying so
        return {"header": header, **rgb_to_image_fields(rgb, "bgr8"), "encoding": "8UC3"}
    if encoding == "mono8":
        return {"header": header, **mono8_fields(grey(rgb))}
    if encoding == "mono16":
        wide = grey(rgb).astype("<u2") << 8  # the converter keeps the high byte
        h, w = wide.shape
        return {
            "header": header,
            "height": h,
            "width": w,
            "encoding": "mono16",
            "is_bigendian": 0,
            "step": w * 2,
            "data": wide.view(np.uint8).reshape(-1),
        }
    raise ValueError(f"image_fields cannot write encoding {encoding!r}")


def compressed_fields(rgb: np.ndarray, fmt: str, stamp_ns: int, frame_id: str = "camera") -> dict[str, Any]:
    """sensor_msgs/CompressedImage fields, encoded as image_transport does ("rgb8; jpeg compressed bgr8")."""
    import cv2

    if fmt not in COMPRESSED_FORMATS:
        raise ValueError(f"compressed format must be jpeg or png, got {fmt!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if fmt == "jpeg" else []
    ok, buf = cv2.imencode(f".{'jpg' if fmt == 'jpeg' else 'png'}", np.ascontiguousarray(rgb[..., ::-1]), params)
    if not ok:
        raise ValueError("could not encode the image")
    return {
        "header": m.header_fields(ns_to_stamp(stamp_ns), frame_id),
        "format": f"rgb8; {fmt} compressed bgr8",
        "data": buf.reshape(-1),
    }


@dataclass
class BagEntry:
    """One message to write: ``fields`` are serialised with the typestore, ``raw`` bytes as they are."""

    topic: str
    msgtype: str
    log_time_ns: int
    fields: dict[str, Any] | None = None
    raw: bytes | None = None


def write_bag(
    path: str | Path,
    entries: Iterable[BagEntry],
    storage: str = "mcap",
    custom: dict[str, str] | None = None,
) -> Path:
    """A new rosbag2 folder at ``path`` with the entries, in the order given."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    path = Path(path)
    conv = m.RosbagsMessages(m.make_typestore())
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    writer = Writer(path, version=8, storage_plugin=plugin)
    for key, value in (custom or {}).items():
        writer.set_custom_data(key, value)
    connections: dict[tuple[str, str], Any] = {}
    with writer:
        for entry in entries:
            key = (entry.topic, entry.msgtype)
            if key not in connections:
                connections[key] = writer.add_connection(entry.topic, entry.msgtype, typestore=conv.typestore)
            data = entry.raw if entry.raw is not None else conv.serialize(entry.msgtype, entry.fields or {})
            writer.write(connections[key], entry.log_time_ns, data)
    return path
