"""The perception pipeline: commands, frames, conversation state, follow mode, 3D targets.

One class holds all behaviour, so the ROS node (live) and the rosbag replay (offline) run exactly
the same code:

* ``set_command(text, stamp)`` puts a command in force (the latest one wins); an empty or
  whitespace command stops follow mode.
* ``process(frame)``: a pending command is answered with ``model.chat`` on the first frame that is
  not older than the command; every later frame runs ``model.follow`` with the cached ``[SEG]``
  queries (vision only, no LLM) until the next command.

The model is anything with OmgLlava's ``chat`` and ``follow`` (tests pass wrappers that count
calls). The pipeline is thread-safe: one lock serialises commands and frames, because the model
holds per-image caches and must not run two images at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from omg_llava_ros.pipeline.cpu_threads import shared_governor
from omg_llava_ros.pipeline.heap import DEFAULT_EVERY as DEFAULT_TRIM_EVERY
from omg_llava_ros.pipeline.heap import HeapTrimmer
from omg_llava_ros.pipeline.lifting import centroid, lift_to_3d
from omg_llava_ros.pipeline.overlay import instance_image
from omg_llava_ros.pipeline.types import (
    Command,
    DetectedObject,
    Frame,
    Result,
    Stamp,
    Target3D,
    check_stamp,
    stamp_to_ns,
)

log = logging.getLogger(__name__)

# Tokens that steer the chat template or need visual prompts; a user command cannot use them
# meaningfully, and "<region>" without a prompt makes chat() fail. Mirrors the model's constants
# (tested) without importing torch here.
CONTROL_TOKENS: tuple[str, ...] = ("<image>", "<region>", "<mark>", "<|im_start|>", "<|im_end|>")


class PipelineError(RuntimeError):
    """A frame could not be processed; the pipeline state is unchanged and the next frame may work."""


class CommandFailedError(PipelineError):
    """Answering a command failed; the command is dropped (send it again to retry)."""

    def __init__(self, command_id: int, message: str) -> None:
        super().__init__(message)
        self.command_id = command_id


class ChatModel(Protocol):
    def chat(self, image: np.ndarray, text: str, **kwargs: Any) -> Any: ...

    def follow(self, image: np.ndarray, segments: Sequence[Any]) -> list[Any]: ...


@dataclass
class PipelineConfig:
    """Behaviour knobs (the node maps its parameters onto these).

    max_command_chars: longer commands are cut (with a warning) instead of feeding the LLM a
      100 000-character prompt.
    command_frame_tolerance_s: a frame up to this much older than the command still answers it.
    depth_max_offset_s: a depth image further than this from the colour frame is not used.
    max_new_tokens: None = the model's default.
    heap_trim_every: give freed memory back to the system every this many frames (`heap`; 0: never).
    adapt_threads: a model on the CPU runs on the cores other processes leave free (`cpu_threads`).
    """

    max_command_chars: int = 2000
    command_frame_tolerance_s: float = 0.0
    depth_max_offset_s: float = 0.05
    max_new_tokens: int | None = None
    heap_trim_every: int = DEFAULT_TRIM_EVERY
    adapt_threads: bool = True

    def __post_init__(self) -> None:
        if self.max_command_chars < 1:
            raise ValueError(f"max_command_chars must be at least 1, got {self.max_command_chars}")
        if self.command_frame_tolerance_s < 0 or self.depth_max_offset_s < 0:
            raise ValueError("command_frame_tolerance_s and depth_max_offset_s must be >= 0")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 (or None), got {self.max_new_tokens}")
        if self.heap_trim_every < 0:
            raise ValueError(f"heap_trim_every must be >= 0, got {self.heap_trim_every}")


@dataclass
class PipelineStats:
    frames: int = 0  # frames offered to process()
    chat_calls: int = 0
    follow_calls: int = 0
    results: int = 0
    skipped_older_than_command: int = 0  # frames that predate the pending command
    skipped_out_of_order: int = 0  # follow-mode frames older than the last processed one
    idle_frames: int = 0  # frames with no command in force (or nothing to follow)
    errors: int = 0


@dataclass
class _Answer:
    """The LLM's answer to the command in force, reused for every follow-mode frame."""

    text: str
    clean_text: str
    segments: list[Any]
    stamp: Stamp
    first_result_sent: bool = False
    warnings: list[str] = field(default_factory=list)


class PerceptionPipeline:
    def __init__(
        self,
        model: ChatModel,
        config: PipelineConfig | None = None,
        logits_processor: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        first_command_id: int = 1,
    ) -> None:
        self.model = model
        self.config = config or PipelineConfig()
        self.logits_processor = logits_processor
        self.clock = clock
        self.stats = PipelineStats()
        self.heap = HeapTrimmer(self.config.heap_trim_every)
        device = getattr(model, "device", None)
        on_cpu = device is not None and getattr(device, "type", str(device)) == "cpu"
        self.threads = shared_governor() if self.config.adapt_threads and on_cpu else None
        # Two locks: _state guards the command/answer state and is only held for microseconds, so
        # a command never waits for inference; _run serialises model calls (one image at a time).
        self._state = threading.Lock()
        self._run = threading.RLock()
        self._next_id = first_command_id  # a node reconfigured with a new pipeline keeps counting
        self._command: Command | None = None
        self._pending = False
        self._answer: _Answer | None = None
        self._last_stamp_ns: int | None = None

    @property
    def next_command_id(self) -> int:
        return self._next_id

    def warm_up(self, height: int = 480, width: int = 640, text: str = "Please segment the red circle.") -> float:
        """One chat and one follow on a synthetic frame, outside the command state; returns seconds.

        The first call of a model pays one-off costs (allocator growth, lazy kernels and caches);
        paid here, at configure, they do not land on the first real command.
        """
        started = time.monotonic()
        # A red disc on grey: something the command grounds, so mask decoding and follow run too.
        image = np.full((height, width, 3), 128, dtype=np.uint8)
        yy, xx = np.ogrid[:height, :width]
        image[(yy - height / 2) ** 2 + (xx - width / 2) ** 2 <= (min(height, width) / 6) ** 2] = (220, 30, 30)
        kwargs: dict[str, Any] = {}
        if self.logits_processor is not None:
            kwargs["logits_processor"] = self.logits_processor
        with self._run:
            chat = self.model.chat(image, text, **kwargs)
            self.model.follow(image, list(chat.segments))
        return time.monotonic() - started

    # -- commands ----------------------------------------------------------------------------
    def set_command(self, text: str, stamp: Stamp | None = None, received_at: float | None = None) -> int:
        """Put a command in force and return its id; "" or whitespace stops follow mode.

        stamp: frames older than it (beyond the tolerance) are not used to answer it; None lets
        the next frame answer. Raises TypeError/ValueError for a non-string text or a bad stamp
        (the command in force is then unchanged). Never waits for a running inference.
        """
        if not isinstance(text, str):
            raise TypeError(f"command text must be a str, got {type(text).__name__}")
        if stamp is not None:
            stamp = check_stamp(stamp, "command stamp")
        cleaned, warnings = self._clean_command(text)
        with self._state:
            command = Command(
                id=self._next_id,
                text=cleaned,
                stamp=stamp,
                received_at=self.clock() if received_at is None else received_at,
                original_length=len(text),
                warnings=tuple(warnings),
            )
            self._next_id += 1
            self._command = command
            self._answer = None
            self._last_stamp_ns = None
            self._pending = not command.is_stop
        for warning in warnings:
            log.warning("command %d: %s", command.id, warning)
        if command.is_stop:
            log.info("command %d is empty: follow mode stopped", command.id)
        return command.id

    def stop(self) -> int:
        """Stop follow mode (same as an empty command)."""
        return self.set_command("")

    def _clean_command(self, text: str) -> tuple[str, list[str]]:
        warnings: list[str] = []
        limit = self.config.max_command_chars
        if len(text) > limit:
            warnings.append(f"command truncated from {len(text)} to {limit} characters")
            text = text[:limit]
        removed = [token for token in CONTROL_TOKENS if token in text]
        for token in removed:
            text = text.replace(token, " ")
        if removed:
            warnings.append(f"removed control token(s) {', '.join(removed)} from the command")
        if "\x00" in text:
            # A ROS string ends at the first NUL on the C side; echoing one would cut the text.
            text = text.replace("\x00", "")
            warnings.append("removed NUL characters from the command")
        return text.strip(), warnings

    @property
    def command(self) -> Command | None:
        with self._state:
            return self._command

    @property
    def pending(self) -> bool:
        """A command waits for a frame to be answered on."""
        with self._state:
            return self._pending

    @property
    def following(self) -> bool:
        """A command was answered with at least one object, so frames run follow mode."""
        with self._state:
            return self._answer is not None and bool(self._answer.segments)

    # -- frames ------------------------------------------------------------------------------
    def process(self, frame: Frame) -> Result | None:
        """Answer the pending command on this frame, or follow the answered one; None = no output.

        Raises ValueError for a malformed frame, CommandFailedError when answering fails (the
        command is dropped) and PipelineError when following fails (the next frame retries).
        A command that arrives during inference takes effect on the next frame; the running
        inference still returns its result, tagged with the command it answered.
        """
        try:
            if self.threads is not None:
                with self._run:
                    self.threads.tick(getattr(self.model, "vision", None))
            return self._process(frame)
        finally:
            self.heap.after_frame()

    def _process(self, frame: Frame) -> Result | None:
        started = self.clock()
        image = _check_frame(frame)
        frame_ns = stamp_to_ns(frame.stamp)
        with self._run:
            with self._state:
                self.stats.frames += 1
                command, pending, answer = self._command, self._pending, self._answer
                if command is None or command.is_stop or (not pending and (answer is None or not answer.segments)):
                    self.stats.idle_frames += 1
                    return None
                if pending and command.stamp is not None:
                    tolerance_ns = int(self.config.command_frame_tolerance_s * 1e9)
                    if frame_ns < stamp_to_ns(command.stamp) - tolerance_ns:
                        self.stats.skipped_older_than_command += 1
                        return None
                if not pending and self._last_stamp_ns is not None and frame_ns < self._last_stamp_ns:
                    # Publishing it would put an older frame after a newer one on the outputs.
                    self.stats.skipped_out_of_order += 1
                    return None
            if pending:
                answer = self._chat(command, image, frame.stamp)
                segments, follow = answer.segments, False
            else:
                assert answer is not None
                segments, follow = self._follow(image, answer.segments), True
            with self._state:
                if self._command is command:
                    self._last_stamp_ns = frame_ns
                warnings = list(frame.warnings)
                if not answer.first_result_sent:
                    warnings = list(command.warnings) + answer.warnings + warnings
                    answer.first_result_sent = True
                self.stats.results += 1
        objects, ids = _objects(segments, image.shape[:2])
        warnings += _add_targets(objects, frame, image.shape[:2], self.config.depth_max_offset_s)
        received = frame.received_at if frame.received_at is not None else started
        return Result(
            stamp=(int(frame.stamp[0]), int(frame.stamp[1])),
            frame_id=frame.frame_id,
            command_id=command.id,
            command=command.text,
            text=answer.text,
            clean_text=answer.clean_text,
            follow=follow,
            objects=objects,
            instance_ids=ids,
            latency_ms=(self.clock() - received) * 1000.0,
            image=image,
            warnings=warnings,
        )

    def answer(self, frame: Frame, text: str) -> Result:
        """Put ``text`` in force and answer it on this very frame (the action's goal image).

        No camera frame is processed in between. The command then stays in force, so later
        camera frames follow its objects. Raises ValueError for an empty command, PipelineError
        if another command replaced it before it could run.
        """
        _check_frame(frame)
        with self._run:
            command_id = self.set_command(text)
            with self._state:
                command = self._command
                if command is None or command.is_stop:
                    raise ValueError("cannot answer an empty command")
                # The goal image's stamp may come from any clock: never skip it as "older".
                self._command = command = replace(command, stamp=None)
            result = self.process(frame)
            if result is None or result.command_id != command_id:
                raise PipelineError(f"command {command_id} was replaced before it could be answered")
            return result

    def _chat(self, command: Command, image: np.ndarray, stamp: Stamp) -> _Answer:
        kwargs: dict[str, Any] = {}
        if self.config.max_new_tokens is not None:
            kwargs["max_new_tokens"] = self.config.max_new_tokens
        if self.logits_processor is not None:
            kwargs["logits_processor"] = self.logits_processor
        with self._state:
            self.stats.chat_calls += 1
        try:
            chat = self.model.chat(image, command.text, **kwargs)
        except Exception as exc:
            with self._state:
                self.stats.errors += 1
                if self._command is command:
                    self._pending = False
                    self._answer = None
            raise CommandFailedError(
                command.id, f"command {command.id} failed and was dropped: {type(exc).__name__}: {exc}"
            ) from exc
        clean = getattr(chat, "clean_text", chat.text)
        answer = _Answer(chat.text, clean, list(chat.segments), stamp)
        if not answer.segments:
            answer.warnings.append("the answer grounded no object; nothing to follow until the next command")
        with self._state:
            if self._command is command:  # else a newer command arrived meanwhile and stays pending
                self._pending = False
                self._answer = answer
        return answer

    def _follow(self, image: np.ndarray, segments: list[Any]) -> list[Any]:
        with self._state:
            self.stats.follow_calls += 1
        try:
            return list(self.model.follow(image, segments))
        except Exception as exc:
            with self._state:
                self.stats.errors += 1
            raise PipelineError(f"follow failed on this frame: {type(exc).__name__}: {exc}") from exc


def _check_frame(frame: Frame) -> np.ndarray:
    if not isinstance(frame, Frame):
        raise TypeError(f"process() needs a Frame, got {type(frame).__name__}")
    image = frame.image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"frame image must be an H×W×3 uint8 RGB array, got {desc}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"frame image is empty: {image.shape}")
    check_stamp(frame.stamp, "frame stamp")
    return image


def _objects(segments: Sequence[Any], shape: tuple[int, int]) -> tuple[list[DetectedObject], np.ndarray]:
    masks = [np.asarray(s.mask, dtype=bool) for s in segments]
    ids, present = instance_image(masks, shape)
    objects = []
    for i, (seg, mask) in enumerate(zip(segments, masks, strict=True)):
        ys, xs = np.nonzero(mask)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None
        label = getattr(seg, "label", None)
        phrase = seg.phrase if seg.phrase is not None else (label or "")
        objects.append(DetectedObject(str(i + 1), phrase, float(seg.score), box, present[i], mask, label))
    return objects, ids


def _add_targets(objects: list[DetectedObject], frame: Frame, shape: tuple[int, int], max_offset_s: float) -> list[str]:
    """Lift every object with the frame's depth; returns why not, when it cannot (never raises)."""
    if frame.depth is None:
        return []
    if frame.intrinsics is None:
        return ["depth without camera intrinsics (no camera_info yet): no 3D targets"]
    depth = np.asarray(frame.depth)
    if depth.shape != tuple(shape):
        return [
            f"depth {depth.shape[1] if depth.ndim == 2 else '?'}x{depth.shape[0]} does not match the image "
            f"{shape[1]}x{shape[0]} (depth must be registered to the colour image): no 3D targets"
        ]
    k = frame.intrinsics
    if k.width and k.height and (k.width, k.height) != (shape[1], shape[0]):
        return [f"camera_info is for {k.width}x{k.height}, the image is {shape[1]}x{shape[0]}: no 3D targets"]
    if frame.depth_stamp is not None:
        offset = abs(stamp_to_ns(frame.depth_stamp) - stamp_to_ns(frame.stamp)) / 1e9
        if offset > max_offset_s:
            limit_ms = max_offset_s * 1000
            return [f"depth is {offset * 1000:.0f} ms away from the image (limit {limit_ms:.0f} ms): no 3D targets"]
    warnings = []
    for obj in objects:
        points = lift_to_3d(obj.mask, depth, k)
        if len(points) == 0:
            if obj.mask.any():
                warnings.append(f"object {obj.id} has no valid depth inside its mask")
            continue
        obj.target = Target3D(points, centroid(points))
    return warnings
