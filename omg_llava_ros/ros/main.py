"""The node's entry point: `ros2 run omg_llava_ros omg_llava_node`, `python -m omg_llava_ros.ros`.

Apart from `node.py` (the ROS-free node) and `rclpy_node.py` (its rclpy transport) so that neither
imports the other's caller: this module checks that rclpy and every message package import before
any model loads, and exits 2 with what to build or source when one does not.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the node on rclpy (``--ros-args`` as in ``ros2 run``); non-zero when it cannot run."""
    args = list(sys.argv if argv is None else argv)
    try:
        from omg_llava_ros.ros.rclpy_node import check_interfaces, run_rclpy

        check_interfaces()
    except ImportError as exc:  # rclpy itself, or a message package it needs
        print(f"omg_llava_node: {ros_setup_hint(exc)}", file=sys.stderr)
        return 2
    return run_rclpy(args)


def ros_setup_hint(exc: ImportError) -> str:
    """What to install or build when rclpy or a message package cannot be imported."""
    missing = getattr(exc, "name", None) or str(exc)
    return (
        f"cannot import {missing} ({exc}). The node needs rclpy and the message packages "
        "omg_llava_ros_interfaces and vision_msgs: with a system ROS, `source /opt/ros/<distro>/setup.bash`, "
        "build this repository's ros2/ packages with colcon and `source install/setup.bash`; without one, "
        "`bash ros2/setup_ros2.sh` (pip wheels + colcon) and `source build/ros2/install/setup.bash`. See the README."
    )
