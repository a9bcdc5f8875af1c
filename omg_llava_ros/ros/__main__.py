"""`python -m omg_llava_ros.ros --ros-args ...`: the node on rclpy (`main.main`)."""

import sys

from omg_llava_ros.ros.main import main

sys.exit(main())
