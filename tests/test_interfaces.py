"""msg/ and action/ definitions: grammar, registration in rosbags typestores, CDR round trips."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rosbags.typesys import Stores, TypesysError, get_types_from_msg, get_typestore

from omg_llava_ros.ros.image_conversion import instance_ids_from_image, mono8_fields
from omg_llava_ros.ros.interfaces import (
    ACTION_PARTS,
    ENV_VAR,
    MESSAGES,
    PACKAGE,
    interface_dir,
    load_types,
    register_types,
    split_action,
    vision_msgs_types,
)

REPO = Path(__file__).resolve().parents[1]
INTERFACES = REPO / "ros2" / "omg_llava_ros_interfaces"
MSG_DIR = INTERFACES / "msg"
ACTION_DIR = INTERFACES / "action"
STORES = [Stores.ROS2_HUMBLE, Stores.ROS2_JAZZY]

# --------------------------------------------------------------------------- rosidl-style lint
# rosbags' parser is more lenient than rosidl (it accepts upper-case field names, for example), so
# these tests also apply the rosidl rules that matter for our files.
PRIMITIVES = {
    "bool",
    "byte",
    "char",
    "float32",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "string",
    "wstring",
}
ALLOWED_PACKAGES = {
    PACKAGE,
    "std_msgs",
    "sensor_msgs",
    "geometry_msgs",
    "vision_msgs",
    "builtin_interfaces",
}
FIELD_NAME = re.compile(r"^[a-z](?:_?[a-z0-9]+)*$")  # lower snake, no "__", no trailing "_"
TYPE_NAME = re.compile(r"^[A-Z][A-Za-z0-9]*$")
FIELD_LINE = re.compile(r"^(?P<type>\S+?)(?P<array>\[\d*\])?\s+(?P<name>\S+)\s*$")


def rosidl_lint(text: str) -> list[str]:
    """Problems rosidl (Humble/Jazzy) would reject or that break our cross-distro rule."""
    problems: list[str] = []
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" in line:
            problems.append(f"line {number}: constants/defaults are not used in this package")
            continue
        match = FIELD_LINE.match(line)
        if not match:
            problems.append(f"line {number}: not '<type> <name>': {raw!r}")
            continue
        typ, name = match["type"], match["name"]
        if not FIELD_NAME.match(name):
            problems.append(f"line {number}: field name {name!r} is not lower_snake_case")
        if name in names:
            problems.append(f"line {number}: duplicate field {name!r}")
        names.add(name)
        if typ in PRIMITIVES:
            continue
        package, _, type_name = typ.rpartition("/")
        if package and package not in ALLOWED_PACKAGES:
            problems.append(f"line {number}: package {package!r} is not an allowed dependency")
        if not TYPE_NAME.match(type_name):
            problems.append(f"line {number}: type {typ!r} is neither primitive nor a message")
        elif not package and type_name not in MESSAGES:
            problems.append(f"line {number}: unknown local type {typ!r}")
    if not names:
        problems.append("no fields")
    return problems


def definitions() -> list[tuple[str, str]]:
    """(name, text) of every message and action part in the repo."""
    out = [(p.stem, p.read_text()) for p in sorted(MSG_DIR.glob("*.msg"))]
    for path in sorted(ACTION_DIR.glob("*.action")):
        for part, text in zip(ACTION_PARTS, split_action(path.read_text()), strict=True):
            out.append((f"{path.stem}_{part}", text))
    return out


def unresolved(typestore: Any, typename: str, seen: set[str] | None = None) -> list[str]:
    """Referenced type names (recursively) that the typestore does not know."""
    seen = set() if seen is None else seen
    if typename in seen:
        return []
    seen.add(typename)
    if typename not in typestore.fielddefs:
        return [typename]
    missing: list[str] = []
    for _, (_kind, detail) in typestore.fielddefs[typename][1]:
        ref = detail if isinstance(detail, str) else detail[0]
        if isinstance(ref, tuple):  # arrays/sequences: (element, size)
            ref = ref[1] if isinstance(ref[1], str) else ref[0]
        if isinstance(ref, str) and "/" in ref:
            missing += unresolved(typestore, ref, seen)
    return missing


# --------------------------------------------------------------------------- files and grammar


def test_expected_files_exist() -> None:
    assert sorted(p.stem for p in MSG_DIR.glob("*.msg")) == sorted(MESSAGES)
    assert [p.stem for p in ACTION_DIR.glob("*.action")] == ["Segment"]


@pytest.mark.parametrize(("name", "text"), definitions(), ids=lambda v: v if len(v) < 40 else "")
def test_definitions_follow_rosidl_rules(name: str, text: str) -> None:
    assert rosidl_lint(text) == []
    assert "#" in text, f"{name} should document its fields"


@pytest.mark.parametrize(
    "bad",
    [
        "int32 Count\n",  # upper case field
        "int32 count_\n",  # trailing underscore
        "string a__b\n",  # double underscore
        "my_pkg/Thing thing\n",  # package we do not depend on
        "Unknown thing\n",  # local type that does not exist
        "float32\n",  # no name
        "uint8 a\nuint8 a\n",  # duplicate
        "# only a comment\n",
    ],
)
def test_lint_rejects_bad_definitions(bad: str) -> None:
    assert rosidl_lint(bad), bad


def test_each_msg_parses_with_rosbags() -> None:
    for path in sorted(MSG_DIR.glob("*.msg")):
        types = get_types_from_msg(path.read_text(), f"{PACKAGE}/msg/{path.stem}")
        assert list(types) == [f"{PACKAGE}/msg/{path.stem}"]


def test_action_splits_into_three_parsable_parts() -> None:
    goal, result, feedback = split_action((ACTION_DIR / "Segment.action").read_text())
    expected = {
        "Goal": (goal, ["command", "image", "use_image"]),
        "Result": (result, ["result", "success", "message"]),
        "Feedback": (feedback, ["stage", "progress"]),
    }
    for part, (text, fields) in expected.items():
        name = f"{PACKAGE}/action/Segment_{part}"
        parsed = get_types_from_msg(text, name)
        assert [f[0] for f in parsed[name][1]] == fields


def test_split_action_needs_two_separators() -> None:
    with pytest.raises(ValueError, match="exactly two"):
        split_action("string a\n---\nstring b\n")
    with pytest.raises(ValueError, match="exactly two"):
        split_action("string a\n---\nstring b\n---\nstring c\n---\nstring d\n")
    # "----" or "--- x" are not separators.
    with pytest.raises(ValueError):
        split_action("string a\n----\nstring b\n--- x\n")


@pytest.mark.parametrize(
    "bad",
    [
        "float32\n",  # type without a name
        "string na-me\n",  # illegal character in the name
        "uint8[ data\n",  # broken array bracket
        "9abc x\n",  # type starting with a digit
    ],
)
def test_rosbags_parser_rejects_malformed_definitions(bad: str) -> None:
    # The same parser that accepts our files must reject these, or the positive test proves nothing.
    with pytest.raises(TypesysError):
        get_types_from_msg(bad, f"{PACKAGE}/msg/Broken")


def test_load_types_fails_on_a_malformed_file(tmp_path: Path) -> None:
    (tmp_path / "msg").mkdir()
    shutil.copy(MSG_DIR / "SegmentedObject.msg", tmp_path / "msg")
    (tmp_path / "msg" / "Broken.msg").write_text("uint8[ data\n")
    with pytest.raises(TypesysError):
        load_types(tmp_path / "msg", ACTION_DIR)


# --------------------------------------------------------------------------- registration


@pytest.fixture(params=STORES, ids=lambda s: s.value)
def typestore(request: pytest.FixtureRequest) -> Any:
    store = get_typestore(request.param)
    register_types(store)
    return store


def test_register_names_and_idempotence() -> None:
    store = get_typestore(Stores.ROS2_HUMBLE)
    names = register_types(store)
    assert names == sorted(
        [f"{PACKAGE}/msg/{m}" for m in MESSAGES] + [f"{PACKAGE}/action/Segment_{p}" for p in ACTION_PARTS]
    )
    assert register_types(store) == names  # second call is a no-op, not an error


def test_unresolved_reference_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "Thing.msg").write_text("Missing part\nstd_msgs/Nope[] more\nuint8 ok\n")
    store = get_typestore(Stores.ROS2_HUMBLE)
    with pytest.raises(TypesysError, match="omg_llava_ros_interfaces/msg/Missing, std_msgs/msg/Nope"):
        register_types(store, msg_dir=tmp_path, action_dir=tmp_path)
    assert f"{PACKAGE}/msg/Thing" not in store.types
    # The independent recursive check used below sees the same problem once registered anyway.
    store.register(load_types(tmp_path, tmp_path))
    assert unresolved(store, f"{PACKAGE}/msg/Thing") == [f"{PACKAGE}/msg/Missing", "std_msgs/msg/Nope"]


def test_existing_vision_msgs_are_kept() -> None:
    store = get_typestore(Stores.ROS2_HUMBLE)
    store.register(vision_msgs_types())
    register_types(store)
    assert "vision_msgs/msg/BoundingBox2D" in store.types


def test_all_references_resolve(typestore: Any) -> None:
    for name in [f"{PACKAGE}/msg/{m}" for m in MESSAGES] + [f"{PACKAGE}/action/Segment_{p}" for p in ACTION_PARTS]:
        assert unresolved(typestore, name) == []


def test_field_layout_is_the_documented_contract(typestore: Any) -> None:
    def fields(name: str) -> list[str]:
        return [f[0] for f in typestore.fielddefs[f"{PACKAGE}/msg/{name}"][1]]

    assert fields("SegmentedObject") == [
        "id",
        "phrase",
        "score",
        "box",
        "mask_index",
        "has_centroid",
        "centroid",
        "num_points",
    ]
    assert fields("GroundedSegmentation") == [
        "header",
        "command_id",
        "command",
        "text",
        "clean_text",
        "follow",
        "objects",
        "instance_mask",
        "latency_ms",
    ]


def build_result(store: Any) -> Any:
    t = store.types
    header = t["std_msgs/msg/Header"](
        stamp=t["builtin_interfaces/msg/Time"](sec=1700000000, nanosec=123456789),
        frame_id="camera_color_optical_frame",
    )
    ids = np.zeros((6, 8), np.uint8)
    ids[1:3, 1:4] = 1
    ids[4:6, 5:8] = 2

    def box(cx: float, cy: float, sx: float, sy: float) -> Any:
        return t["vision_msgs/msg/BoundingBox2D"](
            center=t["vision_msgs/msg/Pose2D"](position=t["vision_msgs/msg/Point2D"](x=cx, y=cy), theta=0.0),
            size_x=sx,
            size_y=sy,
        )

    Obj = t[f"{PACKAGE}/msg/SegmentedObject"]
    Point = t["geometry_msgs/msg/Point"]
    objects = [
        Obj(
            id="0",
            phrase="the red circle",
            score=0.875,
            box=box(2.0, 1.5, 3.0, 2.0),
            mask_index=1,
            has_centroid=True,
            centroid=Point(x=0.1, y=-0.2, z=0.75),
            num_points=6,
        ),
        Obj(
            id="1",
            phrase="the blue cube",
            score=0.5,
            box=box(6.0, 4.5, 3.0, 2.0),
            mask_index=2,
            has_centroid=False,
            centroid=Point(x=0.0, y=0.0, z=0.0),
            num_points=0,
        ),
    ]
    mask = t["sensor_msgs/msg/Image"](header=header, **mono8_fields(ids))
    result = t[f"{PACKAGE}/msg/GroundedSegmentation"](
        header=header,
        command_id=2**40 + 3,
        command="Please segment the red circle and the blue cube.",
        text="<p> the red circle </p> [SEG] and <p> the blue cube </p> [SEG].",
        clean_text="the red circle and the blue cube.",
        follow=False,
        objects=objects,
        instance_mask=mask,
        latency_ms=42.5,
    )
    return result, ids


def test_grounded_segmentation_cdr_roundtrip(typestore: Any) -> None:
    name = f"{PACKAGE}/msg/GroundedSegmentation"
    result, ids = build_result(typestore)
    back = typestore.deserialize_cdr(bytes(typestore.serialize_cdr(result, name)), name)

    assert back.header.stamp.sec == 1700000000 and back.header.stamp.nanosec == 123456789
    assert back.header.frame_id == "camera_color_optical_frame"
    assert back.command_id == 2**40 + 3
    assert back.command == result.command
    assert back.text == result.text and back.clean_text == result.clean_text
    assert back.follow is False
    assert back.latency_ms == pytest.approx(42.5)
    assert [o.id for o in back.objects] == ["0", "1"]
    assert [o.phrase for o in back.objects] == ["the red circle", "the blue cube"]
    assert back.objects[0].score == pytest.approx(0.875)
    assert back.objects[0].box.center.position.x == 2.0
    assert back.objects[1].box.size_y == 2.0
    assert [o.mask_index for o in back.objects] == [1, 2]
    assert back.objects[0].has_centroid and not back.objects[1].has_centroid
    assert back.objects[0].centroid.z == pytest.approx(0.75)
    assert back.objects[0].num_points == 6
    decoded = instance_ids_from_image(back.instance_mask)
    np.testing.assert_array_equal(decoded, ids)
    for obj in back.objects:  # each object's pixels are where its mask_index is
        assert (decoded == obj.mask_index).sum() == 6


def test_action_parts_cdr_roundtrip(typestore: Any) -> None:
    t = typestore.types
    result, _ = build_result(typestore)
    empty = t["sensor_msgs/msg/Image"](
        header=t["std_msgs/msg/Header"](stamp=t["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id=""),
        height=0,
        width=0,
        encoding="",
        is_bigendian=0,
        step=0,
        data=np.zeros(0, np.uint8),
    )
    messages = {
        "Goal": t[f"{PACKAGE}/action/Segment_Goal"](command="segment the mug", image=empty, use_image=False),
        "Result": t[f"{PACKAGE}/action/Segment_Result"](result=result, success=True, message=""),
        "Feedback": t[f"{PACKAGE}/action/Segment_Feedback"](stage="generating", progress=0.5),
    }
    for part, msg in messages.items():
        name = f"{PACKAGE}/action/Segment_{part}"
        back = typestore.deserialize_cdr(bytes(typestore.serialize_cdr(msg, name)), name)
        if part == "Goal":
            assert back.command == "segment the mug" and back.use_image is False
            assert back.image.width == 0 and len(back.image.data) == 0
        elif part == "Result":
            assert back.success and back.result.objects[1].phrase == "the blue cube"
        else:
            assert back.stage == "generating" and back.progress == pytest.approx(0.5)


def test_result_can_be_written_to_and_read_from_a_bag(tmp_path: Path) -> None:
    from rosbags.rosbag2 import Reader, StoragePlugin, Writer

    store = get_typestore(Stores.ROS2_HUMBLE)
    register_types(store)
    name = f"{PACKAGE}/msg/GroundedSegmentation"
    result, ids = build_result(store)
    bag = tmp_path / "out"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection("/omg_llava/result", name, typestore=store)
        writer.write(conn, 1, bytes(store.serialize_cdr(result, name)))
    with Reader(bag) as reader:
        (conn,) = reader.connections
        assert conn.msgtype == name
        assert "SegmentedObject" in conn.msgdef.data  # the definition travels with the bag
        (_, _, raw) = next(iter(reader.messages()))
    back = store.deserialize_cdr(raw, name)
    np.testing.assert_array_equal(instance_ids_from_image(back.instance_mask), ids)


# --------------------------------------------------------------------------- locating files


def test_interface_dir_finds_the_repo_folders() -> None:
    assert interface_dir("msg") == MSG_DIR
    assert interface_dir("action") == ACTION_DIR
    with pytest.raises(ValueError):
        interface_dir("srv")


def test_env_var_overrides_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(MSG_DIR, tmp_path / "msg")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert interface_dir("msg") == tmp_path / "msg"
    # No action/ there: falls through to the next candidate (the repo).
    assert interface_dir("action") == ACTION_DIR


def test_messages_only_registration(tmp_path: Path) -> None:
    empty_actions = tmp_path / "no_actions"
    empty_actions.mkdir()
    store = get_typestore(Stores.ROS2_JAZZY)
    names = register_types(store, msg_dir=MSG_DIR, action_dir=empty_actions)
    assert names == sorted(f"{PACKAGE}/msg/{m}" for m in MESSAGES)


def test_ament_prefix_is_a_fallback_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from omg_llava_ros.ros import interfaces

    share = tmp_path / "share" / PACKAGE
    shutil.copytree(MSG_DIR, share / "msg")
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(tmp_path))
    roots = interfaces._candidate_roots()
    assert roots.index(INTERFACES) < roots.index(share)  # the checkout wins, the install is next
    assert (share / "msg" / "GroundedSegmentation.msg").exists()
