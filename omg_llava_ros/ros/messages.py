"""Pipeline results <-> ROS messages, without ROS: everything here is plain Python + numpy.

Outputs are built as nested *field dicts* (field name -> value; a nested message is a dict, a
message array a list of dicts, a numeric array a numpy array). One dict feeds every transport:
the rclpy transport copies it onto rclpy messages; the replay and the tests turn it into
``rosbags`` messages and CDR (``RosbagsMessages``). Inputs are read duck-typed, so rclpy and
rosbags messages work alike.

Every output carries the header of the image it was computed from (stamp and frame_id unchanged),
so consumers can join outputs to frames with an exact time synchroniser.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from omg_llava_ros.pipeline.lifting import subsample
from omg_llava_ros.pipeline.overlay import render_overlay
from omg_llava_ros.pipeline.types import CameraIntrinsics, Result, Stamp
from omg_llava_ros.ros.image_conversion import (
    ImageConversionError,
    compressed_to_rgb,
    depth_to_meters,
    image_to_rgb,
    mono8_fields,
    mono16_fields,
    rgb_to_image_fields,
)

# Message type names, ROS 2 spelling.
IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
POINT_CLOUD2 = "sensor_msgs/msg/PointCloud2"
POSE_STAMPED = "geometry_msgs/msg/PoseStamped"
STRING = "std_msgs/msg/String"
DETECTION2D_ARRAY = "vision_msgs/msg/Detection2DArray"
GROUNDED_SEGMENTATION = "omg_llava_ros_interfaces/msg/GroundedSegmentation"

# vision_msgs 4.x (Humble, Jazzy) detection types; rosbags' bundled stores lack vision_msgs.
# BoundingBox2D and its parts come from interfaces.register_types.
VISION_DETECTION_DEFINITIONS: dict[str, str] = {
    "vision_msgs/msg/ObjectHypothesis": "string class_id\nfloat64 score\n",
    "vision_msgs/msg/ObjectHypothesisWithPose": (
        "vision_msgs/ObjectHypothesis hypothesis\ngeometry_msgs/PoseWithCovariance pose\n"
    ),
    "vision_msgs/msg/Detection2D": (
        "std_msgs/Header header\nvision_msgs/ObjectHypothesisWithPose[] results\n"
        "vision_msgs/BoundingBox2D bbox\nstring id\n"
    ),
    "vision_msgs/msg/Detection2DArray": "std_msgs/Header header\nvision_msgs/Detection2D[] detections\n",
}

# sensor_msgs/PointField datatype constants.
POINT_FIELD_UINT16 = 4
POINT_FIELD_UINT32 = 6
POINT_FIELD_FLOAT32 = 7
# Target cloud layout: x, y, z float32 and the owning object's id (1, 2, ... in [SEG] order) as
# uint32: 16 bytes, every field naturally aligned; RViz can colour by the "object" channel.
CLOUD_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("object", "<u4")])
CLOUD_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("x", 0, POINT_FIELD_FLOAT32),
    ("y", 4, POINT_FIELD_FLOAT32),
    ("z", 8, POINT_FIELD_FLOAT32),
    ("object", 12, POINT_FIELD_UINT32),
)


class MessageError(ValueError):
    """A received message could not be used; the text says why (logged, message skipped)."""


# -- typestore ------------------------------------------------------------------------------------
def make_typestore(distro: str = "humble") -> Any:
    """A rosbags typestore with the ROS 2 distro's types, vision_msgs detections and ours."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    from omg_llava_ros.ros.interfaces import register_types

    stores = {"humble": Stores.ROS2_HUMBLE, "jazzy": Stores.ROS2_JAZZY}
    if distro not in stores:
        raise ValueError(f"unknown distro {distro!r}; choose one of {', '.join(stores)}")
    store = get_typestore(stores[distro])
    register_types(store)
    types: dict[str, Any] = {}
    for name, text in VISION_DETECTION_DEFINITIONS.items():
        if name not in store.fielddefs:
            types.update(get_types_from_msg(text, name))
    store.register(types)
    return store


_NUMPY_BASE = {
    "bool": np.bool_,
    "int8": np.int8,
    "uint8": np.uint8,
    "byte": np.uint8,
    "char": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "uint64": np.uint64,
    "float32": np.float32,
    "float64": np.float64,
}


class RosbagsMessages:
    """Field dicts -> rosbags message objects and CDR bytes, filling unset fields with defaults."""

    def __init__(self, typestore: Any | None = None) -> None:
        self.typestore = typestore if typestore is not None else make_typestore()

    def build(self, msgtype: str, fields: Mapping[str, Any] | None = None) -> Any:
        fields = dict(fields or {})
        try:
            _, defs = self.typestore.fielddefs[msgtype]
        except KeyError:
            raise MessageError(f"unknown message type {msgtype!r}") from None
        unknown = set(fields) - {name for name, _ in defs}
        if unknown:
            raise MessageError(f"{msgtype} has no field(s) {', '.join(sorted(unknown))}")
        values = {name: self._value(ftype, fields.get(name)) for name, ftype in defs}
        return self.typestore.types[msgtype](**values)

    def _value(self, ftype: tuple[Any, Any], value: Any) -> Any:
        node, detail = ftype
        kind = int(node)
        if kind == 1:  # base type
            name = detail[0]
            if value is None:
                return "" if name == "string" else (False if name == "bool" else _NUMPY_BASE[name](0).item())
            return value
        if kind == 2:  # nested message
            if value is not None and not isinstance(value, Mapping):
                return value  # already a message object
            return self.build(detail, value)
        inner, size = detail
        inner_kind, inner_detail = inner
        if int(inner_kind) == 1 and inner_detail[0] != "string":
            dtype = _NUMPY_BASE[inner_detail[0]]
            if value is None:
                return np.zeros(size if kind == 3 else 0, dtype=dtype)
            return np.ascontiguousarray(np.asarray(value, dtype=dtype).reshape(-1))
        items = list(value or [])
        if kind == 3 and not items:
            items = [None] * size
        return [self._value(inner, item) for item in items]

    def serialize(self, msgtype: str, message: Mapping[str, Any] | Any) -> bytes:
        msg = self.build(msgtype, message) if isinstance(message, Mapping) else message
        return bytes(self.typestore.serialize_cdr(msg, msgtype))

    def deserialize(self, raw: bytes | memoryview, msgtype: str) -> Any:
        return self.typestore.deserialize_cdr(raw, msgtype)


# -- reading inputs -------------------------------------------------------------------------------
def header_stamp(msg: Any) -> Stamp:
    """(sec, nanosec) of msg.header.stamp; MessageError when missing or not integers."""
    try:
        stamp = msg.header.stamp
        sec, nanosec = stamp.sec, stamp.nanosec
    except AttributeError as exc:
        raise MessageError(f"message has no header stamp: {exc}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (sec, nanosec)):
        raise MessageError(f"header stamp must hold integers, got {sec!r}, {nanosec!r}")
    if not 0 <= int(nanosec) < 1_000_000_000:
        raise MessageError(f"header stamp nanosec out of range: {nanosec}")
    return int(sec), int(nanosec)


def header_frame_id(msg: Any) -> str:
    frame_id = getattr(getattr(msg, "header", None), "frame_id", "")
    return frame_id if isinstance(frame_id, str) else ""


def rgb_from_message(msg: Any, compressed: bool = False) -> np.ndarray:
    """Image or CompressedImage -> H×W×3 uint8 RGB; ImageConversionError when malformed."""
    return compressed_to_rgb(msg) if compressed else image_to_rgb(msg)


def depth_from_message(msg: Any) -> np.ndarray:
    """16UC1 (mm) or 32FC1 (m) depth Image -> H×W float32 metres; ImageConversionError when bad."""
    return depth_to_meters(msg)


def intrinsics_from_camera_info(msg: Any) -> CameraIntrinsics:
    """CameraInfo -> intrinsics of the image it describes; MessageError for an unusable K."""
    try:
        k = np.asarray(msg.k, dtype=np.float64).reshape(-1)
        width, height = int(msg.width), int(msg.height)
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:  # OverflowError: an infinite size
        raise MessageError(f"unusable camera_info: {exc}") from None
    try:
        return CameraIntrinsics.from_k(k, width, height)
    except ValueError as exc:
        raise MessageError(f"unusable camera_info: {exc}") from None


def command_text(msg: Any) -> str:
    """std_msgs/String -> text. Bytes (a transport that hands raw data) decode with errors='replace'."""
    data = getattr(msg, "data", None)
    if isinstance(data, str):
        return data
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data).decode("utf-8", errors="replace")
    raise MessageError(f"command message has no string data (got {type(data).__name__})")


@dataclass
class StringMessage:
    """A decoded std_msgs/String (what decode_string_cdr returns)."""

    data: str


def decode_string_cdr(raw: bytes | memoryview) -> StringMessage:
    """std_msgs/String CDR -> text, invalid UTF-8 replaced by U+FFFD instead of failing.

    Generic CDR decoders reject invalid UTF-8; a robot's command topic should not lose a command
    over one bad byte, so this one is tolerant. Layout: 4-byte encapsulation header, uint32 length
    (including the terminating NUL), the bytes.
    """
    raw = bytes(raw)
    if len(raw) < 8:
        raise MessageError(f"std_msgs/String CDR too short: {len(raw)} bytes")
    if raw[1] not in (0, 1):
        raise MessageError(f"unsupported CDR encapsulation {raw[:2].hex()}")
    order = "<" if raw[1] == 1 else ">"
    (length,) = struct.unpack_from(order + "I", raw, 4)
    if length > len(raw) - 8:
        raise MessageError(f"std_msgs/String length {length} exceeds the {len(raw) - 8} bytes received")
    data = raw[8 : 8 + length]
    if data.endswith(b"\x00"):
        data = data[:-1]
    return StringMessage(data.decode("utf-8", errors="replace"))


# -- building outputs -----------------------------------------------------------------------------
def header_fields(stamp: Stamp, frame_id: str) -> dict[str, Any]:
    return {"stamp": {"sec": int(stamp[0]), "nanosec": int(stamp[1])}, "frame_id": frame_id}


def instance_mask_fields(ids: np.ndarray, header: dict[str, Any], encoding: str = "auto") -> dict[str, Any]:
    """Instance-id image: mono8 when the ids fit (auto), else mono16; 0 = background."""
    if encoding not in ("auto", "mono8", "mono16"):
        raise ValueError(f"mask encoding must be auto, mono8 or mono16, got {encoding!r}")
    top = int(ids.max()) if ids.size else 0
    if encoding == "mono8" and top > 255:
        raise ValueError(f"{top} instances do not fit mono8; use mask_encoding mono16 or auto")
    fields = mono16_fields(ids) if encoding == "mono16" or (encoding == "auto" and top > 255) else mono8_fields(ids)
    return {"header": header, **fields}


def box_fields(box: tuple[int, int, int, int] | None) -> dict[str, Any]:
    """(x0, y0, x1, y1) end-exclusive -> vision_msgs 4.x BoundingBox2D (all zero for no box)."""
    if box is None:
        return {"center": {"position": {"x": 0.0, "y": 0.0}, "theta": 0.0}, "size_x": 0.0, "size_y": 0.0}
    x0, y0, x1, y1 = box
    return {
        "center": {"position": {"x": (x0 + x1) / 2.0, "y": (y0 + y1) / 2.0}, "theta": 0.0},
        "size_x": float(x1 - x0),
        "size_y": float(y1 - y0),
    }


def grounded_segmentation_fields(
    result: Result, mask_encoding: str = "auto", instance_mask: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Result -> omg_llava_ros_interfaces/GroundedSegmentation fields (the bundled ~/result message)."""
    header = header_fields(result.stamp, result.frame_id)
    objects = []
    for obj in result.objects:
        target = obj.target
        has_centroid = target is not None and target.num_points > 0 and bool(np.all(np.isfinite(target.centroid)))
        c = target.centroid if has_centroid and target is not None else np.zeros(3)
        objects.append(
            {
                "id": obj.id,
                "phrase": obj.phrase,
                "score": float(obj.score),
                "box": box_fields(obj.box),
                "mask_index": int(obj.mask_index),
                "has_centroid": has_centroid,
                "centroid": {"x": float(c[0]), "y": float(c[1]), "z": float(c[2])},
                "num_points": target.num_points if has_centroid and target is not None else 0,
            }
        )
    return {
        "header": header,
        "command_id": int(result.command_id),
        "command": result.command,
        "text": result.text,
        "clean_text": result.clean_text,
        "follow": bool(result.follow),
        "objects": objects,
        "instance_mask": instance_mask or instance_mask_fields(result.instance_ids, header, mask_encoding),
        "latency_ms": float(result.latency_ms),
    }


def detection_array_fields(result: Result) -> dict[str, Any]:
    """Result -> vision_msgs/Detection2DArray: id = object id, class_id = grounded phrase."""
    header = header_fields(result.stamp, result.frame_id)
    detections = [
        {
            "header": header,
            "results": [{"hypothesis": {"class_id": obj.phrase, "score": float(obj.score)}}],
            "bbox": box_fields(obj.box),
            "id": obj.id,
        }
        for obj in result.objects
        if obj.box is not None  # an empty mask is no detection
    ]
    return {"header": header, "detections": detections}


def overlay_fields(result: Result, alpha: float = 0.5) -> dict[str, Any]:
    """rgb8 Image of the source frame with the objects tinted (for viewing)."""
    rgb = render_overlay(result.image, result.instance_ids, alpha)
    return {"header": header_fields(result.stamp, result.frame_id), **rgb_to_image_fields(rgb, "rgb8")}


def pointcloud2_fields(points: np.ndarray, header: dict[str, Any], labels: np.ndarray | None = None) -> dict[str, Any]:
    """N×3 points (+ per-point uint32 label) -> unorganised PointCloud2 fields, little endian.

    The same packing sensor_msgs_py.point_cloud2.create_cloud produces for these fields, without
    needing sensor_msgs_py (absent off-ROS).
    """
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    if labels is None:
        labels = np.zeros(len(pts), dtype=np.uint32)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(pts):
        raise ValueError(f"{len(labels)} labels for {len(pts)} points")
    cloud = np.empty(len(pts), dtype=CLOUD_DTYPE)
    cloud["x"], cloud["y"], cloud["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    cloud["object"] = labels.astype(np.uint32)
    return {
        "header": header,
        "height": 1,
        "width": len(pts),
        "fields": [{"name": n, "offset": o, "datatype": t, "count": 1} for n, o, t in CLOUD_FIELDS],
        "is_bigendian": False,
        "point_step": CLOUD_DTYPE.itemsize,
        "row_step": CLOUD_DTYPE.itemsize * len(pts),
        "data": cloud.view(np.uint8).reshape(-1),
        "is_dense": bool(np.all(np.isfinite(pts))),
    }


def read_pointcloud2(msg: Any) -> np.ndarray:
    """PointCloud2 with float32 x/y/z (any other fields) -> structured numpy array of its points.

    For consumers and tests; honours point_step, field offsets and is_bigendian.
    """
    kinds = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}
    order = ">" if msg.is_bigendian else "<"
    names, formats, offsets = [], [], []
    for f in msg.fields:
        if f.datatype not in kinds:
            raise MessageError(f"PointField {f.name!r} has unknown datatype {f.datatype}")
        names.append(f.name)
        formats.append(order + kinds[f.datatype])
        offsets.append(f.offset)
    dtype = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": msg.point_step})
    data = np.frombuffer(bytes(msg.data), dtype=np.uint8)
    count = int(msg.width) * int(msg.height)
    if data.size < count * msg.point_step:
        raise MessageError(f"PointCloud2 data too short: {data.size} < {count} x {msg.point_step}")
    return data[: count * msg.point_step].view(dtype)


def target_cloud_fields(result: Result, max_points: int = 20000) -> dict[str, Any] | None:
    """All objects' 3D points in one cloud (field "object" = object id), or None without targets.

    max_points caps the cloud per object (even striding), keeping messages small at VGA.
    """
    targets = result.targets
    if not targets:
        return None
    points = [subsample(o.target.points, max_points) for o in targets if o.target is not None]
    labels = [np.full(len(p), int(o.id), dtype=np.uint32) for p, o in zip(points, targets, strict=True)]
    return pointcloud2_fields(
        np.concatenate(points), header_fields(result.stamp, result.frame_id), np.concatenate(labels)
    )


def target_pose_fields(result: Result) -> dict[str, Any] | None:
    """The primary target's centroid (first object with depth points) as PoseStamped, or None."""
    targets = result.targets
    if not targets or targets[0].target is None:
        return None
    c = targets[0].target.centroid
    return {
        "header": header_fields(result.stamp, result.frame_id),
        "pose": {
            "position": {"x": float(c[0]), "y": float(c[1]), "z": float(c[2])},
            "orientation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0},  # a point target: no orientation
        },
    }


__all__ = [
    "CAMERA_INFO",
    "COMPRESSED_IMAGE",
    "DETECTION2D_ARRAY",
    "GROUNDED_SEGMENTATION",
    "IMAGE",
    "POINT_CLOUD2",
    "POSE_STAMPED",
    "STRING",
    "ImageConversionError",
    "MessageError",
    "RosbagsMessages",
    "StringMessage",
    "box_fields",
    "command_text",
    "decode_string_cdr",
    "depth_from_message",
    "detection_array_fields",
    "grounded_segmentation_fields",
    "header_fields",
    "header_frame_id",
    "header_stamp",
    "instance_mask_fields",
    "intrinsics_from_camera_info",
    "make_typestore",
    "overlay_fields",
    "pointcloud2_fields",
    "read_pointcloud2",
    "rgb_from_message",
    "target_cloud_fields",
    "target_pose_fields",
]
