"""Launch the OMG-LLaVA perception node.

    ros2 launch omg_llava_ros omg_llava.launch.py model_path:=/models/omg_llava_7b backend:=tensorrt \
        image_topic:=/camera/color/image_raw depth_topic:=/camera/aligned_depth_to_color/image_raw \
        camera_info_topic:=/camera/color/camera_info namespace:=robot1

The node self-activates (autostart) and exits 1 if that fails; send a command with
    ros2 topic pub --once /robot1/omg_llava/command std_msgs/msg/String "{data: 'pick up the red cup'}"

Thin on purpose: one Node action. tests/ros2 renders it into the command line that the real-rclpy
tests run.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

# (name, default, description): every launch argument, in one place.
ARGUMENTS: tuple[tuple[str, str, str], ...] = (
    ("namespace", "", "namespace of the node (topics become /<namespace>/omg_llava/...)"),
    ("model_path", "", "model directory; empty = the embedded default model"),
    ("backend", "auto", "vision backend: auto, torch, onnxruntime, tensorrt or triton"),
    ("triton_url", "127.0.0.1:8000", "backend triton: host:port of the server (omg-llava-ros serve)"),
    ("build_engines", "false", "build missing engines at start (minutes); default: fail or fall back loudly"),
    ("image_topic", "/camera/image_raw", "colour image (sensor_msgs/Image; <topic>/compressed when compressed)"),
    ("input_compressed", "false", "subscribe <image_topic>/compressed (CompressedImage) instead"),
    ("depth_topic", "/camera/depth/image_raw", "depth registered to the colour image (16UC1 mm or 32FC1 m)"),
    ("camera_info_topic", "/camera/camera_info", "CameraInfo of the colour image"),
    ("use_depth", "true", "subscribe depth + camera_info and publish 3D targets"),
    ("command_topic", "~/command", "std_msgs/String commands (default: the node's own ~/command)"),
    (
        "params_file",
        os.path.join(get_package_share_directory("omg_llava_ros"), "config", "omg_llava.yaml"),
        "parameter YAML (every parameter, with its default)",
    ),
)


def generate_launch_description() -> LaunchDescription:
    args = {name: LaunchConfiguration(name) for name, _, _ in ARGUMENTS}
    image = args["image_topic"]
    node = Node(
        package="omg_llava_ros",
        executable="omg_llava_node",
        name="omg_llava",
        namespace=args["namespace"],
        output="screen",
        parameters=[
            args["params_file"],
            {
                # Typed explicitly: an empty string would otherwise be read as YAML null.
                "model_path": ParameterValue(args["model_path"], value_type=str),
                "backend": ParameterValue(args["backend"], value_type=str),
                "triton_url": ParameterValue(args["triton_url"], value_type=str),
                "build_engines": ParameterValue(args["build_engines"], value_type=bool),
                "input_compressed": ParameterValue(args["input_compressed"], value_type=bool),
                "use_depth": ParameterValue(args["use_depth"], value_type=bool),
            },
        ],
        remappings=[
            ("~/image", image),
            ("~/image/compressed", [image, "/compressed"]),
            ("~/depth", args["depth_topic"]),
            ("~/camera_info", args["camera_info_topic"]),
            ("~/command", args["command_topic"]),
        ],
    )
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=desc) for name, default, desc in ARGUMENTS]
        + [node]
    )
