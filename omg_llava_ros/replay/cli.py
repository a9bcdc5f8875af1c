"""`omg-llava-ros replay BAG --out DIR` (and `make-demo-bag OUT`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from omg_llava_ros.loading import add_model_argument
from omg_llava_ros.replay.bag import STRING, BagOpenError, BagSource
from omg_llava_ros.replay.runner import ReplayConfig, Replayer, ReplayOutcome, ReplaySetupError, Topics, resolve_topics

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")


def add_replay_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `replay` and `make-demo-bag` on the main parser's subcommands."""
    from omg_llava_ros.replay.demo_bag import add_demo_bag_parser

    p = sub.add_parser(
        "replay",
        help="replay a rosbag2 through the pipeline: output bag, metrics.json, report.html",
        description="Replay a recorded bag (rosbag2 sqlite3 or mcap, or a ROS 1 .bag) through the same "
        "pipeline the node runs. Writes DIR/output (a rosbag2 of the node's outputs), DIR/metrics.json "
        "and DIR/report.html. Topics not given are detected.",
    )
    p.add_argument("bag", help="rosbag2 folder, .mcap/.db3 file, or ROS 1 .bag")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-topic", default=None, help="sensor_msgs/Image or CompressedImage topic")
    p.add_argument("--command-topic", default=None, help="std_msgs/String topic with the commands")
    p.add_argument("--gt-topic", default=None, help="mono8 ground-truth masks with the frames' header stamps")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="real time at R x the recorded speed (1.0 = as recorded; frames the model cannot keep up "
        "with are dropped); default: as fast as possible, every frame processed",
    )
    p.add_argument("--command", default=None, help="a command in force from the first frame (bags without one)")
    add_model_argument(p)
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="where the vision parts run (default auto, as the node: on a CPU, ONNX Runtime, exported once)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--output-storage", choices=("mcap", "sqlite3"), default="mcap", help="storage of DIR/output")
    p.add_argument("--no-output-bag", action="store_true", help="skip DIR/output")
    p.set_defaults(func=cmd_replay)
    add_demo_bag_parser(sub)
    return p


def _model(spec: str | None, device: str, backend: str) -> Any:
    """The model with its vision on `backend`. As the node does, "auto" with no usable engine (a GPU
    machine where none is built yet) falls back to PyTorch vision with a warning; a backend asked for
    by name fails with the reason."""
    from omg_llava_ros.loading import load_model, resolve_device

    model = load_model(spec, resolve_device(device), "torch")
    if backend != "torch":
        from omg_llava_ros.engines.backend import select_backend_or_torch

        model.vision = select_backend_or_torch(backend, model, logger=log)
    return model


def preflight(bag: str | Path, config: ReplayConfig) -> Topics:
    """Open the bag and settle its topics before the (slow) model load; ReplaySetupError if it cannot run."""
    try:
        with BagSource(bag) as source:
            try:
                return resolve_topics(source, config)
            except ReplaySetupError as exc:
                reason = str(exc)
                info = source.topics.get(config.command_topic or "")
                if info is not None and info.msgtype == STRING:
                    read = _count_commands(source, info.name)
                    reason += f"; read {read} command(s) from {info.name}, but there are no frames to answer them on"
                raise ReplaySetupError(reason) from None
    except BagOpenError as exc:
        raise ReplaySetupError(str(exc)) from None


def _count_commands(source: BagSource, topic: str) -> int:
    from omg_llava_ros.replay.bag import DecodeError
    from omg_llava_ros.ros.messages import MessageError, command_text, decode_string_cdr

    count = 0
    for bm in source.messages([topic]):
        try:
            (command_text(source.deserialize(bm)) if source.ros1 else decode_string_cdr(bm.raw).data)
        except (DecodeError, MessageError):
            continue
        count += 1
    return count


def summary_lines(outcome: ReplayOutcome) -> list[str]:
    met = outcome.metrics
    lat = met["latency_ms"]
    mode = "as fast as possible" if outcome.rate is None else f"real time x{outcome.rate:g}"

    def ms(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    lines = [
        f"replayed {outcome.bag} ({outcome.storage}), {mode}: {met['frames']} frames, "
        f"{met['processed_frames']} processed, {met['dropped_frames']} dropped, {met['results']} outputs",
        f"commands {met['commands']} ({met['answered_commands']} answered), errors {len(met['errors'])}",
        f"latency ms p50 {ms(lat['p50'])} p95 {ms(lat['p95'])} max {ms(lat['max'])}; output fps "
        f"{'–' if met['output_fps'] is None else met['output_fps']}",
    ]
    if "ciou" in met:
        ciou, giou = met["ciou"], met["giou"]
        lines.append(
            f"cIoU {'–' if ciou is None else f'{ciou:.3f}'} gIoU {'–' if giou is None else f'{giou:.3f}'} "
            f"over {met['ground_truth']['evaluated_frames']} frames with ground truth"
        )
    out = outcome.out_dir
    if outcome.output_bag is not None:
        lines.append(f"output bag: {outcome.output_bag}")
    if out is not None:
        lines.append(f"metrics: {out / 'metrics.json'}")
        lines.append(f"report: {out / 'report.html'}")
    return lines


def cmd_replay(args: argparse.Namespace) -> int:
    from omg_llava_ros.pipeline import PipelineConfig

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    try:
        config = ReplayConfig(
            image_topic=args.image_topic,
            command_topic=args.command_topic,
            gt_topic=args.gt_topic,
            rate=args.rate,
            command=args.command,
            pipeline=PipelineConfig(max_new_tokens=args.max_new_tokens),
            write_output_bag=not args.no_output_bag,
            output_storage=args.output_storage,
        )
    except ValueError as exc:
        return fail(str(exc))
    try:
        topics = preflight(args.bag, config)
    except ReplaySetupError as exc:
        return fail(str(exc))
    if topics.command is None and not config.command:
        log.warning("no command topic found: frames are only followed after --command; nothing will be answered")
    try:
        model = _model(args.model, args.device, args.backend)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError, OSError) as exc:
        return fail(f"cannot load the model: {exc}")
    try:
        outcome = Replayer(model, config).run(args.bag, Path(args.out))
    except ReplaySetupError as exc:
        return fail(str(exc))
    for line in summary_lines(outcome):
        print(line)
    return 0
