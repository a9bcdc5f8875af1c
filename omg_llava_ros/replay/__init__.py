"""Rosbag replay evaluation (through ``rosbags``, no ROS install): the same pipeline as the node,
as fast as possible or in real time, with an output bag, metrics.json and an HTML report."""

from omg_llava_ros.replay.bag import BagMessage, BagOpenError, BagSource, DecodeError, TopicInfo
from omg_llava_ros.replay.demo_bag import DemoBagConfig, build_script, write_demo_bag
from omg_llava_ros.replay.metrics import IouAccumulator, jitter_summary, latency_summary, mask_iou_counts
from omg_llava_ros.replay.output_bag import OUTPUT_TOPICS, OutputBagWriter
from omg_llava_ros.replay.report import render_report
from omg_llava_ros.replay.runner import (
    CommandRecord,
    ErrorEntry,
    FrameRecord,
    ReplayConfig,
    Replayer,
    ReplayOutcome,
    ReplaySetupError,
    Topics,
    replay,
    resolve_topics,
    write_outputs,
)

__all__ = [
    "OUTPUT_TOPICS",
    "BagMessage",
    "BagOpenError",
    "BagSource",
    "CommandRecord",
    "DecodeError",
    "DemoBagConfig",
    "ErrorEntry",
    "FrameRecord",
    "IouAccumulator",
    "OutputBagWriter",
    "ReplayConfig",
    "ReplayOutcome",
    "ReplaySetupError",
    "Replayer",
    "TopicInfo",
    "Topics",
    "build_script",
    "jitter_summary",
    "latency_summary",
    "mask_iou_counts",
    "render_report",
    "replay",
    "resolve_topics",
    "write_demo_bag",
    "write_outputs",
]
