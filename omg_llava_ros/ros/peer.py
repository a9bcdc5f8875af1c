"""A second rclpy node that drives the perception node from outside, as a robot stack would.

It publishes camera frames (any RGB encoding, padded rows), depth, camera info and commands, and
collects every output topic with its arrival time; it also calls the lifecycle and parameter
services and the ``~/segment`` action. The real-rclpy tests and ``bench --ros2`` use it. Needs
rclpy and the message packages (see the README); runs in its own rclpy context, so it can sit
beside other rclpy users in one process.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.srv import GetParameters
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import parameter_value_to_python
from rclpy.qos import QoSProfile, ReliabilityPolicy

from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.image_conversion import rgb_to_image_fields
from omg_llava_ros.ros.node import OUTPUTS
from omg_llava_ros.ros.rclpy_node import SEGMENT, message_class

_PEER_IDS = itertools.count()
TRANSITIONS = {
    "configure": Transition.TRANSITION_CONFIGURE,
    "activate": Transition.TRANSITION_ACTIVATE,
    "deactivate": Transition.TRANSITION_DEACTIVATE,
    "cleanup": Transition.TRANSITION_CLEANUP,
}


class SerializedActionClient(ActionClient):
    """rclpy's ActionClient with its requests and the handling of their responses under one lock.

    rclpy without the fix for ros2/rclpy#1123 (Jazzy's 7.1.x among them) records a request only
    after sending it: a goal sent from a thread other than the executor's can be answered first, and
    the answer is then dropped ("Ignoring unexpected goal response") and the goal's future never
    completes (seen once in CI, 2026-12-04). Reentrant, as a response's callbacks may send again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests_lock = threading.RLock()

    def send_goal_async(self, *args: Any, **kwargs: Any) -> Any:
        with self.requests_lock:
            return super().send_goal_async(*args, **kwargs)

    def _cancel_goal_async(self, goal_handle: Any) -> Any:
        with self.requests_lock:
            return super()._cancel_goal_async(goal_handle)

    def _get_result_async(self, goal_handle: Any) -> Any:
        with self.requests_lock:
            return super()._get_result_async(goal_handle)

    async def execute(self, taken_data: Any) -> None:
        with self.requests_lock:
            await super().execute(taken_data)


@dataclass
class Received:
    msg: Any
    at: float  # time.monotonic() on arrival


def image_message(
    rgb: np.ndarray, stamp: tuple[int, int], frame_id: str, encoding: str = "rgb8", row_padding: int = 0
) -> Any:
    """sensor_msgs/Image of an RGB array in ``encoding`` (rgb8, bgr8, rgba8, bgra8), each row
    followed by ``row_padding`` junk bytes (step > width × channels, as some drivers send)."""
    fields = rgb_to_image_fields(rgb, encoding)
    rows = np.asarray(fields["data"]).reshape(fields["height"], fields["step"])
    if row_padding:
        rows = np.concatenate([rows, np.full((rows.shape[0], row_padding), 0xAB, np.uint8)], axis=1)
    return _image(rows, rgb.shape[1], stamp, frame_id, encoding)


def depth_message(depth_m: np.ndarray, stamp: tuple[int, int], frame_id: str, encoding: str = "16UC1") -> Any:
    """sensor_msgs/Image depth: 16UC1 in millimetres or 32FC1 in metres."""
    if encoding == "16UC1":
        rows = np.round(depth_m * 1000.0).astype("<u2").view(np.uint8).reshape(depth_m.shape[0], -1)
    elif encoding == "32FC1":
        rows = depth_m.astype("<f4").view(np.uint8).reshape(depth_m.shape[0], -1)
    else:
        raise ValueError(f"depth encoding must be 16UC1 or 32FC1, got {encoding!r}")
    return _image(rows, depth_m.shape[1], stamp, frame_id, encoding)


def _image(rows: np.ndarray, width: int, stamp: tuple[int, int], frame_id: str, encoding: str) -> Any:
    from sensor_msgs.msg import Image

    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp[0]), int(stamp[1])
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rows.shape[0]), int(width)
    msg.encoding, msg.is_bigendian, msg.step = encoding, 0, int(rows.shape[1])
    msg.data = rows.tobytes()
    return msg


def camera_info_message(
    width: int, height: int, fx: float, fy: float, cx: float, cy: float, stamp: tuple[int, int], frame_id: str
) -> Any:
    from sensor_msgs.msg import CameraInfo

    msg = CameraInfo()
    msg.header.stamp.sec, msg.header.stamp.nanosec = int(stamp[0]), int(stamp[1])
    msg.header.frame_id = frame_id
    msg.width, msg.height = width, height
    msg.k = [fx, 0.0, cx, 0.0, fy, cy, 0.0, 0.0, 1.0]
    msg.p = [fx, 0.0, cx, 0.0, 0.0, fy, cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    msg.distortion_model = "plumb_bob"
    msg.d = [0.0] * 5
    return msg


class NodePeer:
    """Publishes to and listens to one perception node, named by its fully qualified name.

    ``inputs`` maps image/depth/camera_info/command to the topics the node subscribes (after
    remapping); outputs are the node's private ``<node>/<name>`` topics.
    """

    def __init__(
        self,
        node_name: str,
        inputs: dict[str, str],
        domain_id: int | None = None,
        outputs: tuple[str, ...] | None = None,
    ) -> None:
        self.node_name = node_name  # e.g. /robot1/omg_llava
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(f"omg_llava_peer_{os.getpid()}_{next(_PEER_IDS)}", context=self.context)
        self._lock = threading.Condition()
        self.received: dict[str, list[Received]] = defaultdict(list)
        best_effort = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.publishers = {
            "image": self.node.create_publisher(message_class(m.IMAGE), inputs["image"], best_effort),
            "depth": self.node.create_publisher(message_class(m.IMAGE), inputs["depth"], best_effort),
            "camera_info": self.node.create_publisher(message_class(m.CAMERA_INFO), inputs["camera_info"], best_effort),
            "command": self.node.create_publisher(message_class(m.STRING), inputs["command"], reliable),
        }
        for name, msgtype in OUTPUTS.items():
            if outputs is not None and name not in outputs:
                continue
            self.node.create_subscription(
                message_class(msgtype), f"{node_name}/{name}", self._collector(name), QoSProfile(depth=50)
            )
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._executor.spin, name="omg-llava-peer", daemon=True)
        self._thread.start()

    def _collector(self, name: str) -> Callable[[Any], None]:
        def collect(msg: Any) -> None:
            with self._lock:
                self.received[name].append(Received(msg, time.monotonic()))
                self._lock.notify_all()

        return collect

    # -- inputs ---------------------------------------------------------------------------------
    def publish(self, which: str, msg: Any) -> float:
        """Publish on an input topic (image, depth, camera_info, command); returns time.monotonic()."""
        at = time.monotonic()
        self.publishers[which].publish(msg)
        return at

    def command(self, text: str) -> float:
        msg = message_class(m.STRING)()
        msg.data = text
        return self.publish("command", msg)

    def wait_for_subscribers(self, which: str = "image", timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.publishers[which].get_subscription_count() == 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # -- outputs --------------------------------------------------------------------------------
    def wait_for(
        self, name: str, predicate: Callable[[Any], bool] = lambda _msg: True, timeout: float = 30.0
    ) -> Received | None:
        """The first message on output ``name`` that satisfies predicate (waits up to timeout s)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for item in self.received[name]:
                    if predicate(item.msg):
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._lock.wait(min(left, 0.1))

    def stamps(self, name: str) -> set[tuple[int, int]]:
        """The header stamps (sec, nanosec) of every message received on output ``name`` so far."""
        with self._lock:
            return {(r.msg.header.stamp.sec, r.msg.header.stamp.nanosec) for r in self.received[name]}

    def with_stamp(self, name: str, stamp: tuple[int, int], timeout: float = 30.0) -> Received | None:
        def same(msg: Any) -> bool:
            return (msg.header.stamp.sec, msg.header.stamp.nanosec) == tuple(stamp)

        return self.wait_for(name, same, timeout)

    # -- services and the action ---------------------------------------------------------------
    def _call(self, srv_type: Any, service: str, request: Any, timeout: float) -> Any:
        client = self.node.create_client(srv_type, f"{self.node_name}/{service}")
        try:
            if not client.wait_for_service(timeout_sec=timeout):
                raise TimeoutError(f"service {self.node_name}/{service} not available")
            future = client.call_async(request)
            deadline = time.monotonic() + timeout
            while not future.done():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"service {self.node_name}/{service} did not answer in {timeout} s")
                time.sleep(0.02)
            return future.result()
        finally:
            self.node.destroy_client(client)

    def lifecycle_state(self, timeout: float = 30.0) -> str:
        return self._call(GetState, "get_state", GetState.Request(), timeout).current_state.label

    def change_state(self, transition: str, timeout: float = 120.0) -> bool:
        request = ChangeState.Request()
        request.transition.id = TRANSITIONS[transition]
        return bool(self._call(ChangeState, "change_state", request, timeout).success)

    def parameters(self, names: list[str], timeout: float = 30.0) -> dict[str, Any]:
        request = GetParameters.Request()
        request.names = names
        values = self._call(GetParameters, "get_parameters", request, timeout).values
        return {name: parameter_value_to_python(value) for name, value in zip(names, values, strict=True)}

    def action_client(self) -> ActionClient:
        """A client of the node's segment action, safe to send goals from any thread."""
        return SerializedActionClient(self.node, message_class(SEGMENT), f"{self.node_name}/segment")

    def close(self) -> None:
        self._executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5.0)
