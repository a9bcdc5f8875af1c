"""The package's own ROS 2 interfaces (msg/, action/) for rosbags, so bags can be read and written
without a ROS install (replay, tests).

Where the definition files are found, first hit wins:
1. ``$OMG_LLAVA_ROS_INTERFACES`` (a folder holding ``msg/`` and ``action/``), for unusual layouts;
2. the source tree: ``<repo root>/ros2/omg_llava_ros_interfaces/msg``. This is where they live
   in a checkout and in an editable (``pip install -e``) install; a plain wheel install does not
   ship them (they belong to the interfaces package) and relies on 3. or 1.;
3. the ament share directory ``share/omg_llava_ros_interfaces/msg`` that ``rosidl_generate_interfaces``
   installs them to on a colcon build: found through ``ament_index_python`` when importable,
   else through ``$AMENT_PREFIX_PATH`` and ``sys.prefix``.

vision_msgs is not part of rosbags' bundled stores, so :func:`register_types` also registers the
three vision_msgs types ``BoundingBox2D`` needs, with their Humble/Jazzy (vision_msgs 4.x) layout,
unless the store already has them.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

PACKAGE = "omg_llava_ros_interfaces"
# Dependency order matters only for readability; rosbags resolves references at registration.
MESSAGES: tuple[str, ...] = ("SegmentedObject", "GroundedSegmentation")
ACTIONS: tuple[str, ...] = ("Segment",)
ACTION_PARTS: tuple[str, ...] = ("Goal", "Result", "Feedback")
ENV_VAR = "OMG_LLAVA_ROS_INTERFACES"

# vision_msgs 4.x (ROS 2 Humble and Jazzy): BoundingBox2D.center is a vision_msgs/Pose2D whose
# position is a vision_msgs/Point2D (3.x used geometry_msgs/Pose2D; CDR layout is identical).
VISION_MSGS_DEFINITIONS: dict[str, str] = {
    "vision_msgs/msg/Point2D": "float64 x\nfloat64 y\n",
    "vision_msgs/msg/Pose2D": "vision_msgs/Point2D position\nfloat64 theta\n",
    "vision_msgs/msg/BoundingBox2D": ("vision_msgs/Pose2D center\nfloat64 size_x\nfloat64 size_y\n"),
}

# A separator line in .action/.srv files is exactly three dashes (surrounding blanks allowed).
_SEPARATOR = re.compile(r"^\s*---\s*$", re.MULTILINE)


def _candidate_roots() -> list[Path]:
    roots: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append(Path(env))
    roots.append(Path(__file__).resolve().parents[2] / "ros2" / PACKAGE)
    try:  # only present on a sourced ROS 2 system
        from ament_index_python.packages import get_package_share_directory

        roots.append(Path(get_package_share_directory(PACKAGE)))
    except Exception:  # not installed, or package unknown to the index: fall through
        pass
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            roots.append(Path(prefix) / "share" / PACKAGE)
    roots.append(Path(sys.prefix) / "share" / PACKAGE)
    return roots


def interface_dir(kind: str = "msg") -> Path:
    """The folder holding this package's ``*.msg`` (kind="msg") or ``*.action`` (kind="action")."""
    if kind not in ("msg", "action"):
        raise ValueError(f"kind must be 'msg' or 'action', got {kind!r}")
    tried: list[str] = []
    for root in _candidate_roots():
        folder = root / kind
        if any(folder.glob(f"*.{kind}")):
            return folder
        tried.append(str(folder))
    raise FileNotFoundError(
        f"no {PACKAGE} .{kind} files found; looked in: {', '.join(tried)} "
        f"(set ${ENV_VAR} to a folder containing {kind}/)"
    )


def split_action(text: str) -> tuple[str, str, str]:
    """Split an .action definition into its goal, result and feedback message texts."""
    parts = _SEPARATOR.split(text)
    if len(parts) != 3:
        raise ValueError(f"an action definition needs exactly two '---' lines, found {len(parts) - 1}")
    return parts[0], parts[1], parts[2]


def _parse(text: str, name: str) -> dict[str, Any]:
    from rosbags.typesys import get_types_from_msg

    return dict(get_types_from_msg(text, name))


def load_types(msg_dir: Path | str | None = None, action_dir: Path | str | None = None) -> dict[str, Any]:
    """Parse the package's messages and action parts into a rosbags ``Typesdict``.

    Messages are named ``omg_llava_ros_interfaces/msg/<Name>``, action parts
    ``omg_llava_ros_interfaces/action/<Action>_Goal`` / ``_Result`` / ``_Feedback`` (the names rosidl
    generates). Raises ``rosbags.typesys.TypesysError`` on a malformed definition.
    """
    msg_folder = Path(msg_dir) if msg_dir is not None else interface_dir("msg")
    types: dict[str, Any] = {}
    for path in sorted(msg_folder.glob("*.msg")):
        types.update(_parse(path.read_text(encoding="utf-8"), f"{PACKAGE}/msg/{path.stem}"))
    if action_dir is None:
        try:
            action_folder: Path | None = interface_dir("action")
        except FileNotFoundError:
            action_folder = None  # messages alone are still useful for reading ~/result
    else:
        action_folder = Path(action_dir)
    if action_folder is not None:
        for path in sorted(action_folder.glob("*.action")):
            texts = split_action(path.read_text(encoding="utf-8"))
            for part, text in zip(ACTION_PARTS, texts, strict=True):
                types.update(_parse(text, f"{PACKAGE}/action/{path.stem}_{part}"))
    return types


def vision_msgs_types() -> dict[str, Any]:
    """rosbags types for the vision_msgs messages our interfaces reference."""
    types: dict[str, Any] = {}
    for name, text in VISION_MSGS_DEFINITIONS.items():
        types.update(_parse(text, name))
    return types


def register_types(
    typestore: Any, msg_dir: Path | str | None = None, action_dir: Path | str | None = None
) -> list[str]:
    """Register this package's interfaces (and missing vision_msgs deps) in a rosbags typestore.

    Safe to call repeatedly. Returns the sorted names of the package's own types, e.g.
    ``omg_llava_ros_interfaces/msg/GroundedSegmentation`` and
    ``omg_llava_ros_interfaces/action/Segment_Goal``.
    """
    deps = {k: v for k, v in vision_msgs_types().items() if k not in typestore.fielddefs}
    own = load_types(msg_dir, action_dir)
    new = {**deps, **own}
    # rosbags registers dangling references silently and only fails at (de)serialisation time;
    # fail here instead, with the names, so a typo or an old store is obvious.
    missing = sorted(
        ref
        for _, fields in new.values()
        for _, field_type in fields
        if (ref := _referenced_name(field_type)) and ref not in new and ref not in typestore.fielddefs
    )
    if missing:
        from rosbags.typesys import TypesysError

        raise TypesysError(f"unresolved message types: {', '.join(dict.fromkeys(missing))}")
    typestore.register(new)
    return sorted(own)


def _referenced_name(field_type: Any) -> str | None:
    """The message type a rosbags field type refers to, unwrapping arrays and sequences."""
    _, detail = field_type
    if isinstance(detail, str):  # a plain message reference
        return detail
    inner = detail[0]
    if isinstance(inner, tuple):  # array/sequence: ((nodetype, element), size)
        return _referenced_name(inner)
    return None  # a base type such as ('uint64', 0)
