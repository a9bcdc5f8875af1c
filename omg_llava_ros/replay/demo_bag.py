"""The demo bag: the tabletop world's moving scenes as a camera would record them, with commands
over time and ground truth, so ``omg-llava-ros replay`` has something meaningful to evaluate.

Layout (rosbag2, mcap with zstd chunks, deterministic from the seed):

* ``/camera/image_raw`` sensor_msgs/Image rgb8 at ``fps``; header stamp = recorded time;
* ``/camera/camera_info`` sensor_msgs/CameraInfo with every frame (a pinhole with a ~53° field of view);
* ``/command`` std_msgs/String: at the start of each scene a referring command ("Please segment the
  red circle."), mid-way through some scenes a second one about another object, a question with no
  object to ground ("How many objects are there?"), and an empty command (stop) near the end;
* ``/ground_truth/mask`` sensor_msgs/Image mono8, 255 = the object the command in force refers to,
  with the header stamp of its frame; frames under a question or after a stop have none.

Each scene is a fresh table, so every scene starts with a command. The recorded time of a command
lies 1 ms before its first frame, as a command sent just before the camera's next frame would.
The bag declares its topics in metadata.yaml custom_data, so replay needs no topic flags.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omg_llava_ros.pipeline.types import NANOSECONDS, ns_to_stamp
from omg_llava_ros.replay.output_bag import ros2msg_definition
from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.image_conversion import mono8_fields, rgb_to_image_fields

IMAGE_TOPIC = "/camera/image_raw"
CAMERA_INFO_TOPIC = "/camera/camera_info"
COMMAND_TOPIC = "/command"
GT_TOPIC = "/ground_truth/mask"
FRAME_ID = "camera_optical_frame"
# A fixed start time (2024-01-01T00:00:00Z), so the bag is byte-identical for a given seed.
START_NS = 1_704_067_200 * NANOSECONDS
COMMAND_LEAD_NS = 1_000_000  # commands are recorded 1 ms before the frame that should answer them


@dataclass
class DemoBagConfig:
    seed: int = 0
    scenes: int = 4
    frames_per_scene: int = 16
    size: int = 256
    fps: float = 10.0
    storage: str = "mcap"

    def __post_init__(self) -> None:
        if self.scenes < 1 or self.frames_per_scene < 1:
            raise ValueError("scenes and frames_per_scene must be at least 1")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.storage not in ("mcap", "sqlite3"):
            raise ValueError(f"storage must be mcap or sqlite3, got {self.storage!r}")


@dataclass
class DemoFrame:
    """One frame of the schedule: the image, the command sent just before it (if any), the ground truth."""

    image: np.ndarray
    stamp_ns: int
    command: str | None = None
    gt_mask: np.ndarray | None = None


@dataclass
class DemoScript:
    frames: list[DemoFrame] = field(default_factory=list)

    @property
    def commands(self) -> list[str]:
        return [f.command for f in self.frames if f.command is not None]


def build_script(config: DemoBagConfig) -> DemoScript:
    """The frames, commands and ground truth of the demo bag (no I/O)."""
    from omg_llava_ros.toyworld import referable_objects, sample_moving_scene, sample_referring_segmentation
    from omg_llava_ros.toyworld.conversations import COUNT_ALL_QUESTION

    rng = np.random.default_rng(config.seed)
    period_ns = round(NANOSECONDS / config.fps)
    script = DemoScript()
    n = config.frames_per_scene
    for s in range(config.scenes):
        moving = sample_moving_scene(rng, n, config.size)
        target: int | None = moving.target
        # What happens mid-scene, by scene: a second object, a question, nothing, a stop.
        event = ("switch", "question", None, "stop")[s % 4] if n >= 4 else None
        switch_at = n // 2
        stop_at = max(1, n - 3)
        for k, rendered in enumerate(moving.frames):
            command = moving.command.question if k == 0 else None
            if event == "switch" and k == switch_at:
                others = [i for i in referable_objects(rendered) if i != target]
                if others:
                    target = others[int(rng.integers(len(others)))]
                    command = sample_referring_segmentation(rng, rendered, target).question
            elif event == "question" and k == switch_at:
                command, target = COUNT_ALL_QUESTION, None
            elif event == "stop" and k == stop_at:
                command, target = "", None
            gt = rendered.objects[target].mask if target is not None else None
            stamp = START_NS + (s * n + k) * period_ns
            script.frames.append(DemoFrame(rendered.image, stamp, command, gt))
    return script


def _camera_info(size: int, header: dict[str, Any]) -> dict[str, Any]:
    f = size / (2.0 * np.tan(np.deg2rad(53.0) / 2.0))
    c = (size - 1) / 2.0
    return {
        "header": header,
        "height": size,
        "width": size,
        "distortion_model": "plumb_bob",
        "d": np.zeros(5),
        "k": np.array([f, 0.0, c, 0.0, f, c, 0.0, 0.0, 1.0]),
        "r": np.eye(3).reshape(-1),
        "p": np.array([f, 0.0, c, 0.0, 0.0, f, c, 0.0, 0.0, 0.0, 1.0, 0.0]),
    }


def _messages(script: DemoScript, size: int) -> Iterator[tuple[str, str, int, dict[str, Any]]]:
    """(topic, type, log time, fields) in recorded order."""
    for frame in script.frames:
        header = m.header_fields(ns_to_stamp(frame.stamp_ns), FRAME_ID)
        if frame.command is not None:
            yield COMMAND_TOPIC, m.STRING, frame.stamp_ns - COMMAND_LEAD_NS, {"data": frame.command}
        yield CAMERA_INFO_TOPIC, m.CAMERA_INFO, frame.stamp_ns, _camera_info(size, header)
        yield IMAGE_TOPIC, m.IMAGE, frame.stamp_ns, {"header": header, **rgb_to_image_fields(frame.image)}
        if frame.gt_mask is not None:
            mask = frame.gt_mask.astype(np.uint8) * 255
            yield GT_TOPIC, m.IMAGE, frame.stamp_ns, {"header": header, **mono8_fields(mask)}


def write_demo_bag(out: str | Path, config: DemoBagConfig | None = None, overwrite: bool = False) -> Path:
    """Write the demo bag to the folder ``out`` (a new rosbag2) and return it."""
    from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer

    config = config or DemoBagConfig()
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; remove it or pass overwrite=True (--force)")
        shutil.rmtree(out)
    script = build_script(config)
    conv = m.RosbagsMessages(m.make_typestore())
    plugin = StoragePlugin.MCAP if config.storage == "mcap" else StoragePlugin.SQLITE3
    writer = Writer(out, version=8, storage_plugin=plugin)
    if config.storage == "mcap":
        writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    for key, value in (
        ("omg_llava_ros.image_topic", IMAGE_TOPIC),
        ("omg_llava_ros.command_topic", COMMAND_TOPIC),
        ("omg_llava_ros.ground_truth_topic", GT_TOPIC),
        ("omg_llava_ros.demo_seed", str(config.seed)),
        ("omg_llava_ros.producer", "omg-llava-ros make-demo-bag"),
    ):
        writer.set_custom_data(key, value)
    with writer:
        connections = {}
        for topic, msgtype in (
            (IMAGE_TOPIC, m.IMAGE),
            (CAMERA_INFO_TOPIC, m.CAMERA_INFO),
            (COMMAND_TOPIC, m.STRING),
            (GT_TOPIC, m.IMAGE),
        ):
            msgdef, rihs01 = ros2msg_definition(conv.typestore, msgtype)
            connections[topic] = writer.add_connection(topic, msgtype, msgdef=msgdef, rihs01=rihs01)
        for topic, msgtype, log_time, fields in _messages(script, config.size):
            writer.write(connections[topic], log_time, conv.serialize(msgtype, fields))
    return out


def bag_size(path: str | Path) -> int:
    """Bytes of all files in a bag folder."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def add_demo_bag_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "make-demo-bag",
        help="write the demo bag (tabletop scenes, commands, ground truth) as a rosbag2",
        description="Write a rosbag2 of the tabletop world's moving scenes: rgb8 camera images and "
        "camera_info at --fps, commands over time on /command, ground-truth masks on /ground_truth/mask.",
    )
    p.add_argument("out", help="the bag folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=int, default=DemoBagConfig.scenes)
    p.add_argument("--frames-per-scene", type=int, default=DemoBagConfig.frames_per_scene)
    p.add_argument("--size", type=int, default=DemoBagConfig.size, help="image side in pixels")
    p.add_argument("--fps", type=float, default=DemoBagConfig.fps)
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_make_demo_bag)
    return p


def cmd_make_demo_bag(args: argparse.Namespace) -> int:
    try:
        config = DemoBagConfig(args.seed, args.scenes, args.frames_per_scene, args.size, args.fps, args.storage)
        path = write_demo_bag(args.out, config, overwrite=args.force)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    script_frames = config.scenes * config.frames_per_scene
    print(f"wrote {path} ({bag_size(path) / 1e6:.1f} MB, {script_frames} frames, {config.scenes} scenes)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m omg_llava_ros.replay.demo_bag")
    subs = parser.add_subparsers(dest="command", required=True)
    add_demo_bag_parser(subs)
    ns = parser.parse_args(["make-demo-bag", *sys.argv[1:]])
    sys.exit(ns.func(ns))
