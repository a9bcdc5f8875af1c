"""Replay a recorded bag through the perception pipeline the node runs, and measure it.

Two timing modes:

* as fast as possible (``rate=None``): every frame is processed, in recorded order; the numbers
  are the model's quality and its per-frame cost.
* real time (``rate=R``; 1.0 = as recorded): a feeder hands each frame over at its recorded time
  (scaled by 1/R) into the same one-item ``LatestFrameSlot`` the node uses, and one worker processes
  the newest frame; frames it cannot keep up with are replaced unseen and counted as dropped. These
  are the numbers a robot would see.

Commands come from a std_msgs/String topic and are put in force exactly as the node does with
``command_stamp_source: latest_frame``: a command is answered on the first frame newer than the
newest frame received before it, later frames follow its objects (follow mode).

Ground truth: mono8 masks (non-zero = target) with the header stamp of the frame they belong to,
for the command in force at that frame; the prediction is the union of the result's objects. A
processed frame with ground truth whose command produced no output (grounded nothing, failed)
counts as an empty prediction; dropped frames are not evaluated (they are counted instead).

Nothing a message can contain stops a replay: every malformed message becomes an ErrorEntry and
the rest of the bag is still evaluated.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from omg_llava_ros.pipeline import (
    Frame,
    LatestFrameSlot,
    PerceptionPipeline,
    PipelineConfig,
    Result,
    Stamp,
)
from omg_llava_ros.pipeline.driver import process_frame, run_worker, stamp_after
from omg_llava_ros.pipeline.types import stamp_to_ns
from omg_llava_ros.replay.bag import (
    COMPRESSED_IMAGE,
    IMAGE,
    IMAGE_TYPES,
    STRING,
    BagMessage,
    BagSource,
    DecodeError,
    TopicInfo,
)
from omg_llava_ros.replay.metrics import IouAccumulator, jitter_summary, latency_summary, mask_iou_counts, output_fps
from omg_llava_ros.replay.output_bag import OutputBagWriter
from omg_llava_ros.replay.thumbnails import ThumbnailStrip, make_thumbnail
from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.image_conversion import ImageConversionError, mask_from_mono8

log = logging.getLogger(__name__)

# rosbag2 custom_data keys a bag can use to declare its topics (the demo bag does).
CUSTOM_IMAGE_TOPIC = "omg_llava_ros.image_topic"
CUSTOM_COMMAND_TOPIC = "omg_llava_ros.command_topic"
CUSTOM_GT_TOPIC = "omg_llava_ros.ground_truth_topic"
# Image topics with these words are not the colour camera when choosing one automatically.
_NOT_COLOUR = ("depth", "mask", "ground_truth", "groundtruth", "label", "overlay", "segment", "disparity", "ir")


class ReplaySetupError(RuntimeError):
    """The replay cannot start (no such bag, no image topic, a topic of the wrong type...).

    The message is one line meant for the user; the CLI prints it and exits with code 2.
    """


@dataclass
class ReplayConfig:
    """What to read and how.

    rate: None = as fast as possible; R > 0 = real time at R times the recorded speed.
    command: a command put in force before the first frame (for bags without a command topic).
    """

    image_topic: str | None = None
    command_topic: str | None = None
    gt_topic: str | None = None
    rate: float | None = None
    command: str | None = None
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    write_output_bag: bool = True
    output_storage: str = "mcap"
    thumbnails_per_command: int = 8
    thumbnail_size: int = 120
    overlay_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.rate is not None and not (self.rate > 0 and np.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number (1.0 = recorded speed), got {self.rate}")
        if self.thumbnails_per_command < 1:
            raise ValueError("thumbnails_per_command must be at least 1")


@dataclass
class ErrorEntry:
    """One bad message or failed step: the header stamp when known, the topic, why."""

    stamp: Stamp | None
    topic: str
    reason: str
    log_time_ns: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "stamp": list(self.stamp) if self.stamp is not None else None,
            "topic": self.topic,
            "reason": self.reason,
            "log_time_ns": self.log_time_ns,
        }


@dataclass
class Topics:
    image: str
    image_type: str
    command: str | None = None
    gt: str | None = None

    @property
    def compressed(self) -> bool:
        return self.image_type == COMPRESSED_IMAGE


@dataclass
class FrameRecord:
    """One processed frame (dropped ones have no record)."""

    stamp: Stamp
    log_time_ns: int
    command_id: int | None
    latency_ms: float | None  # None: no output for this frame
    output_time_s: float | None  # on the replay clock, seconds since the first input
    follow: bool = False
    objects: int = 0
    iou: float | None = None


@dataclass
class CommandRecord:
    id: int
    text: str
    log_time_ns: int
    stop: bool = False
    answered: bool = False
    answer: str = ""  # clean text of the LLM's answer
    raw_answer: str = ""
    answer_stamp: Stamp | None = None
    objects: int = 0
    results: int = 0
    warnings: list[str] = field(default_factory=list)
    iou: IouAccumulator = field(default_factory=IouAccumulator)
    thumbnails: ThumbnailStrip = field(default_factory=ThumbnailStrip)


@dataclass
class ReplayOutcome:
    """Everything a replay measured; ``metrics`` is what metrics.json holds."""

    bag: Path
    storage: str
    topics: Topics
    rate: float | None
    frames: int = 0
    processed_frames: int = 0
    dropped_frames: int = 0
    results: int = 0
    gt_masks: int = 0
    commands: list[CommandRecord] = field(default_factory=list)
    records: list[FrameRecord] = field(default_factory=list)
    errors: list[ErrorEntry] = field(default_factory=list)
    iou: IouAccumulator = field(default_factory=IouAccumulator)
    first_input_s: float | None = None
    last_output_s: float | None = None
    first_frame_log_ns: int | None = None
    last_frame_log_ns: int | None = None
    wall_s: float = 0.0
    pipeline_stats: dict[str, int] = field(default_factory=dict)
    output_bag: Path | None = None
    output_counts: dict[str, int] = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def mode(self) -> str:
        return "as_fast_as_possible" if self.rate is None else "real_time"

    @property
    def latencies_ms(self) -> list[float]:
        return [r.latency_ms for r in self.records if r.latency_ms is not None]

    @property
    def requests(self) -> list[CommandRecord]:
        """The commands proper (stop commands left out)."""
        return [c for c in self.commands if not c.stop]

    @property
    def metrics(self) -> dict[str, Any]:
        outputs = [r.output_time_s for r in self.records if r.output_time_s is not None and r.latency_ms is not None]
        span = (
            (self.last_frame_log_ns - self.first_frame_log_ns) / 1e9
            if self.first_frame_log_ns is not None and self.last_frame_log_ns is not None
            else 0.0
        )
        requests = self.requests
        metrics: dict[str, Any] = {
            "bag": str(self.bag),
            "storage": self.storage,
            "mode": self.mode,
            "rate": self.rate,
            "topics": {"image": self.topics.image, "command": self.topics.command, "ground_truth": self.topics.gt},
            "frames": self.frames,
            "processed_frames": self.processed_frames,
            "dropped_frames": self.dropped_frames,
            "results": self.results,
            "commands": len(requests),
            "answered_commands": sum(1 for c in requests if c.answered),
            "stop_commands": len(self.commands) - len(requests),
            "input_fps": round((self.frames - 1) / span, 3) if self.frames > 1 and span > 0 else None,
            "output_fps": output_fps(len(outputs), self.first_input_s, self.last_output_s),
            "latency_ms": latency_summary(self.latencies_ms),
            "jitter_ms": jitter_summary(outputs),
            "errors": [e.to_json() for e in self.errors],
            "per_command": [
                {
                    "id": c.id,
                    "command": c.text,
                    "answered": c.answered,
                    "answer": c.answer,
                    "objects": c.objects,
                    "results": c.results,
                    **(
                        {"ciou": _round(c.iou.ciou), "giou": _round(c.iou.giou), "evaluated_frames": c.iou.frames}
                        if self.topics.gt
                        else {}
                    ),
                }
                for c in requests
            ],
            "pipeline": self.pipeline_stats,
            "wall_s": round(self.wall_s, 3),
        }
        if self.topics.gt:
            metrics["ciou"] = _round(self.iou.ciou)
            metrics["giou"] = _round(self.iou.giou)
            metrics["ground_truth"] = {"masks": self.gt_masks, "evaluated_frames": self.iou.frames}
        if self.output_bag is not None:
            metrics["output_bag"] = {"path": str(self.output_bag), "messages": dict(self.output_counts)}
        return metrics


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


# -- topics -------------------------------------------------------------------------------------
def _describe(topics: dict[str, TopicInfo]) -> str:
    if not topics:
        return "no topics at all"
    return ", ".join(f"{t.name} [{t.msgtype}] ({t.count})" for t in topics.values())


def _check_topic(topics: dict[str, TopicInfo], name: str, types: Iterable[str], role: str, bag: Path) -> TopicInfo:
    info = topics.get(name)
    if info is None:
        raise ReplaySetupError(f"{bag}: no topic {name} (given as the {role} topic); the bag has: {_describe(topics)}")
    allowed = tuple(types)
    if info.msgtype not in allowed:
        raise ReplaySetupError(f"{bag}: {role} topic {name} is {info.msgtype}, expected {' or '.join(allowed)}")
    return info


def _declared(source: BagSource, key: str, topics: dict[str, TopicInfo], types: tuple[str, ...]) -> str | None:
    name = source.custom.get(key)
    return name if name in topics and topics[name].msgtype in types else None


def resolve_topics(source: BagSource, config: ReplayConfig) -> Topics:
    """The image, command and ground-truth topics: given ones are checked, missing ones detected.

    Detection: the bag's custom_data declaration first (omg_llava_ros.*_topic), then the only
    candidate of the right type (for images, after leaving out depth/mask/ground-truth names).
    Raises ReplaySetupError with a one-line reason.
    """
    topics = source.topics
    bag = source.path
    gt = None
    if config.gt_topic:
        gt = _check_topic(topics, config.gt_topic, (IMAGE,), "ground-truth", bag).name
    else:
        gt = _declared(source, CUSTOM_GT_TOPIC, topics, (IMAGE,))
        if gt is None:
            named = [t.name for t in topics.values() if t.msgtype == IMAGE and _looks_like_gt(t.name)]
            gt = named[0] if len(named) == 1 else None

    if config.image_topic:
        image = _check_topic(topics, config.image_topic, IMAGE_TYPES, "image", bag)
    else:
        declared = _declared(source, CUSTOM_IMAGE_TOPIC, topics, IMAGE_TYPES)
        if declared is not None:
            image = topics[declared]
        else:
            candidates = [t for t in topics.values() if t.msgtype in IMAGE_TYPES and t.name != gt]
            if not candidates:
                raise ReplaySetupError(
                    f"{bag} has no image topic (sensor_msgs/msg/Image or sensor_msgs/msg/CompressedImage) "
                    f"to replay; it has: {_describe(topics)}"
                )
            if len(candidates) > 1:
                colour = [t for t in candidates if not any(word in t.name.lower() for word in _NOT_COLOUR)]
                if len(colour) != 1:
                    names = ", ".join(t.name for t in candidates)
                    raise ReplaySetupError(f"{bag} has several image topics ({names}); choose one with --image-topic")
                candidates = colour
            image = candidates[0]
    if gt is not None and gt == image.name:
        raise ReplaySetupError(f"the image topic and the ground-truth topic are both {gt}")

    if config.command_topic:
        command: str | None = _check_topic(topics, config.command_topic, (STRING,), "command", bag).name
    else:
        command = _declared(source, CUSTOM_COMMAND_TOPIC, topics, (STRING,))
        if command is None:
            strings = [t.name for t in topics.values() if t.msgtype == STRING]
            if len(strings) > 1:
                strings = [name for name in strings if "command" in name.lower()]
            command = strings[0] if len(strings) == 1 else None
    return Topics(image.name, image.msgtype, command, gt)


def _looks_like_gt(name: str) -> bool:
    lowered = name.lower()
    return "ground_truth" in lowered or "groundtruth" in lowered or "/gt" in lowered


# -- the replay ---------------------------------------------------------------------------------
@dataclass
class _FrameItem:
    msg: Any
    stamp: Stamp
    frame_id: str
    log_time_ns: int
    received_at: float = 0.0


@dataclass
class _CommandItem:
    text: str
    log_time_ns: int


class Replayer:
    """Runs one replay; ``run(bag, out_dir)`` returns the ReplayOutcome (and writes DIR/*)."""

    def __init__(
        self,
        model: Any,
        config: ReplayConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.model = model
        self.config = config or ReplayConfig()
        self.clock = clock
        self.sleep = sleep
        self._lock = threading.Lock()

    # -- entry point -----------------------------------------------------------------------------
    def run(self, bag: str | Path, out_dir: str | Path | None = None, source: Any = None) -> ReplayOutcome:
        """Replay the bag; with out_dir, write output/ (a rosbag2), metrics.json and report.html there.
        `source`: an open stand-in for the bag's `BagSource` (the same methods, e.g. a generated
        stream, `replay.soak`), read instead of the file; `bag` then only names it.

        Raises ReplaySetupError when it cannot start; anything wrong inside messages is recorded.
        """
        from omg_llava_ros.replay.bag import BagOpenError

        bag = Path(bag)
        out = Path(out_dir) if out_dir is not None else None
        started = self.clock()
        try:
            source = source if source is not None else BagSource(bag).open()
        except BagOpenError as exc:
            raise ReplaySetupError(str(exc)) from None
        try:
            topics = resolve_topics(source, self.config)
            outcome = ReplayOutcome(bag, source.storage, topics, self.config.rate, out_dir=out)
            for note in source.type_notes:
                log.info("bag types: %s", note)
            self._source = source
            self._outcome = outcome
            self._gt = self._load_ground_truth(source, topics.gt) if topics.gt else {}
            outcome.gt_masks = len(self._gt)
            self._pipeline = PerceptionPipeline(self.model, self.config.pipeline, clock=self.clock)
            self._by_id: dict[int, CommandRecord] = {}
            self._latest_stamp: Stamp | None = None
            self._writer = self._open_writer(out) if out is not None and self.config.write_output_bag else None
            try:
                if self.config.command:
                    self._set_command(_CommandItem(self.config.command, -1))
                stream = source.messages([t for t in (topics.image, topics.command) if t])
                if self.config.rate is None:
                    self._run_fast(stream)
                else:
                    self._run_realtime(stream, self.config.rate)
            finally:
                if self._writer is not None:
                    self._writer.close()
                    outcome.output_bag = self._writer.path
                    outcome.output_counts = dict(self._writer.counts)
        finally:
            source.close()
        outcome.pipeline_stats = asdict(self._pipeline.stats)
        outcome.wall_s = self.clock() - started
        if out is not None:
            write_outputs(outcome, out)
        return outcome

    def _open_writer(self, out: Path) -> OutputBagWriter:
        target = out / "output"
        if target.exists():
            # Only ever replace what a replay wrote: a rosbag2 folder (or an empty one).
            if target.is_dir() and ((target / "metadata.yaml").is_file() or not any(target.iterdir())):
                shutil.rmtree(target)
            else:
                raise ReplaySetupError(f"{target} exists and is not a bag written by replay; remove it or pick --out")
        out.mkdir(parents=True, exist_ok=True)
        return OutputBagWriter(
            target, storage=self.config.output_storage, overlay_alpha=self.config.overlay_alpha
        ).open()

    # -- recording -------------------------------------------------------------------------------
    def _error(self, stamp: Stamp | None, topic: str, reason: str, log_time_ns: int | None = None) -> None:
        with self._lock:
            self._outcome.errors.append(ErrorEntry(stamp, topic, reason, log_time_ns))
        log.info("%s: %s", topic, reason)  # all of them end up in metrics.json and the report

    def _load_ground_truth(self, source: BagSource, topic: str) -> dict[int, tuple[tuple[int, int], np.ndarray]]:
        """stamp ns -> (shape, packed bits); read before the frames, wherever the masks lie in the bag."""
        masks: dict[int, tuple[tuple[int, int], np.ndarray]] = {}
        for bm in source.messages([topic]):
            stamp = None
            try:
                msg = source.deserialize(bm)
                stamp = m.header_stamp(msg)
                mask = mask_from_mono8(msg)
            except (DecodeError, m.MessageError, ImageConversionError) as exc:
                self._error(stamp, topic, f"ground-truth mask skipped: {exc}", bm.log_time_ns)
                continue
            masks[stamp_to_ns(stamp)] = (mask.shape, np.packbits(mask, axis=None))
        return masks

    def _ground_truth(self, stamp: Stamp) -> np.ndarray | None:
        entry = self._gt.get(stamp_to_ns(stamp))
        if entry is None:
            return None
        shape, bits = entry
        return np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape).astype(bool)

    # -- reading the stream (feeder side) --------------------------------------------------------
    def _prepare(self, bm: BagMessage) -> _FrameItem | _CommandItem | None:
        """Deserialise one message; None (and an error entry) when it is unusable."""
        topics = self._outcome.topics
        if bm.topic == topics.image:
            self._outcome.frames += 1
            try:
                msg = self._source.deserialize(bm)
                stamp = m.header_stamp(msg)
            except (DecodeError, m.MessageError) as exc:
                self._error(None, bm.topic, f"image skipped: {exc}", bm.log_time_ns)
                return None
            if self._outcome.first_frame_log_ns is None:
                self._outcome.first_frame_log_ns = bm.log_time_ns
            self._outcome.last_frame_log_ns = bm.log_time_ns
            return _FrameItem(msg, stamp, m.header_frame_id(msg), bm.log_time_ns)
        try:
            if self._source.ros1:
                text = m.command_text(self._source.deserialize(bm))
            else:
                # Tolerant of invalid UTF-8, like the node: one bad byte must not lose a command.
                text = m.decode_string_cdr(bm.raw).data
        except (DecodeError, m.MessageError) as exc:
            self._error(None, bm.topic, f"command skipped: {exc}", bm.log_time_ns)
            return None
        return _CommandItem(text, bm.log_time_ns)

    def _set_command(self, item: _CommandItem) -> None:
        # As the node's command_stamp_source "latest_frame": frames received before the command
        # (still waiting in the slot) do not answer it.
        stamp = stamp_after(self._latest_stamp)
        command_id = self._pipeline.set_command(item.text, stamp, self.clock())
        command = self._pipeline.command
        text = command.text if command is not None else item.text
        record = CommandRecord(
            command_id,
            text,
            item.log_time_ns,
            stop=not text,
            warnings=list(command.warnings) if command is not None else [],
            thumbnails=ThumbnailStrip(self.config.thumbnails_per_command),
        )
        with self._lock:
            self._outcome.commands.append(record)
            self._by_id[command_id] = record

    def _received(self, item: _FrameItem) -> None:
        item.received_at = self.clock()
        self._latest_stamp = item.stamp
        if self._outcome.first_input_s is None:
            self._outcome.first_input_s = item.received_at

    # -- timing modes ------------------------------------------------------------------------------
    def _run_fast(self, stream: Iterable[BagMessage]) -> None:
        for bm in stream:
            item = self._prepare(bm)
            if isinstance(item, _CommandItem):
                self._set_command(item)
            elif item is not None:
                self._received(item)
                self._handle_safely(item)

    def _run_realtime(self, stream: Iterable[BagMessage], rate: float) -> None:
        slot: LatestFrameSlot[_FrameItem] = LatestFrameSlot()
        worker = threading.Thread(target=self._work, args=(slot,), name="replay-worker", daemon=True)
        worker.start()
        t0: float | None = None
        first_log = 0
        try:
            for bm in stream:
                item = self._prepare(bm)  # deserialise first, so the hand-over itself is on time
                if t0 is None:
                    t0, first_log = self.clock(), bm.log_time_ns
                delay = t0 + (bm.log_time_ns - first_log) / 1e9 / rate - self.clock()
                if delay > 0:
                    self.sleep(delay)
                if isinstance(item, _CommandItem):
                    self._set_command(item)
                elif item is not None:
                    self._received(item)
                    slot.put(item)
        finally:
            slot.close()
            worker.join()
            self._outcome.dropped_frames = slot.stats.skipped

    def _work(self, slot: LatestFrameSlot[_FrameItem]) -> None:
        run_worker(slot, self._handle, self._on_crash)

    # -- processing (worker side) ------------------------------------------------------------------
    def _handle_safely(self, item: _FrameItem) -> None:
        try:
            self._handle(item)
        except Exception as exc:  # a replay must survive anything one frame can do
            self._on_crash(item, exc)

    def _on_crash(self, item: _FrameItem, exc: Exception) -> None:
        self._error(item.stamp, self._outcome.topics.image, f"unexpected error: {type(exc).__name__}: {exc}")
        log.debug("replay frame error", exc_info=exc)

    def _handle(self, item: _FrameItem) -> None:
        outcome = self._outcome
        topic = outcome.topics.image
        outcome.processed_frames += 1
        try:
            image = m.rgb_from_message(item.msg, outcome.topics.compressed)
        except ImageConversionError as exc:
            self._error(item.stamp, topic, f"malformed image skipped: {exc}", item.log_time_ns)
            return
        frame = Frame(image, item.stamp, item.frame_id, received_at=item.received_at)
        pipeline = self._pipeline
        before = replace(pipeline.stats)
        command = pipeline.command
        judged_command: int | None = None  # the command an empty prediction is charged to
        outcome_of_frame = process_frame(pipeline, frame)
        result = outcome_of_frame.result
        if outcome_of_frame.error is not None:
            self._error(item.stamp, topic, outcome_of_frame.error, item.log_time_ns)
            judged_command = outcome_of_frame.failed_command
            if judged_command is None and command is not None and not command.is_stop:
                judged_command = command.id
        else:
            idle = pipeline.stats.idle_frames > before.idle_frames
            if result is None and idle and command is not None and not command.is_stop:
                judged_command = command.id  # answered, but nothing to follow: the robot sees nothing
        now = self.clock()
        record = FrameRecord(item.stamp, item.log_time_ns, judged_command, None, None)
        if result is not None:
            record = self._record_result(item, result, now)
        elif judged_command is not None:
            record.iou = self._judge(item.stamp, None, image.shape[:2], judged_command)
        with self._lock:
            outcome.records.append(record)

    def _record_result(self, item: _FrameItem, result: Result, now: float) -> FrameRecord:
        outcome = self._outcome
        outcome.results += 1
        outcome.last_output_s = now
        t0 = outcome.first_input_s if outcome.first_input_s is not None else now
        record = FrameRecord(
            result.stamp,
            item.log_time_ns,
            result.command_id,
            float(result.latency_ms),
            now - t0,
            result.follow,
            len(result.objects),
        )
        record.iou = self._judge(result.stamp, result.instance_ids > 0, result.image.shape[:2], result.command_id)
        command = self._by_id.get(result.command_id)
        if command is not None:
            command.results += 1
            if not result.follow:
                command.answered = True
                command.answer = result.clean_text
                command.raw_answer = result.text
                command.answer_stamp = result.stamp
                command.objects = len(result.objects)
                command.warnings.extend(w for w in result.warnings if w not in command.warnings)
            if command.thumbnails.wants_next():
                thumb = make_thumbnail(
                    result, item.log_time_ns, self.config.thumbnail_size, self.config.overlay_alpha, record.iou
                )
                command.thumbnails.offer(thumb)
            else:
                command.thumbnails.offer(None)
        if self._writer is not None:
            rate = self.config.rate or 1.0
            log_time = item.log_time_ns + int(result.latency_ms * 1e6 * rate)
            self._writer.write(result, log_time)
        return record

    def _judge(self, stamp: Stamp, pred: np.ndarray | None, shape: tuple[int, int], command_id: int) -> float | None:
        gt = self._ground_truth(stamp) if self._gt else None
        if gt is None:
            return None
        if gt.shape != tuple(shape):
            self._error(
                stamp,
                self._outcome.topics.gt or "",
                f"ground-truth mask {gt.shape[1]}x{gt.shape[0]} does not match the image {shape[1]}x{shape[0]}",
            )
            return None
        if pred is None:
            pred = np.zeros(shape, dtype=bool)
        inter, union = mask_iou_counts(pred, gt)
        with self._lock:
            iou = self._outcome.iou.add(inter, union)
            command = self._by_id.get(command_id)
            if command is not None:
                command.iou.add(inter, union)
        return iou


def write_outputs(outcome: ReplayOutcome, out: Path) -> dict[str, Path]:
    """DIR/metrics.json and DIR/report.html (the output bag is written during the replay)."""
    from omg_llava_ros.replay.report import render_report

    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "report": out / "report.html"}
    paths["metrics"].write_text(json.dumps(outcome.metrics, indent=2) + "\n", encoding="utf-8")
    paths["report"].write_text(render_report(outcome), encoding="utf-8")
    return paths


def replay(
    model: Any, bag: str | Path, out_dir: str | Path | None = None, config: ReplayConfig | None = None
) -> ReplayOutcome:
    """Replay ``bag`` through a pipeline around ``model`` (anything with chat/follow)."""
    return Replayer(model, config).run(bag, out_dir)
