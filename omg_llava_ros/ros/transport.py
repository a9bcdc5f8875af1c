"""The node's ROS I/O behind one small interface, so the same node runs on rclpy and in-process
(``MemoryTransport``, for fast unit tests).

Publishers take *field dicts* (see ``messages.py``); subscription callbacks receive message objects
that are read duck-typed (rclpy and rosbags messages have the same attribute names). Callbacks run
on the transport's threads and must return quickly; the node only stores what it receives there.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from omg_llava_ros.pipeline.types import Stamp, ns_to_stamp
from omg_llava_ros.ros.parameters import NODE_NAME, QosSpec

MessageCallback = Callable[[Any], None]
IncompatibleQosCallback = Callable[[str], None]


@dataclass
class SegmentGoal:
    """A ~/segment action goal: command, and an Image message used when use_image is true."""

    command: str
    image: Any = None
    use_image: bool = False


@dataclass
class SegmentOutcome:
    """A ~/segment action result: result is GroundedSegmentation fields (None on failure)."""

    success: bool
    message: str = ""
    result: dict[str, Any] | None = None


# handler(goal, feedback(stage, progress), is_cancelled) -> outcome; runs on a transport thread.
SegmentHandler = Callable[[SegmentGoal, Callable[[str, float], None], Callable[[], bool]], SegmentOutcome]


class Publisher(Protocol):
    topic: str  # fully resolved name

    def publish(self, fields: dict[str, Any]) -> None: ...

    def has_subscribers(self) -> bool: ...


class Transport(ABC):
    """What the node needs from a middleware."""

    name: str = "abstract"
    logger: logging.Logger | Any
    # on_error(topic, reason): a message arrived that the transport itself could not decode
    # (rclpy decodes internally and never calls it). The node counts and reports these.
    on_error: Callable[[str, str], None] | None = None

    @abstractmethod
    def resolve(self, topic: str) -> str:
        """The fully qualified name ``topic`` (``~/x``, ``x`` or ``/x``) maps to, remaps applied."""

    @abstractmethod
    def create_publisher(self, topic: str, msgtype: str, qos: QosSpec) -> Publisher: ...

    @abstractmethod
    def create_subscription(
        self,
        topic: str,
        msgtype: str,
        qos: QosSpec,
        callback: MessageCallback,
        on_incompatible_qos: IncompatibleQosCallback | None = None,
    ) -> Any:
        """Subscribe; on_incompatible_qos(reason) fires when a publisher's QoS cannot match ours."""

    @abstractmethod
    def destroy(self, handle: Any) -> None:
        """Remove a publisher, subscription or action server made by this transport."""

    def create_action_server(self, name: str, handler: SegmentHandler) -> Any | None:
        """Serve the ~/segment action; None when the middleware has no actions."""
        return None

    def now(self) -> Stamp:
        """The transport's clock as (sec, nanosec); ROS time (sim time aware) on rclpy."""
        return ns_to_stamp(time.time_ns())

    def close(self) -> None:  # noqa: B027 - optional hook, most transports have nothing to release
        """Release the middleware (the node is done)."""


def resolve_name(
    name: str, namespace: str = "/", node_name: str = NODE_NAME, remaps: dict[str, str] | None = None
) -> str:
    """ROS 2 name expansion (``~`` = node's private namespace, relative = under the namespace),
    then remapping; remap rules are expanded the same way before matching."""

    def expand(n: str) -> str:
        ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
        if n.startswith("~"):
            n = f"{ns}/{node_name}{n[1:]}"
        elif not n.startswith("/"):
            n = f"{ns}/{n}"
        return "/" + "/".join(part for part in n.split("/") if part)

    full = expand(name)
    for src, dst in (remaps or {}).items():
        if expand(src) == full:
            return expand(dst)
    return full


@dataclass
class _MemoryPublisher:
    topic: str
    msgtype: str
    qos: QosSpec
    sink: list[dict[str, Any]] = field(default_factory=list)
    subscribed: bool = True

    def publish(self, fields: dict[str, Any]) -> None:
        self.sink.append(fields)

    def has_subscribers(self) -> bool:
        return self.subscribed


@dataclass
class _MemorySubscription:
    topic: str
    msgtype: str
    qos: QosSpec
    callback: MessageCallback
    on_incompatible_qos: IncompatibleQosCallback | None = None


class MemoryTransport(Transport):
    """In-process transport for tests and tools: ``deliver`` calls the callbacks synchronously and
    every publication is kept in ``published[topic]`` (field dicts)."""

    name = "memory"

    def __init__(self, namespace: str = "/", node_name: str = NODE_NAME, remaps: dict[str, str] | None = None):
        self.namespace, self.node_name, self.remaps = namespace, node_name, dict(remaps or {})
        self.logger = logging.getLogger(f"omg_llava_ros.{node_name}")
        self.published: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.publishers: dict[str, _MemoryPublisher] = {}
        self.subscriptions: dict[str, list[_MemorySubscription]] = defaultdict(list)
        self.action_servers: dict[str, SegmentHandler] = {}
        self.clock_ns: int | None = None  # set to freeze now()
        self._lock = threading.Lock()

    def resolve(self, topic: str) -> str:
        return resolve_name(topic, self.namespace, self.node_name, self.remaps)

    def create_publisher(self, topic: str, msgtype: str, qos: QosSpec) -> _MemoryPublisher:
        name = self.resolve(topic)
        pub = _MemoryPublisher(name, msgtype, qos, self.published[name])
        self.publishers[name] = pub
        return pub

    def create_subscription(
        self,
        topic: str,
        msgtype: str,
        qos: QosSpec,
        callback: MessageCallback,
        on_incompatible_qos: IncompatibleQosCallback | None = None,
    ) -> _MemorySubscription:
        sub = _MemorySubscription(self.resolve(topic), msgtype, qos, callback, on_incompatible_qos)
        with self._lock:
            self.subscriptions[sub.topic].append(sub)
        return sub

    def create_action_server(self, name: str, handler: SegmentHandler) -> str:
        resolved = self.resolve(name)
        self.action_servers[resolved] = handler
        return resolved

    def destroy(self, handle: Any) -> None:
        with self._lock:
            if isinstance(handle, _MemorySubscription):
                self.subscriptions[handle.topic] = [s for s in self.subscriptions[handle.topic] if s is not handle]
            elif isinstance(handle, _MemoryPublisher):
                self.publishers.pop(handle.topic, None)
            elif isinstance(handle, str):
                self.action_servers.pop(handle, None)

    def now(self) -> Stamp:
        return ns_to_stamp(self.clock_ns) if self.clock_ns is not None else super().now()

    # -- test side ---------------------------------------------------------------------------
    def deliver(self, topic: str, msg: Any) -> int:
        """Hand msg to every subscription of topic (resolved); returns how many got it."""
        with self._lock:
            subs = list(self.subscriptions.get(self.resolve(topic), []))
        for sub in subs:
            sub.callback(msg)
        return len(subs)

    def send_goal(
        self, name: str, goal: SegmentGoal, feedback: list[tuple[str, float]] | None = None
    ) -> SegmentOutcome:
        handler = self.action_servers[self.resolve(name)]
        sink = feedback if feedback is not None else []
        return handler(goal, lambda stage, progress: sink.append((stage, progress)), lambda: False)
