"""The replay's output: a rosbag2 with the node's output topics, as the live node would publish them.

Format: rosbag2 version 8, storage **mcap** with zstd-compressed chunks. Why mcap rather than
sqlite3: it is one self-describing file whose schema records carry every message definition
(ros2msg text, this package's GroundedSegmentation and the vision_msgs types included), so Foxglove
decodes it with nothing installed; it is the default storage of ``ros2 bag`` since Iron (Humble
plays it with ros-humble-rosbag2-storage-mcap); and chunk compression is part of the MCAP format
itself, so readers need no rosbag2 compression plugin. Version 8 keeps the QoS text in the
integer form every distro parses.

Every message carries the header of the image it was computed from; the recorded (log) time is the
input's recorded time plus the measured latency, so ``ros2 bag play`` of both bags together shows
results as late as the node delivered them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omg_llava_ros.pipeline.types import Result
from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.parameters import NODE_NAME

_DEPENDENCY = re.compile(r"^MSG: ([^/\s]+)/(?!msg/)(\S+)$", re.MULTILINE)

# The node's output topics that a replay without depth produces (node.py OUTPUTS).
OUTPUT_TOPICS: dict[str, str] = {
    "result": m.GROUNDED_SEGMENTATION,
    "masks": m.IMAGE,
    "detections": m.DETECTION2D_ARRAY,
    "overlay": m.IMAGE,
}


def ros2msg_definition(typestore: Any, msgtype: str) -> tuple[str, str]:
    """(complete ros2msg definition, RIHS01 hash) as rosbag2 stores them for Foxglove and friends.

    rosbags writes dependency headers as "MSG: pkg/Type"; rosbag2's message-definition encoding
    names them "MSG: pkg/msg/Type", which every reader (rosbags included) accepts.
    """
    text, _ = typestore.generate_msgdef(msgtype, ros_version=2)
    text = _DEPENDENCY.sub(r"MSG: \1/msg/\2", text)
    return text, typestore.hash_rihs01(msgtype)


def _result_qos() -> list[Any]:
    """The node's result QoS (reliable, keep last 10, volatile): what ros2 bag play offers again."""
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    zero = QosTime(0, 0)
    return [
        Qos(
            QosHistory.KEEP_LAST,
            10,
            QosReliability.RELIABLE,
            QosDurability.VOLATILE,
            zero,
            zero,
            QosLiveliness.AUTOMATIC,
            zero,
            False,
        )
    ]


class OutputBagWriter:
    """Writes pipeline Results to DIR (a new rosbag2 folder); use as a context manager."""

    def __init__(
        self,
        path: str | Path,
        namespace: str = f"/{NODE_NAME}",
        storage: str = "mcap",
        overlay_alpha: float = 0.5,
        mask_encoding: str = "auto",
    ) -> None:
        from rosbags.rosbag2 import StoragePlugin, Writer

        if storage not in ("mcap", "sqlite3"):
            raise ValueError(f"storage must be mcap or sqlite3, got {storage!r}")
        self.path = Path(path)
        self.namespace = namespace.rstrip("/")
        self.overlay_alpha = overlay_alpha
        self.mask_encoding = mask_encoding
        self.messages = m.RosbagsMessages(m.make_typestore())
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self._writer = Writer(self.path, version=8, storage_plugin=plugin)
        if storage == "mcap":
            from rosbags.rosbag2 import CompressionFormat, CompressionMode

            self._writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
        self._writer.set_custom_data("omg_llava_ros.producer", "omg-llava-ros replay")
        self._connections: dict[str, Any] = {}
        self.counts: dict[str, int] = {name: 0 for name in OUTPUT_TOPICS}
        self._open = False

    def topic(self, name: str) -> str:
        return f"{self.namespace}/{name}"

    def open(self) -> OutputBagWriter:
        self._writer.open()
        self._open = True
        qos = _result_qos()
        for name, msgtype in OUTPUT_TOPICS.items():
            msgdef, rihs01 = ros2msg_definition(self.messages.typestore, msgtype)
            self._connections[name] = self._writer.add_connection(
                self.topic(name), msgtype, msgdef=msgdef, rihs01=rihs01, offered_qos_profiles=qos
            )
        return self

    def write(self, result: Result, log_time_ns: int) -> None:
        """Serialise and store the result on every output topic at this recorded time."""
        header = m.header_fields(result.stamp, result.frame_id)
        mask = m.instance_mask_fields(result.instance_ids, header, self.mask_encoding)
        payloads = {
            "result": m.grounded_segmentation_fields(result, instance_mask=mask),
            "masks": mask,
            "detections": m.detection_array_fields(result),
            "overlay": m.overlay_fields(result, self.overlay_alpha),
        }
        for name, fields in payloads.items():
            raw = self.messages.serialize(OUTPUT_TOPICS[name], fields)
            self._writer.write(self._connections[name], int(log_time_ns), raw)
            self.counts[name] += 1

    def close(self) -> None:
        if self._open:
            self._open = False
            self._writer.close()

    def __enter__(self) -> OutputBagWriter:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
