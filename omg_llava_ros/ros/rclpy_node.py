"""The rclpy side: a LifecycleNode and the Transport that maps the node's I/O onto rclpy.

Deliberately small: the behaviour is in ``node.OmgLlavaNode`` (unit-tested in-process); this
file only translates. tests/ros2 runs it on real rclpy (Jazzy wheels) against a second rclpy node.

Lifecycle: configure loads the model (engines are never built unless ``build_engines`` is set),
activate creates publishers, subscriptions and the action server and starts the worker,
deactivate releases them, cleanup frees the model. With ``autostart`` (default) the node
configures and activates itself, so ``ros2 run``/``ros2 launch`` need no lifecycle manager.

Executors: the node's topics and services spin on a SingleThreadedExecutor; the `~/segment` action
server lives on a helper node (``<name>_segment_action``, same namespace) spun by a
MultiThreadedExecutor in a thread of its own, because a goal's execute callback waits for the worker.
With everything on one MultiThreadedExecutor (4 threads), `bench --ros2` measured 53 of 300 frames
at 30 Hz answered and image deliveries up to 1 s late: its threads' rounds of Python took the GIL
from the worker and from each other at every image; on one thread, 287 of 300 and follow frames
29 ms p95 end to end.
"""

from __future__ import annotations

import array
import contextlib
import faulthandler
import importlib
import logging
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_policy_name_from_kind

from omg_llava_ros.pipeline.types import Stamp
from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.node import ConfigurationError, OmgLlavaNode
from omg_llava_ros.ros.parameters import NODE_NAME, NodeParameters, QosSpec
from omg_llava_ros.ros.transport import (
    IncompatibleQosCallback,
    MessageCallback,
    SegmentGoal,
    SegmentHandler,
    Transport,
)

SEGMENT = "omg_llava_ros_interfaces/action/Segment"
# A shutdown still running after this long is stuck: every thread's stack goes to stderr and the
# process exits 1, so a supervisor (or `ros2 launch`) is not left waiting on it. Above the worker's
# 30 s to finish the frame in hand (`OmgLlavaNode.deactivate`).
SHUTDOWN_LIMIT_S = 40.0

try:  # Iron and later
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:  # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks


def message_class(msgtype: str) -> Any:
    """'pkg/msg/Name' (or 'pkg/action/Name') -> the generated Python class."""
    pkg, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


def _element_class(type_string: str) -> Any:
    """rclpy's field type string of a message array -> the element class.

    Forms: 'sequence<vision_msgs/Detection2D>', 'sequence<pkg/T, 5>', 'pkg/T[3]'.
    """
    inner = type_string
    if inner.startswith("sequence<"):
        inner = inner[len("sequence<") : -1].split(",")[0].strip()
    pkg, name = inner.split("[")[0].split("/")
    return message_class(f"{pkg}/msg/{name}")


def fill_message(msg: Any, fields: Mapping[str, Any]) -> Any:
    """Copy a field dict (messages.py) onto an rclpy message, recursively; returns msg.

    uint8 sequences become array.array('B'): rclpy's setter takes those in one step, while any
    other sequence is checked element by element in Python (slow for images).
    """
    types = msg.get_fields_and_field_types()
    for name, value in fields.items():
        if name not in types:
            raise ValueError(f"{type(msg).__name__} has no field {name!r}")
        if isinstance(value, Mapping):
            fill_message(getattr(msg, name), value)
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            cls = _element_class(types[name])
            setattr(msg, name, [fill_message(cls(), item) for item in value])
        elif isinstance(value, np.ndarray):
            if value.dtype == np.uint8 and types[name].startswith("sequence<uint8"):
                setattr(msg, name, array.array("B", value.tobytes()))
            else:
                setattr(msg, name, value.tolist())
        else:
            setattr(msg, name, value)
    return msg


def qos_profile(qos: QosSpec) -> QoSProfile:
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=qos.depth,
        reliability=ReliabilityPolicy.RELIABLE if qos.reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT,
        durability=(
            DurabilityPolicy.TRANSIENT_LOCAL if qos.durability == "transient_local" else DurabilityPolicy.VOLATILE
        ),
    )


class RosLogger:
    """logging-style calls (``info(fmt, *args)``, ``log(level, ...)``) on an rclpy logger,
    which takes one preformatted string."""

    def __init__(self, logger: Any) -> None:
        self._logger = logger

    @staticmethod
    def _text(msg: str, args: tuple[Any, ...]) -> str:
        return msg % args if args else msg

    def debug(self, msg: str, *args: Any, **_: Any) -> None:
        self._logger.debug(self._text(msg, args))

    def info(self, msg: str, *args: Any, **_: Any) -> None:
        self._logger.info(self._text(msg, args))

    def warning(self, msg: str, *args: Any, **_: Any) -> None:
        self._logger.warning(self._text(msg, args))

    def error(self, msg: str, *args: Any, **_: Any) -> None:
        self._logger.error(self._text(msg, args))

    def exception(self, msg: str, *args: Any, **_: Any) -> None:
        self._logger.error(self._text(msg, args) + "\n" + traceback.format_exc())

    def log(self, level: int, msg: str, *args: Any, **_: Any) -> None:
        if level >= logging.ERROR:
            self.error(msg, *args)
        elif level >= logging.WARNING:
            self.warning(msg, *args)
        elif level >= logging.INFO:
            self.info(msg, *args)
        else:
            self.debug(msg, *args)


class RclpyLogHandler(logging.Handler):
    """stdlib logging (the pipeline, model and engines log there) -> the node's rclpy logger.

    Without it, records below WARNING are lost and warnings print bare through logging's
    last-resort handler, beside and unlike the node's own lines.
    """

    def __init__(self, logger: Any) -> None:
        super().__init__(logging.INFO)
        self._logger = RosLogger(logger)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            self._logger.log(record.levelno, "%s", f"[{record.name}] {text}")
        except Exception:
            self.handleError(record)


def check_interfaces() -> None:
    """Import every message package the node uses, type support included; ImportError if one is
    missing (never built, or its workspace not sourced), before minutes go into loading a model."""
    for msgtype in (m.GROUNDED_SEGMENTATION, m.DETECTION2D_ARRAY, m.IMAGE, m.POSE_STAMPED, m.STRING, SEGMENT):
        cls = message_class(msgtype)
        # rosidl's generated classes load their C type support lazily; load it now.
        type(cls).__import_type_support__()


class _RclpyPublisher:
    def __init__(self, publisher: Any, cls: Any) -> None:
        self.publisher, self.cls = publisher, cls
        self.topic = publisher.topic_name

    def publish(self, fields: dict[str, Any]) -> None:
        self.publisher.publish(fill_message(self.cls(), fields))

    def has_subscribers(self) -> bool:
        return self.publisher.get_subscription_count() > 0


class RclpyTransport(Transport):
    name = "rclpy"

    def __init__(self, node: Any, action_node: Any = None) -> None:
        """action_node: where the action server is created (default `node`); its name is resolved
        on `node`, so it is the node's `~/segment` either way."""
        self.node = node
        self.action_node = action_node or node
        self.logger = RosLogger(node.get_logger())
        # Subscription callbacks are quick (they only store); the action's execute waits for the
        # worker, so it gets a reentrant group (goals and cancels beside a waiting goal) and, in
        # `run_rclpy`, a node and executor of its own, so that it never holds up the subscriptions.
        self._subscriptions_group = MutuallyExclusiveCallbackGroup()
        self._action_group = ReentrantCallbackGroup()

    def resolve(self, topic: str) -> str:
        return self.node.resolve_topic_name(topic)

    def create_publisher(self, topic: str, msgtype: str, qos: QosSpec) -> _RclpyPublisher:
        cls = message_class(msgtype)
        return _RclpyPublisher(self.node.create_publisher(cls, topic, qos_profile(qos)), cls)

    def create_subscription(
        self,
        topic: str,
        msgtype: str,
        qos: QosSpec,
        callback: MessageCallback,
        on_incompatible_qos: IncompatibleQosCallback | None = None,
    ) -> Any:
        events = None
        if on_incompatible_qos is not None:
            resolved = self.resolve(topic)

            def incompatible(info: Any) -> None:
                policy = qos_policy_name_from_kind(info.last_policy_kind)
                on_incompatible_qos(
                    f"a publisher on {resolved} offers an incompatible {policy} (ours: {qos.describe()}); "
                    f"{info.total_count} time(s)"
                )

            events = SubscriptionEventCallbacks(incompatible_qos=incompatible)
        return self.node.create_subscription(
            message_class(msgtype),
            topic,
            callback,
            qos_profile(qos),
            callback_group=self._subscriptions_group,
            event_callbacks=events,
        )

    def create_action_server(self, name: str, handler: SegmentHandler) -> Any:
        segment = message_class(SEGMENT)

        def execute(goal_handle: Any) -> Any:
            request = goal_handle.request
            goal = SegmentGoal(request.command, request.image, bool(request.use_image))

            def feedback(stage: str, progress: float) -> None:
                msg = segment.Feedback()
                msg.stage, msg.progress = stage, float(progress)
                goal_handle.publish_feedback(msg)

            outcome = handler(goal, feedback, lambda: goal_handle.is_cancel_requested)
            result = segment.Result()
            result.success, result.message = outcome.success, outcome.message
            if outcome.result is not None:
                fill_message(result.result, outcome.result)
            if outcome.success:
                goal_handle.succeed()
            elif goal_handle.is_cancel_requested:
                goal_handle.canceled()
            else:
                goal_handle.abort()
            return result

        return ActionServer(
            self.action_node,
            segment,
            self.node.resolve_topic_name(name),
            execute_callback=execute,
            goal_callback=lambda _request: GoalResponse.ACCEPT,
            cancel_callback=lambda _goal_handle: CancelResponse.ACCEPT,
            callback_group=self._action_group,
        )

    def destroy(self, handle: Any) -> None:
        if isinstance(handle, _RclpyPublisher):
            self.node.destroy_publisher(handle.publisher)
        elif isinstance(handle, ActionServer):
            handle.destroy()
        else:
            self.node.destroy_subscription(handle)

    def now(self) -> Stamp:
        sec, nanosec = self.node.get_clock().now().seconds_nanoseconds()
        return int(sec), int(nanosec)


class OmgLlavaLifecycleNode(LifecycleNode):
    """The ROS 2 node: parameters from NodeParameters, transitions delegated to OmgLlavaNode."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        for name, default, description in NodeParameters.specs():
            # Dynamic typing: `-p stats_period_s:=0` (an integer for a float) must not kill the node
            # in rclpy's declare; NodeParameters checks and converts every value at configure and
            # names the parameter of a real type mistake.
            descriptor = ParameterDescriptor(description=description, dynamic_typing=True)
            self.declare_parameter(name, default, descriptor)
        # Only the action server lives here; it takes none of the command line's remappings (a
        # `__node:=` remap would give it the main node's name).
        self.action_node = rclpy.create_node(
            f"{self.get_name()}_segment_action",
            namespace=self.get_namespace(),
            context=self.context,
            use_global_arguments=False,
            start_parameter_services=False,
        )
        self.transport = RclpyTransport(self, self.action_node)
        self.core: OmgLlavaNode | None = None
        self._next_command_id = 1  # GroundedSegmentation.command_id increases across reconfigures
        self._log_handler = RclpyLogHandler(self.get_logger())
        package_logger = logging.getLogger("omg_llava_ros")
        package_logger.addHandler(self._log_handler)
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False  # printed once, by rclpy

    def destroy_node(self) -> None:
        logging.getLogger("omg_llava_ros").removeHandler(self._log_handler)
        self.action_node.destroy_node()
        super().destroy_node()

    def _step(self, what: str, action: Callable[[], None]) -> TransitionCallbackReturn:
        try:
            action()
        except (ConfigurationError, ValueError) as exc:
            self.get_logger().error(f"{what} failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        except Exception as exc:
            self.get_logger().error(f"{what} failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            return TransitionCallbackReturn.ERROR
        return TransitionCallbackReturn.SUCCESS

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        def configure() -> None:
            params = NodeParameters.from_getter(lambda name: self.get_parameter(name).value)
            core = OmgLlavaNode(self.transport, params, first_command_id=self._next_command_id)
            core.configure()
            self.core = core

        return self._step("configure", configure)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        ret = self._step("activate", lambda: self._core().activate())
        return super().on_activate(state) if ret == TransitionCallbackReturn.SUCCESS else ret

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        ret = self._step("deactivate", lambda: self._core().deactivate())
        return super().on_deactivate(state) if ret == TransitionCallbackReturn.SUCCESS else ret

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        def cleanup() -> None:
            core = self._core()
            core.cleanup()
            self._next_command_id = core.next_command_id
            self.core = None

        return self._step("cleanup", cleanup)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        def shutdown() -> None:
            if self.core is not None:
                self.core.shutdown()
                self.core = None

        return self._step("shutdown", shutdown)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.on_shutdown(state)
        return TransitionCallbackReturn.SUCCESS  # back to unconfigured; configure may be retried

    def _core(self) -> OmgLlavaNode:
        if self.core is None:
            raise RuntimeError("the node is not configured")
        return self.core


def run_rclpy(args: Sequence[str]) -> int:
    """Spin the lifecycle node (self-activating unless autostart is false) until shutdown.

    Exit status: 0 after SIGINT/SIGTERM or an external shutdown; 1 when autostart's configure or
    activate failed (logged), so a supervisor or launch file sees it instead of an idle process.
    """
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor, SingleThreadedExecutor

    rclpy.init(args=list(args))
    node = OmgLlavaLifecycleNode()
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    # Goals wait for the worker: their own executor, so that the image path never waits on them.
    action_executor = MultiThreadedExecutor(num_threads=4)
    action_executor.add_node(node.action_node)
    action_thread = threading.Thread(
        target=_spin_actions, args=(action_executor,), name="omg-llava-action", daemon=True
    )
    action_thread.start()
    status = 0
    try:
        if node.get_parameter("autostart").value:
            for transition in (node.trigger_configure, node.trigger_activate):
                if transition() != TransitionCallbackReturn.SUCCESS:
                    node.get_logger().fatal(f"autostart: {transition.__name__[len('trigger_') :]} failed; exiting")
                    status = 1
                    break
        if status == 0:
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        faulthandler.dump_traceback_later(SHUTDOWN_LIMIT_S, exit=True)
        try:
            if node.core is not None:
                node.core.shutdown()
            action_executor.shutdown()
            action_thread.join()  # out of its wait before the action node is destroyed
            executor.shutdown()
            node.destroy_node()
            rclpy.try_shutdown()
        finally:
            faulthandler.cancel_dump_traceback_later()
    return status


def _spin_actions(executor: Any) -> None:
    from rclpy.executors import ExternalShutdownException

    with contextlib.suppress(ExternalShutdownException):
        executor.spin()
