"""ROS-free perception pipeline: frames and commands in, grounded results out (plain data).

Used by the ROS node (live) and by the rosbag replay (offline), so both behave identically.
"""

from omg_llava_ros.pipeline.lifting import centroid, lift_to_3d
from omg_llava_ros.pipeline.overlay import instance_image, render_overlay
from omg_llava_ros.pipeline.pipeline import (
    CommandFailedError,
    PerceptionPipeline,
    PipelineConfig,
    PipelineError,
    PipelineStats,
)
from omg_llava_ros.pipeline.slot import LatestFrameSlot, SlotStats, StampedBuffer
from omg_llava_ros.pipeline.types import (
    CameraIntrinsics,
    Command,
    DetectedObject,
    Frame,
    Result,
    Stamp,
    Target3D,
    stamp_to_ns,
)

Pipeline = PerceptionPipeline

__all__ = [
    "CameraIntrinsics",
    "Command",
    "CommandFailedError",
    "DetectedObject",
    "Frame",
    "LatestFrameSlot",
    "PerceptionPipeline",
    "Pipeline",
    "PipelineConfig",
    "PipelineError",
    "PipelineStats",
    "Result",
    "SlotStats",
    "Stamp",
    "StampedBuffer",
    "Target3D",
    "centroid",
    "instance_image",
    "lift_to_3d",
    "render_overlay",
    "stamp_to_ns",
]
