"""`omg-llava-ros bench --ros2`: end-to-end latency of the node on real rclpy, beside the pipeline's.

The node runs as a separate process on rclpy (``python -m omg_llava_ros.ros``); a second
rclpy node (omg_llava_ros.ros.peer) publishes tabletop frames and commands and times each result
from the image's publication to the result's arrival: the first command after activation, further
commands, and follow-mode frames (each frame published after the previous result, so these are
latencies, not a rate). The node is started twice in the run, with and without the warm-up at
configure, so the first command's cost is shown both ways. The same frames and commands then go
through a ``PerceptionPipeline`` in this process: the difference is what ROS adds (serialisation,
DDS, conversion, the worker hand-off). Last, in real time: one moving scene published at 30 Hz
after a command, whatever the node's pace; every frame the node did not answer is counted as
dropped (it keeps only the newest frame, as `replay --rate 1.0` does, which reports its drops the
same way). Needs the ROS workspace sourced (see the README).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omg_llava_ros.replay.metrics import latency_summary

NAMESPACE = "/omg_llava_bench"
NODE = f"{NAMESPACE}/omg_llava"
IMAGE_TOPIC = f"{NAMESPACE}/camera/image"
START_TIMEOUT_S = 300.0


def _scenes(seed: int, commands: int, follow_frames: int) -> list[tuple[str, list[np.ndarray]]]:
    from omg_llava_ros.toyworld import sample_moving_scene

    rng = np.random.default_rng(seed)
    return [
        (moving.command.question, [f.image for f in moving.frames])
        for moving in (sample_moving_scene(rng, num_frames=follow_frames + 1) for _ in range(commands))
    ]


def _percentiles(values: list[float]) -> dict[str, float | None]:
    return {**latency_summary(values), "n": len(values)}


@dataclass
class RealTime:
    """The real-time part: `frames` frames of one moving scene published at `hz` (0: skipped)."""

    frames: int = 300
    hz: float = 30.0
    seed: int = 1


def _node_run(
    scenes: list[tuple[str, list[np.ndarray]]],
    warm_up: bool,
    backend: str,
    progress: Callable[[str], None],
    real_time: RealTime | None = None,
) -> dict[str, Any]:

    command = [sys.executable, "-m", "omg_llava_ros.ros", "--ros-args", "-r", "__node:=omg_llava"]
    command += ["-r", f"__ns:={NAMESPACE}", "-r", f"~/image:={IMAGE_TOPIC}", "-p", f"backend:={backend}"]
    command += ["-p", "use_depth:=false", "-p", "stats_period_s:=0", "-p", f"warm_up:={str(warm_up).lower()}"]
    with tempfile.TemporaryDirectory(prefix="omg_llava_bench_") as tmp:
        log_path = Path(tmp) / "node.log"
        with log_path.open("w") as log_file:
            started = time.monotonic()
            proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                return _time_node(proc, log_path, scenes, warm_up, started, progress, real_time)
            finally:
                proc.send_signal(2)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _time_node(
    proc: subprocess.Popen,
    log_path: Path,
    scenes: list[tuple[str, list[np.ndarray]]],
    warm_up: bool,
    started: float,
    progress: Callable[[str], None],
    real_time: RealTime | None = None,
) -> dict[str, Any]:
    from omg_llava_ros.ros.peer import NodePeer, image_message

    peer = NodePeer(
        NODE,
        {"image": IMAGE_TOPIC, "depth": "~/unused_depth", "camera_info": "~/unused_info", "command": f"{NODE}/command"},
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "serving action" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node did not start; its log:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        ready_s = time.monotonic() - started
        if not (peer.wait_for_subscribers("image") and peer.wait_for_subscribers("command")):
            raise RuntimeError("the node's subscriptions were not discovered")
        progress(f"node up in {ready_s:.1f} s (warm_up={warm_up}); timing {len(scenes)} commands")
        commands, follows, node_commands, node_follows = [], [], [], []
        stamp_sec = 1
        for text, frames in scenes:
            peer.command(text)
            time.sleep(0.2)  # the command arrives before the frame that answers it
            for i, frame in enumerate(frames):
                stamp = (stamp_sec, 0)
                stamp_sec += 1
                sent = peer.publish("image", image_message(frame, stamp, "camera"))
                result = peer.with_stamp("result", stamp, timeout=60.0)
                if result is None:
                    raise RuntimeError(
                        f"no result for frame {stamp}; node log:\n{log_path.read_text(errors='replace')[-3000:]}"
                    )
                (follows if i else commands).append((result.at - sent) * 1000.0)
                (node_follows if i else node_commands).append(float(result.msg.latency_ms))
        report = {
            "ready_s": ready_s,
            "first_command_ms": commands[0],
            "command_ms": _percentiles(commands[1:]),
            "follow_ms": _percentiles(follows),
            "node_command_ms": _percentiles(node_commands[1:]),
            "node_follow_ms": _percentiles(node_follows),
        }
        if real_time is not None and real_time.frames > 0:
            progress(f"publishing {real_time.frames} frames at {real_time.hz:g} Hz")
            report["real_time"] = _publish_in_real_time(peer, real_time, first_sec=stamp_sec + 1000)
        return report
    finally:
        peer.close()


def _publish_in_real_time(peer: Any, real_time: RealTime, first_sec: int) -> dict[str, Any]:
    """A command, then one moving scene's frames at `real_time.hz` on the wall clock; a frame with
    no result once the node has gone quiet (2 s without one, or 60 s) counts as dropped."""
    from omg_llava_ros.ros.peer import image_message
    from omg_llava_ros.toyworld import sample_moving_scene

    moving = sample_moving_scene(np.random.default_rng(real_time.seed), num_frames=real_time.frames)
    stamps = [(first_sec + i, 0) for i in range(len(moving.frames))]
    messages = [image_message(f.image, stamp, "camera") for f, stamp in zip(moving.frames, stamps, strict=True)]
    wanted = set(stamps)

    def answered() -> set[tuple[int, int]]:
        return peer.stamps("result") & wanted

    peer.command(moving.command.question)
    time.sleep(0.2)  # the command arrives before the first frame
    period = 1.0 / real_time.hz
    start = time.monotonic()
    late = 0  # frames published more than a period after their slot (this publisher fell behind)
    for i, msg in enumerate(messages):
        slot = start + i * period
        wait = slot - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        elif -wait > period:
            late += 1
        peer.publish("image", msg)
    published_s = time.monotonic() - start
    deadline, quiet_since, seen = time.monotonic() + 60.0, time.monotonic(), 0
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 2.0:
        time.sleep(0.1)
        now_seen = len(answered())
        if now_seen != seen:
            seen, quiet_since = now_seen, time.monotonic()
    got = len(answered())
    return {
        "hz": real_time.hz,
        "published": len(messages),
        "published_s": published_s,
        "publisher_late": late,
        "answered": got,
        "dropped": len(messages) - got,
        "answered_hz": got / published_s if published_s > 0 else None,
    }


def _in_process(scenes: list[tuple[str, list[np.ndarray]]], backend: str) -> dict[str, Any]:
    from omg_llava_ros.pipeline import Frame, PerceptionPipeline
    from omg_llava_ros.ros.node import load_model
    from omg_llava_ros.ros.parameters import NodeParameters

    model = load_model(NodeParameters(backend=backend, device="cpu"), logging.getLogger(__name__))
    pipeline = PerceptionPipeline(model)
    first = pipeline.warm_up()
    commands, follows = [], []
    stamp_sec = 1
    for text, frames in scenes:
        pipeline.set_command(text)
        for i, frame in enumerate(frames):
            started = time.monotonic()
            pipeline.process(Frame(frame, (stamp_sec, 0), "camera", received_at=started))
            stamp_sec += 1
            (follows if i else commands).append((time.monotonic() - started) * 1000.0)
    return {
        "first_call_ms": first * 1000.0,
        "command_ms": _percentiles(commands[1:]),
        "follow_ms": _percentiles(follows),
    }


def bench_node(
    commands: int = 8,
    follow_frames: int = 8,
    seed: int = 0,
    backend: str = "torch",
    progress: Callable[[str], None] = lambda _msg: None,
    real_time: RealTime | None = None,
) -> dict[str, Any]:
    """Both node runs and the in-process pipeline on the same scenes; see the module docstring."""
    if commands < 2:
        raise ValueError("--repeats must be at least 2 (the first command is reported on its own)")
    if follow_frames < 1:
        raise ValueError("--follow-frames must be at least 1")
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    scenes = _scenes(seed, commands, follow_frames)
    report: dict[str, Any] = {"commands": commands, "follow_frames": follow_frames, "backend": backend}
    report["node_warm"] = _node_run(scenes, True, backend, progress, real_time or RealTime())
    report["node_cold"] = _node_run(scenes, False, backend, progress)
    progress("the same frames in process")
    report["in_process"] = _in_process(scenes, backend)
    return report


def format_node_report(r: dict[str, Any]) -> str:
    def row(name: str, stats: dict[str, float]) -> str:
        return (
            f"  {name:<44} p50 {stats['p50']:7.1f}  p95 {stats['p95']:7.1f}  max {stats['max']:7.1f}  (n={stats['n']})"
        )

    warm, cold, local = r["node_warm"], r["node_cold"], r["in_process"]

    def added(key: str) -> float:
        return warm[key]["p50"] - local[key]["p50"]

    lines = [
        f"node on rclpy ({r['backend']} vision), {r['commands']} commands x {r['follow_frames']} follow frames, ms:",
        f"  first command after activation, warm-up at configure  {warm['first_command_ms']:7.1f}",
        f"  first command after activation, no warm-up            {cold['first_command_ms']:7.1f}",
        row("command: image published -> result received", warm["command_ms"]),
        row("follow:  image published -> result received", warm["follow_ms"]),
        row("command: in the node (receipt -> publish)", warm["node_command_ms"]),
        row("follow:  in the node (receipt -> publish)", warm["node_follow_ms"]),
        row("command: pipeline in process", local["command_ms"]),
        row("follow:  pipeline in process", local["follow_ms"]),
        f"  ROS adds (p50, end to end - in process): command {added('command_ms'):.1f} ms,"
        f" follow {added('follow_ms'):.1f} ms",
    ]
    rt = warm.get("real_time")
    if rt is not None:
        lines.append(
            f"real time: {rt['published']} frames published at {rt['hz']:g} Hz, {rt['answered']} answered "
            f"({rt['answered_hz']:.1f} Hz), {rt['dropped']} dropped"
            + (f"; the publisher fell behind on {rt['publisher_late']}" if rt["publisher_late"] else "")
        )
    return "\n".join(lines)
