"""Reading recorded bags with ``rosbags`` (no ROS install): rosbag2 (sqlite3, mcap) and ROS 1.

``BagSource`` opens a bag, lists its topics, streams raw messages in recorded order and
deserialises them with a typestore that prefers the bag's own definitions and falls back to the
ROS 2 Humble store (plus vision_msgs and this package's types) where the bag stores none, as
rosbag2 bags older than format version 8 do.

Two rosbags behaviours are worked around here, both seen on bags recorded by real ROS 2:

* ``rosbag2.Reader`` on a directory matches the topics of metadata.yaml against the storage's
  topics *including the QoS profiles*, and a real recorder writes different QoS text to the two
  (e.g. an infinite deadline as 0 in one, 2147483647 in the other), so nothing is yielded. We ask
  for the storage's own connections instead.
* One unparsable definition in a bag makes ``AnyReader`` fail to open the whole bag; here it only
  makes that one type fall back to the default store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE = "sensor_msgs/msg/CompressedImage"
STRING = "std_msgs/msg/String"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
IMAGE_TYPES = (IMAGE, COMPRESSED_IMAGE)


class BagOpenError(RuntimeError):
    """The bag cannot be opened at all; the text says why (shown to the user as one line)."""


class DecodeError(ValueError):
    """One message could not be deserialised (the replay records it and goes on)."""


@dataclass(frozen=True)
class TopicInfo:
    name: str
    msgtype: str
    count: int


@dataclass(frozen=True)
class BagMessage:
    """One raw message: topic, type, recorded (log) time in ns, serialised bytes."""

    topic: str
    msgtype: str
    log_time_ns: int
    raw: bytes | memoryview


def _is_rosbag2_dir(path: Path) -> bool:
    return path.is_dir() and (path / "metadata.yaml").is_file()


def _storage_file(path: Path) -> Path | None:
    """A directory without metadata.yaml but with exactly one .mcap/.db3 (ros2 bag reads those too)."""
    files = [p for p in sorted(path.iterdir()) if p.suffix in (".mcap", ".db3")]
    return files[0] if len(files) == 1 else None


class BagSource:
    """A read-only view of a bag; use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise BagOpenError(f"{self.path} does not exist")
        self.ros1 = self.path.is_file() and self.path.suffix == ".bag"
        self._reader: Any = None
        self._connections: list[Any] = []
        self.custom: dict[str, str] = {}
        self.typestore: Any = None
        self.type_notes: list[str] = []  # definitions in the bag that could not be used
        self._default: Any = None  # the fallback store (ROS 2 Humble + vision_msgs + ours)

    # -- opening -------------------------------------------------------------------------------
    def open(self) -> BagSource:
        try:
            self._open()
        except BagOpenError:
            self.close()
            raise
        except Exception as exc:  # rosbags raises many types for a damaged bag; one message for all
            self.close()
            raise BagOpenError(f"cannot read {self.path} as a bag: {type(exc).__name__}: {exc}") from exc
        return self

    def _open(self) -> None:
        if self.ros1:
            from rosbags.rosbag1 import Reader as Reader1

            self._reader = Reader1(self.path)
            self._reader.open()
            self._connections = list(self._reader.connections)
        else:
            from rosbags.rosbag2 import Reader as Reader2

            target = self.path
            if self.path.is_dir() and not _is_rosbag2_dir(self.path):
                single = _storage_file(self.path)
                if single is None:
                    raise BagOpenError(
                        f"{self.path} is not a rosbag2 (no metadata.yaml and not exactly one .mcap/.db3 file)"
                    )
                target = single
            elif self.path.is_file() and self.path.suffix not in (".mcap", ".db3"):
                raise BagOpenError(
                    f"{self.path}: unknown bag file type {self.path.suffix!r} (expected .mcap, .db3, .bag)"
                )
            self._reader = Reader2(target)
            self._reader.open()
            storages = getattr(self._reader.storage, "storages", None)
            if storages:  # a directory: the storage files' own connections (see the module docstring)
                self._connections = [c for s in storages for c in s.connections]
                metadata = getattr(self._reader.storage, "metadata", None)
                self.custom = dict(getattr(metadata, "custom", None) or {})
            else:
                self._connections = list(self._reader.connections)
        self.typestore = self._build_typestore()

    def _build_typestore(self) -> Any:
        from rosbags.typesys import Stores, get_typestore

        from omg_llava_ros.ros.messages import make_typestore

        self._default = make_typestore()
        types: dict[str, Any] = dict(self._default.fielddefs)
        for conn in self._connections:
            parsed = self._parse_definition(conn)
            if not parsed:
                continue
            merged = {**types, **parsed}
            missing = sorted({ref for fields in parsed.values() for ref in _references(fields) if ref not in merged})
            if missing:
                self.type_notes.append(f"{conn.msgtype}: definition in the bag references unknown {', '.join(missing)}")
                continue
            types = merged
        store = get_typestore(Stores.EMPTY)
        store.register(types)
        return store

    def _parse_definition(self, conn: Any) -> dict[str, Any]:
        from rosbags.interfaces import MessageDefinitionFormat
        from rosbags.typesys import get_types_from_idl, get_types_from_msg

        msgdef = conn.msgdef
        if msgdef.format == MessageDefinitionFormat.NONE or not msgdef.data.strip():
            return {}
        try:
            if msgdef.format == MessageDefinitionFormat.MSG:
                return {name: defs for name, defs in get_types_from_msg(msgdef.data, conn.msgtype).items()}
            # IDL, possibly several concatenated (rosbag2's format for IDL-defined types)
            sep = "=" * 80 + "\n"
            types: dict[str, Any] = {}
            chunks = msgdef.data.split(sep)[1:] if msgdef.data.startswith(f"{sep}IDL: ") else [msgdef.data]
            for chunk in chunks:
                idl = chunk.split("\n", 1)[1] if chunk.startswith("IDL: ") else chunk
                types.update(get_types_from_idl(idl))
            return types
        except Exception as exc:  # a bad definition only costs this type (the default store may know it)
            self.type_notes.append(f"{conn.msgtype}: unusable definition in the bag ({type(exc).__name__}: {exc})")
            return {}

    def close(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):  # closing a half-opened reader must not hide the first error
                self._reader.close()
            self._reader = None

    def __enter__(self) -> BagSource:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- contents ------------------------------------------------------------------------------
    @property
    def storage(self) -> str:
        """rosbag1, mcap or sqlite3."""
        if self.ros1:
            return "rosbag1"
        files = [self.path] if self.path.is_file() else sorted(self.path.iterdir())
        return "mcap" if any(p.name.endswith((".mcap", ".mcap.zstd")) for p in files) else "sqlite3"

    @property
    def topics(self) -> dict[str, TopicInfo]:
        """Topic name -> info; a topic recorded with several types is listed with the first one."""
        out: dict[str, TopicInfo] = {}
        for conn in self._connections:
            known = out.get(conn.topic)
            count = conn.msgcount + (known.count if known else 0)
            out[conn.topic] = TopicInfo(conn.topic, known.msgtype if known else conn.msgtype, count)
        return dict(sorted(out.items()))

    def messages(self, topics: Sequence[str]) -> Iterator[BagMessage]:
        """Messages of these topics in recorded order (log time)."""
        wanted = set(topics)
        conns = [c for c in self._connections if c.topic in wanted]
        if not conns or self._reader is None:
            return
        for conn, log_time, raw in self._reader.messages(conns):
            yield BagMessage(conn.topic, conn.msgtype, int(log_time), raw)

    def deserialize(self, msg: BagMessage) -> Any:
        """The message object; DecodeError for bytes that do not deserialise as its type."""
        if msg.msgtype not in self.typestore.fielddefs:
            raise DecodeError(f"no definition for type {msg.msgtype} (not in the bag, not in the default store)")
        raw = bytes(msg.raw)
        try:
            if self.ros1:
                return self.typestore.deserialize_ros1(raw, msg.msgtype)
            return self.typestore.deserialize_cdr(raw, msg.msgtype)
        except Exception as exc:  # rosbags raises struct/index/value/serde errors for bad CDR
            error = exc
        # Bags do store wrong definitions (the 2020 talker bag's Log is one truncated line): when
        # the default store defines the type differently, its definition gets a second chance.
        default = self._default
        if (
            not self.ros1
            and default is not None
            and msg.msgtype in default.fielddefs
            and default.fielddefs[msg.msgtype] != self.typestore.fielddefs[msg.msgtype]
        ):
            with contextlib.suppress(Exception):  # if this fails too, the bag definition's error is reported
                return default.deserialize_cdr(raw, msg.msgtype)
        raise DecodeError(f"cannot deserialise {len(raw)} bytes as {msg.msgtype}: {type(error).__name__}: {error}")


def _references(fields: Any) -> list[str]:
    """Message type names referenced by a rosbags field list (arrays/sequences unwrapped)."""
    _, defs = fields
    refs: list[str] = []
    for _, ftype in defs:
        node = ftype
        while True:
            kind, detail = node
            if int(kind) == 2:  # a nested message
                refs.append(detail)
                break
            if int(kind) in (3, 4):  # array / sequence of something
                node = detail[0]
                continue
            break
    return refs
