"""The OMG-LLaVA perception node: a thin shell around the pipeline, on any transport.

``OmgLlavaNode`` holds the node's lifecycle (configure -> activate -> deactivate -> cleanup),
its callbacks and its worker thread; it talks to the middleware only through a ``Transport``:
rclpy (``rclpy_node.py``) or in-process (``transport.MemoryTransport``, fast unit tests). All
perception behaviour lives in ``omg_llava_ros.pipeline``; message layouts in ``messages.py``.

Run it (what ``ros2 run omg_llava_ros omg_llava_node`` and the launch file run)::

    python -m omg_llava_ros.ros [--ros-args -p model_path:=DIR ...]

Threads: transport callbacks only store what arrives (the newest image in a one-item slot,
depth images in a small stamped buffer, camera info, commands); one worker thread takes the
newest image, runs the pipeline and publishes. Nothing on the callback side waits for inference.
"""

from __future__ import annotations

import collections
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omg_llava_ros.pipeline.driver import process_frame, run_worker, stamp_after
from omg_llava_ros.pipeline.pipeline import PerceptionPipeline, PipelineError
from omg_llava_ros.pipeline.slot import LatestFrameSlot, StampedBuffer
from omg_llava_ros.pipeline.types import CameraIntrinsics, Frame, Result, Stamp
from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.image_conversion import ImageConversionError
from omg_llava_ros.ros.parameters import NodeParameters, QosSpec
from omg_llava_ros.ros.transport import SegmentGoal, SegmentOutcome, Transport

# Topic names (private: ~/x resolves to /<namespace>/<node name>/x; remap them at launch).
IMAGE_TOPIC = "~/image"
COMPRESSED_TOPIC = "~/image/compressed"
DEPTH_TOPIC = "~/depth"
CAMERA_INFO_TOPIC = "~/camera_info"
COMMAND_TOPIC = "~/command"
SEGMENT_ACTION = "~/segment"
OUTPUTS: dict[str, str] = {
    "result": m.GROUNDED_SEGMENTATION,
    "masks": m.IMAGE,
    "detections": m.DETECTION2D_ARRAY,
    "overlay": m.IMAGE,
    "target_points": m.POINT_CLOUD2,
    "target_pose": m.POSE_STAMPED,
}

_THROTTLE_S = 5.0


# A result's warnings, by the input they are about (first match; the rest concern the answer).
_WARNING_TOPICS: tuple[tuple[str, str], ...] = (
    ("camera_info", CAMERA_INFO_TOPIC),
    ("camera intrinsics", CAMERA_INFO_TOPIC),
    ("depth", DEPTH_TOPIC),
    ("command truncated", COMMAND_TOPIC),
    ("from the command", COMMAND_TOPIC),
)


def _warning_topic(warning: str) -> str:
    return next((topic for key, topic in _WARNING_TOPICS if key in warning), "~/result")


class ConfigurationError(RuntimeError):
    """The node cannot be configured (model, backend, parameters); the text says what to change."""


@dataclass
class ErrorRecord:
    """One bad input or failed step, as the replay metrics list them."""

    stamp: Stamp | None
    topic: str
    reason: str


@dataclass
class NodeStats:
    images: int = 0
    frames_handled: int = 0  # frames the worker finished with (published, skipped or failed)
    results: int = 0
    commands: int = 0
    errors: int = 0
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=500))


@dataclass
class _ImageItem:
    msg: Any
    compressed: bool
    stamp: Stamp
    received_at: float


class _Waiter:
    """An action goal without image, waiting for the worker to answer its command."""

    def __init__(self, command_id: int) -> None:
        self.command_id = command_id
        self.event = threading.Event()
        self.outcome: SegmentOutcome | None = None

    def finish(self, outcome: SegmentOutcome) -> None:
        if not self.event.is_set():
            self.outcome = outcome
            self.event.set()


ModelLoader = Callable[[NodeParameters, logging.Logger], Any]


class OmgLlavaNode:
    """Lifecycle, callbacks and worker of the node; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        params: NodeParameters | None = None,
        model_loader: ModelLoader | None = None,
        logits_processor: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        first_command_id: int = 1,
    ) -> None:
        self.transport = transport
        self.params = params or NodeParameters()
        self.log = transport.logger
        self.model_loader = model_loader or load_model
        self.logits_processor = logits_processor
        self.clock = clock
        self.state = "unconfigured"
        self.model: Any = None
        self.pipeline: PerceptionPipeline | None = None
        self.stats = NodeStats()
        self.errors: collections.deque[ErrorRecord] = collections.deque(maxlen=1000)
        self.slot: LatestFrameSlot[_ImageItem] = LatestFrameSlot()
        self.depth: StampedBuffer[Any] = StampedBuffer(self.params.depth_buffer_size)
        self._camera_info: CameraIntrinsics | None = None
        self._latest_image_stamp: Stamp | None = None
        self._handles: list[Any] = []
        self._publishers: dict[str, Any] = {}
        self._worker: threading.Thread | None = None
        self._running = threading.Event()
        self._publish_lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._waiters_lock = threading.RLock()  # _on_segment_goal holds it around _set_command
        self._throttle: dict[str, tuple[float, int]] = {}
        self._last_stats = clock()
        self._next_command_id = first_command_id  # ids keep increasing across cleanup -> configure
        transport.on_error = self._on_transport_error

    @property
    def next_command_id(self) -> int:
        """The id the next command gets (for a node object that replaces this one)."""
        return self.pipeline.next_command_id if self.pipeline is not None else self._next_command_id

    # -- lifecycle ---------------------------------------------------------------------------
    def configure(self) -> None:
        """Load the model (and engines: never built unless build_engines is set)."""
        if self.state != "unconfigured":
            raise RuntimeError(f"configure needs state unconfigured, not {self.state}")
        p = self.params
        self.log.info("parameters: %s", ", ".join(f"{k}={v!r}" for k, v in p.to_dict().items()))
        started = time.monotonic()
        try:
            self.model = self.model_loader(p, self.log)
        except ConfigurationError:
            raise
        except Exception as exc:
            raise ConfigurationError(f"loading the model failed: {type(exc).__name__}: {exc}") from exc
        self.pipeline = PerceptionPipeline(
            self.model, p.pipeline_config(), self.logits_processor, self.clock, first_command_id=self._next_command_id
        )
        vision = getattr(getattr(self.model, "vision", None), "name", "unknown")
        self.log.info("model ready in %.1f s (vision backend: %s)", time.monotonic() - started, vision)
        if p.warm_up:
            try:
                self.log.info("warm-up: one command and one follow frame took %.2f s", self.pipeline.warm_up())
            except Exception as exc:
                self.pipeline = self.model = None
                raise ConfigurationError(f"the model failed its warm-up: {type(exc).__name__}: {exc}") from exc
        self.state = "inactive"

    def activate(self) -> None:
        """Create publishers, subscriptions and the action server; start the worker."""
        if self.state != "inactive":
            raise RuntimeError(f"activate needs state inactive, not {self.state}")
        p, t = self.params, self.transport
        image_qos, command_qos, result_qos = p.image_qos(), p.command_qos(), p.result_qos()
        for name, msgtype in OUTPUTS.items():
            if name in ("target_points", "target_pose") and not p.use_depth:
                continue
            if name == "overlay" and not p.publish_overlay:
                continue
            self._publishers[name] = pub = t.create_publisher(f"~/{name}", msgtype, result_qos)
            self._handles.append(pub)
            self.log.info("publishing %s [%s] QoS %s", pub.topic, msgtype, result_qos.describe())
        if p.input_compressed:
            self._subscribe(COMPRESSED_TOPIC, m.COMPRESSED_IMAGE, image_qos, self._on_compressed)
        else:
            self._subscribe(IMAGE_TOPIC, m.IMAGE, image_qos, self._on_image)
        if p.use_depth:
            self._subscribe(DEPTH_TOPIC, m.IMAGE, image_qos, self._on_depth)
            self._subscribe(CAMERA_INFO_TOPIC, m.CAMERA_INFO, image_qos, self._on_camera_info)
        self._subscribe(COMMAND_TOPIC, m.STRING, command_qos, self._on_command)
        action = t.create_action_server(SEGMENT_ACTION, self._on_segment_goal)
        if action is None:
            self.log.warning(
                "transport %s has no actions: %s not served (use %s)",
                t.name,
                t.resolve(SEGMENT_ACTION),
                t.resolve(COMMAND_TOPIC),
            )
        else:
            self._handles.append(action)
            self.log.info("serving action %s", t.resolve(SEGMENT_ACTION))
        self.slot.reopen()
        self._running.set()
        self._worker = threading.Thread(target=self._work, name="omg-llava-worker", daemon=True)
        self._worker.start()
        self.state = "active"

    def deactivate(self) -> None:
        """Stop the worker and release publishers, subscriptions and the action server."""
        if self.state != "active":
            raise RuntimeError(f"deactivate needs state active, not {self.state}")
        self._running.clear()
        self.slot.close()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
        self._worker = None
        with self._publish_lock:  # an action goal may be publishing right now
            self._publishers.clear()
        for handle in reversed(self._handles):
            self.transport.destroy(handle)
        self._handles.clear()
        self.slot.clear()
        self.depth.clear()
        self._fail_waiters(None, "the node was deactivated")
        self.state = "inactive"

    def cleanup(self) -> None:
        """Release the model (and its GPU memory)."""
        if self.state == "active":
            self.deactivate()
        if self.pipeline is not None:
            self._next_command_id = self.pipeline.next_command_id
        self.pipeline = None
        self.model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        self.state = "unconfigured"

    def shutdown(self) -> None:
        if self.state == "active":
            self.deactivate()
        if self.state == "inactive":
            self.cleanup()
        self.state = "finalized"

    def _subscribe(self, topic: str, msgtype: str, qos: QosSpec, callback: Callable[[Any], None]) -> None:
        resolved = self.transport.resolve(topic)

        def incompatible(reason: str) -> None:
            self._report(None, resolved, f"QoS mismatch, no messages will arrive: {reason}", level=logging.ERROR)

        handle = self.transport.create_subscription(topic, msgtype, qos, callback, incompatible)
        self._handles.append(handle)
        self.log.info("subscribed %s [%s] QoS %s", resolved, msgtype, qos.describe())

    # -- callbacks (transport threads: store and return) -------------------------------------
    def _on_image(self, msg: Any, compressed: bool = False) -> None:
        received = self.clock()
        topic = COMPRESSED_TOPIC if compressed else IMAGE_TOPIC
        try:
            stamp = m.header_stamp(msg)
        except m.MessageError as exc:
            self._report(None, topic, str(exc))
            return
        self.stats.images += 1
        self._latest_image_stamp = stamp
        self.slot.put(_ImageItem(msg, compressed, stamp, received))

    def _on_compressed(self, msg: Any) -> None:
        self._on_image(msg, compressed=True)

    def _on_depth(self, msg: Any) -> None:
        try:
            self.depth.add(m.header_stamp(msg), msg)
        except m.MessageError as exc:
            self._report(None, DEPTH_TOPIC, str(exc))

    def _on_camera_info(self, msg: Any) -> None:
        try:
            self._camera_info = m.intrinsics_from_camera_info(msg)
        except m.MessageError as exc:
            self._report(None, CAMERA_INFO_TOPIC, str(exc))

    def _on_command(self, msg: Any) -> None:
        try:
            text = m.command_text(msg)
        except m.MessageError as exc:
            self._report(None, COMMAND_TOPIC, str(exc))
            return
        self._set_command(text, "topic")

    def _on_transport_error(self, topic: str, reason: str) -> None:
        self._report(None, topic, reason)

    def _command_stamp(self) -> Stamp | None:
        source = self.params.command_stamp_source
        if source == "clock":
            return self.transport.now()
        if source == "latest_frame":
            return stamp_after(self._latest_image_stamp)
        return None

    def _set_command(self, text: str, source: str) -> int | None:
        pipeline = self.pipeline
        if pipeline is None or self.state != "active":
            self._report(None, COMMAND_TOPIC, f"command ignored: node is {self.state}")
            return None
        with self._waiters_lock:
            command_id = pipeline.set_command(text, self._command_stamp(), self.clock())
            self.stats.commands += 1
            self._fail_waiters_locked(command_id, f"superseded by command {command_id}")
        command = pipeline.command
        shown = command.text if command is not None else ""
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        if command is not None and command.is_stop:
            self.log.info("command %d (%s): stop follow mode", command_id, source)
        else:
            self.log.info("command %d (%s): %r", command_id, source, shown)
        return command_id

    # -- worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        run_worker(self.slot, self._handle_counted, self._on_crash, self._running.is_set, tick=self._maybe_log_stats)

    def _handle_counted(self, item: _ImageItem) -> None:
        try:
            self._handle(item)
        finally:
            self.stats.frames_handled += 1

    def _on_crash(self, item: _ImageItem, exc: Exception) -> None:
        self._report(item.stamp, IMAGE_TOPIC, f"unexpected error: {type(exc).__name__}: {exc}")
        self.log.debug("worker error", exc_info=exc)

    def _handle(self, item: _ImageItem) -> None:
        topic = COMPRESSED_TOPIC if item.compressed else IMAGE_TOPIC
        try:
            frame = self._make_frame(item.msg, item.compressed, item.received_at)
        except (ImageConversionError, m.MessageError) as exc:
            self._report(item.stamp, topic, f"malformed image skipped: {exc}")
            return
        pipeline = self.pipeline
        if pipeline is None:
            return
        outcome = process_frame(pipeline, frame)
        if outcome.error is not None:
            self._report(frame.stamp, topic, outcome.error, level=outcome.level)
        if outcome.failed_command is not None:
            self._finish_waiter(outcome.failed_command, SegmentOutcome(False, outcome.error or "command failed"))
        if outcome.result is not None:
            self._publish(outcome.result)

    def _make_frame(self, msg: Any, compressed: bool, received_at: float) -> Frame:
        image = m.rgb_from_message(msg, compressed)
        stamp = m.header_stamp(msg)
        warnings: list[str] = []
        depth = depth_stamp = intrinsics = None
        if self.params.use_depth:
            match = self.depth.closest(stamp)
            if match is None:
                warnings.append("no depth image received: no 3D targets")
            else:
                depth_stamp, depth_msg, _ = match
                try:
                    depth = m.depth_from_message(depth_msg)
                except ImageConversionError as exc:
                    warnings.append(f"depth image unusable: {exc}")
                    depth_stamp = None
                intrinsics = self._camera_info
                if depth is not None and intrinsics is None:
                    warnings.append("no camera_info received: no 3D targets")
                    depth = None
        return Frame(image, stamp, m.header_frame_id(msg), depth, intrinsics, depth_stamp, received_at, tuple(warnings))

    def _publish(self, result: Result) -> None:
        p = self.params
        header = m.header_fields(result.stamp, result.frame_id)
        with self._publish_lock:
            pubs = dict(self._publishers)
            if not pubs:
                return
            mask = m.instance_mask_fields(result.instance_ids, header, p.mask_encoding)
            fields = m.grounded_segmentation_fields(result, instance_mask=mask)
            pubs["result"].publish(fields)
            pubs["masks"].publish(mask)
            pubs["detections"].publish(m.detection_array_fields(result))
            overlay = pubs.get("overlay")
            if overlay is not None and overlay.has_subscribers():
                overlay.publish(m.overlay_fields(result, p.overlay_alpha))
            if "target_points" in pubs:
                cloud = m.target_cloud_fields(result, p.max_cloud_points)
                if cloud is not None:
                    pubs["target_points"].publish(cloud)
                pose = m.target_pose_fields(result)
                if pose is not None:
                    pubs["target_pose"].publish(pose)
        self.stats.results += 1
        self.stats.latencies_ms.append(result.latency_ms)
        command = self.pipeline.command if self.pipeline is not None else None
        already_logged = command.warnings if command is not None and command.id == result.command_id else ()
        for warning in result.warnings:
            if warning not in already_logged:  # the pipeline logs a command's own warnings on arrival
                self._report(result.stamp, _warning_topic(warning), warning, record=False)
        if not result.follow:
            self.log.info(
                "command %d answered on frame %d.%09d: %r (%d object(s))",
                result.command_id,
                result.stamp[0],
                result.stamp[1],
                result.clean_text,
                len(result.objects),
            )
            self._finish_waiter(result.command_id, SegmentOutcome(True, "", fields))

    # -- action ------------------------------------------------------------------------------
    def _on_segment_goal(
        self, goal: SegmentGoal, feedback: Callable[[str, float], None], cancelled: Callable[[], bool]
    ) -> SegmentOutcome:
        if self.state != "active" or self.pipeline is None:
            return SegmentOutcome(False, f"node is {self.state}, not active")
        if not isinstance(goal.command, str) or not goal.command.strip():
            return SegmentOutcome(False, "empty command: nothing to segment (an empty ~/command stops follow mode)")
        if goal.use_image:
            return self._segment_goal_image(goal, feedback)
        with self._waiters_lock:
            command_id = self._set_command(goal.command, "action")
            if command_id is None:
                return SegmentOutcome(False, "the command was not accepted")
            waiter = _Waiter(command_id)
            self._waiters[command_id] = waiter
        feedback("waiting_for_image", 0.0)
        deadline = time.monotonic() + self.params.action_timeout_s
        while not waiter.event.wait(0.05):
            if cancelled():
                self._drop_waiter(command_id)
                return SegmentOutcome(False, "canceled (the command stays in force)")
            if time.monotonic() > deadline:
                self._drop_waiter(command_id)
                return SegmentOutcome(
                    False,
                    f"no image newer than the command arrived within {self.params.action_timeout_s:.0f} s; "
                    f"is {self.transport.resolve(IMAGE_TOPIC)} publishing with compatible QoS? "
                    "(the command stays in force)",
                )
        feedback("done", 1.0)
        assert waiter.outcome is not None
        return waiter.outcome

    def _segment_goal_image(self, goal: SegmentGoal, feedback: Callable[[str, float], None]) -> SegmentOutcome:
        feedback("decoding_image", 0.1)
        try:
            frame = self._make_frame(goal.image, False, self.clock())
        except (ImageConversionError, m.MessageError) as exc:
            self._report(None, SEGMENT_ACTION, f"goal image unusable: {exc}")
            return SegmentOutcome(False, f"goal image unusable: {exc}")
        feedback("generating", 0.3)
        pipeline = self.pipeline
        assert pipeline is not None
        try:
            result = pipeline.answer(frame, goal.command)
        except (PipelineError, ValueError) as exc:
            self._report(frame.stamp, SEGMENT_ACTION, str(exc), level=logging.ERROR)
            return SegmentOutcome(False, str(exc))
        self.stats.commands += 1
        self._fail_waiters(result.command_id, f"superseded by command {result.command_id}")
        header = m.header_fields(result.stamp, result.frame_id)
        fields = m.grounded_segmentation_fields(
            result, instance_mask=m.instance_mask_fields(result.instance_ids, header, self.params.mask_encoding)
        )
        self._publish(result)
        feedback("done", 1.0)
        return SegmentOutcome(True, "", fields)

    def _finish_waiter(self, command_id: int, outcome: SegmentOutcome) -> None:
        with self._waiters_lock:
            waiter = self._waiters.pop(command_id, None)
        if waiter is not None:
            waiter.finish(outcome)

    def _drop_waiter(self, command_id: int) -> None:
        with self._waiters_lock:
            self._waiters.pop(command_id, None)

    def _fail_waiters(self, newer_than: int | None, reason: str) -> None:
        with self._waiters_lock:
            self._fail_waiters_locked(newer_than, reason)

    def _fail_waiters_locked(self, current: int | None, reason: str) -> None:
        for command_id in list(self._waiters):
            if current is None or command_id < current:
                self._waiters.pop(command_id).finish(SegmentOutcome(False, reason))

    # -- reporting ---------------------------------------------------------------------------
    def _report(
        self, stamp: Stamp | None, topic: str, reason: str, level: int = logging.WARNING, record: bool = True
    ) -> None:
        """Count and log a problem; identical reasons are logged at most every few seconds.

        topic may be private (``~/depth``): it is logged and recorded resolved, as users see it.
        """
        topic = self.transport.resolve(topic)
        if record:
            self.stats.errors += 1
            self.errors.append(ErrorRecord(stamp, topic, reason))
        key = f"{topic}:{reason[:80]}"
        now = time.monotonic()
        last, suppressed = self._throttle.get(key, (-1e9, 0))
        if now - last < _THROTTLE_S:
            self._throttle[key] = (last, suppressed + 1)
            return
        self._throttle[key] = (now, 0)
        more = f" (+{suppressed} similar)" if suppressed else ""
        self.log.log(level, "%s: %s%s", topic, reason, more)

    def _maybe_log_stats(self) -> None:
        period = self.params.stats_period_s
        now = self.clock()
        if not period or now - self._last_stats < period:
            return
        self._last_stats = now
        slot = self.slot.stats
        lat = np.asarray(self.stats.latencies_ms, dtype=np.float64)
        latency = f"latency p50 {np.percentile(lat, 50):.0f} ms, max {lat.max():.0f} ms" if lat.size else "no results"
        pstats = self.pipeline.stats if self.pipeline is not None else None
        self.log.info(
            "images %d, skipped by the worker %d, results %d, errors %d, chat %d, follow %d; %s",
            slot.received,
            slot.skipped,
            self.stats.results,
            self.stats.errors,
            pstats.chat_calls if pstats else 0,
            pstats.follow_calls if pstats else 0,
            latency,
        )


# -- model loading ---------------------------------------------------------------------------------
def load_model(params: NodeParameters, log: logging.Logger | Any) -> Any:
    """Load OmgLlava per the parameters and attach the vision backend; ConfigurationError if unusable.

    The model is loaded with PyTorch vision (`omg_llava_ros.loading`, the one naming scheme:
    empty, a directory or config:NAME) and the backend attached here, through the engines package
    with explicit options: the node must honour build_engines and engine_cache_dir (never build
    silently) and fall back loudly for "auto".
    """
    from omg_llava_ros.loading import ModelSpec, parse_model_spec, resolve_device
    from omg_llava_ros.loading import load_model as load_spec

    try:
        spec: ModelSpec = parse_model_spec(params.model_path)
        model = load_spec(spec, device=resolve_device(params.device))
    except FileNotFoundError as exc:
        raise ConfigurationError(str(exc)) from exc
    _attach_backend(model, params, log)
    return model


def _attach_backend(model: Any, params: NodeParameters, log: logging.Logger | Any) -> None:
    if params.backend == "torch":
        return
    if params.backend == "triton":
        _attach_triton(model, params, log)
        return
    try:
        from omg_llava_ros.engines import EngineOptions
        from omg_llava_ros.engines.backend import BUILD_IF_MISSING_HINT, select_backend_or_torch
    except ImportError as exc:
        if params.backend == "auto":
            log.warning("engines unavailable (%s): PyTorch vision", exc)
            return
        raise ConfigurationError(f"backend {params.backend!r} needs omg_llava_ros.engines: {exc}") from exc
    try:
        options = EngineOptions(build_if_missing=params.build_engines, cache_dir=params.engine_cache_dir or None)
        if params.build_engines:
            log.warning("build_engines is set: missing or stale engines are built now (this can take minutes)")
        hint = "Build engines ahead of time with `omg-llava-ros build-engines`, or set build_engines:=true"
        model.vision = select_backend_or_torch(params.backend, model, options, hint, log)
    except Exception as exc:  # a backend named explicitly ("auto" falls back above)
        # The engines' hint names the Python API's switch; a node user sets the parameter.
        reason = str(exc).replace(BUILD_IF_MISSING_HINT, "set the parameter build_engines:=true to build at configure")
        raise ConfigurationError(f"vision backend {params.backend!r} unavailable: {reason}") from exc


def _attach_triton(model: Any, params: NodeParameters, log: logging.Logger | Any) -> None:
    """A server that is not up yet is only warned about (robots often start before the server; each
    frame is reported until it answers); one that serves other weights fails configure."""
    from omg_llava_ros.engines.triton_backend import TritonOptions, VisionServerError, triton_vision

    try:
        options = TritonOptions(url=params.triton_url, timeout_s=params.triton_timeout_s)
        model.vision = triton_vision(model, options, require_server=False)
    except (VisionServerError, ValueError, ImportError) as exc:
        raise ConfigurationError(f"vision backend 'triton' unavailable: {exc}") from exc
    if not model.vision.reachable:
        log.warning("Triton server %s not reachable yet; frames are reported as errors until it is", params.triton_url)
