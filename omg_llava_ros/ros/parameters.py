"""The node's parameters, declared in ONE place (this dataclass); ros2/omg_llava_ros/config/omg_llava.yaml
mirrors it.

The rclpy node declares a ROS parameter per field (default and description from here; values
are type-checked here, at configure). A test checks that the YAML and this class agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omg_llava_ros.pipeline.pipeline import PipelineConfig

NODE_NAME = "omg_llava"
RELIABILITIES = ("reliable", "best_effort")
DURABILITIES = ("volatile", "transient_local")
BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt", "triton")
STAMP_SOURCES = ("latest_frame", "clock", "none")
MASK_ENCODINGS = ("auto", "mono8", "mono16")


def _p(default: Any, description: str) -> Any:
    return field(default=default, metadata={"description": description})


@dataclass(frozen=True)
class QosSpec:
    """Transport-neutral QoS: reliability, keep-last depth, durability."""

    reliability: str = "reliable"
    depth: int = 10
    durability: str = "volatile"

    def __post_init__(self) -> None:
        if self.reliability not in RELIABILITIES:
            raise ValueError(f"QoS reliability must be one of {RELIABILITIES}, got {self.reliability!r}")
        if self.durability not in DURABILITIES:
            raise ValueError(f"QoS durability must be one of {DURABILITIES}, got {self.durability!r}")
        if self.depth < 1:
            raise ValueError(f"QoS depth must be at least 1, got {self.depth}")

    def describe(self) -> str:
        return f"{self.reliability}, keep last {self.depth}, {self.durability}"


@dataclass(frozen=True)
class NodeParameters:
    model_path: str = _p(
        "", "model directory; empty = the embedded default; 'config:tiny' = random weights (smoke test)"
    )
    backend: str = _p("auto", "vision backend: auto, torch, onnxruntime, tensorrt or triton (a server: triton_url)")
    triton_url: str = _p(
        "127.0.0.1:8000", "backend triton: host:port of the server's HTTP endpoint (omg-llava-ros serve)"
    )
    triton_timeout_s: float = _p(
        10.0, "backend triton: per-call timeout; a failed call is reported, the next reconnects"
    )
    device: str = _p("auto", "torch device for the model: auto (cuda when available), cpu, cuda, cuda:1 ...")
    adapt_threads: bool = _p(
        True, "on the CPU, run the model on the cores other processes leave free (1 thread beside busy ones)"
    )
    build_engines: bool = _p(
        False,
        "build missing/stale ONNX/TensorRT engines at configure (minutes); when false a named backend "
        "without engines fails configure and auto falls back to PyTorch with a warning",
    )
    engine_cache_dir: str = _p("", "where engines are looked up/built; empty = the engines package default")
    max_new_tokens: int = _p(0, "answer length limit in tokens; 0 = the model's default")
    max_command_chars: int = _p(2000, "longer commands are truncated (with a warning)")
    command_stamp_source: str = _p(
        "latest_frame",
        "what 'older than the command' means: latest_frame = frames received after the command "
        "(works with any camera clock and with bag replay), clock = node clock at receipt, none = next frame",
    )
    command_frame_tolerance_s: float = _p(0.0, "frames up to this much older than the command may still answer it")
    input_compressed: bool = _p(False, "subscribe ~/image/compressed (CompressedImage) instead of ~/image")
    use_depth: bool = _p(True, "subscribe ~/depth and ~/camera_info and publish 3D targets")
    depth_max_offset_s: float = _p(0.05, "a depth image further than this from the colour frame is not used")
    depth_buffer_size: int = _p(10, "recent depth images kept for pairing with colour frames by stamp")
    mask_encoding: str = _p(
        "auto", "~/masks and result instance_mask: auto (mono8, mono16 above 255 objects), mono8, mono16"
    )
    publish_overlay: bool = _p(True, "publish ~/overlay (rgb8) when someone subscribes")
    overlay_alpha: float = _p(0.5, "overlay tint strength in [0, 1]")
    max_cloud_points: int = _p(20000, "per-object cap on ~/target_points (even subsampling)")
    image_qos_reliability: str = _p(
        "best_effort", "image, depth and camera_info subscriptions: reliable or best_effort"
    )
    image_qos_depth: int = _p(1, "image subscription keep-last depth")
    command_qos_reliability: str = _p("reliable", "~/command subscription reliability")
    command_qos_depth: int = _p(10, "~/command subscription keep-last depth")
    command_qos_durability: str = _p(
        "volatile", "~/command durability; transient_local receives a latched command published before start"
    )
    result_qos_reliability: str = _p("reliable", "output publishers' reliability")
    result_qos_depth: int = _p(10, "output publishers' keep-last depth")
    action_timeout_s: float = _p(30.0, "~/segment goals without an image wait at most this long for a frame")
    autostart: bool = _p(
        True, "configure and activate at start (no lifecycle manager needed); the process exits 1 if either fails"
    )
    warm_up: bool = _p(True, "run one command and one follow frame at configure, so the first real command is not slow")
    stats_period_s: float = _p(10.0, "log frame/skip/error counts and latency this often; 0 = never")

    def __post_init__(self) -> None:
        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"parameter {name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

        one_of("backend", BACKENDS)
        one_of("command_stamp_source", STAMP_SOURCES)
        one_of("mask_encoding", MASK_ENCODINGS)
        for name in (
            "max_command_chars",
            "depth_buffer_size",
            "image_qos_depth",
            "command_qos_depth",
            "result_qos_depth",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"parameter {name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_new_tokens", "max_cloud_points"):
            if getattr(self, name) < 0:
                raise ValueError(f"parameter {name} must be >= 0, got {getattr(self, name)}")
        if self.triton_timeout_s <= 0:
            raise ValueError(f"parameter triton_timeout_s must be > 0, got {self.triton_timeout_s}")
        for name in ("command_frame_tolerance_s", "depth_max_offset_s", "action_timeout_s", "stats_period_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"parameter {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.overlay_alpha <= 1.0:
            raise ValueError(f"parameter overlay_alpha must be in [0, 1], got {self.overlay_alpha}")
        # QoS values are checked by building them.
        self.image_qos()
        self.command_qos()
        self.result_qos()

    # -- derived settings --------------------------------------------------------------------
    def image_qos(self) -> QosSpec:
        return QosSpec(self.image_qos_reliability, self.image_qos_depth, "volatile")

    def command_qos(self) -> QosSpec:
        return QosSpec(self.command_qos_reliability, self.command_qos_depth, self.command_qos_durability)

    def result_qos(self) -> QosSpec:
        return QosSpec(self.result_qos_reliability, self.result_qos_depth, "volatile")

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(
            max_command_chars=self.max_command_chars,
            command_frame_tolerance_s=self.command_frame_tolerance_s,
            depth_max_offset_s=self.depth_max_offset_s,
            max_new_tokens=self.max_new_tokens or None,
            adapt_threads=self.adapt_threads,
        )

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def specs(cls) -> list[tuple[str, Any, str]]:
        """(name, default, description) of every parameter, in declaration order."""
        return [(f.name, f.default, f.metadata.get("description", "")) for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NodeParameters:
        """From {name: value}; unknown names and wrong types raise ValueError naming them."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown parameter(s): {', '.join(unknown)}")
        converted = {name: _convert(name, known[name].default, value) for name, value in values.items()}
        return cls(**converted)

    @classmethod
    def from_getter(cls, get: Callable[[str], Any]) -> NodeParameters:
        """From a getter (the rclpy node's declared parameter values)."""
        return cls.from_mapping({name: get(name) for name, _, _ in cls.specs()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _convert(name: str, default: Any, value: Any) -> Any:
    kind = type(default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"parameter {name} must be a bool, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"parameter {name} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"parameter {name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"parameter {name} must be a string, got {value!r}")
    return value


def load_parameter_file(path: str | Path, node_name: str = NODE_NAME, namespace: str = "/") -> dict[str, Any]:
    """The ros__parameters of a ROS 2 parameter YAML that apply to this node.

    Sections apply in the file's order: ``/**`` (any node), the bare node name, and the fully
    qualified ``/namespace/node`` — later sections override earlier ones, as in rcl.
    """
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a parameter file must map node names to sections")
    full = "/" + "/".join(p for p in (namespace.strip("/"), node_name) if p)
    values: dict[str, Any] = {}
    for key, section in data.items():
        if str(key) not in ("/**", node_name, full, full.lstrip("/")):
            continue
        if not isinstance(section, dict) or not isinstance(section.get("ros__parameters"), dict):
            raise ValueError(f"{path}: section {key!r} needs a ros__parameters mapping")
        values.update(section["ros__parameters"])
    return values
