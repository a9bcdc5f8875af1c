"""Pipeline results -> ROS messages (CDR round trips with rosbags), parameters, names, DDS types."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from omg_llava_ros.pipeline.types import DetectedObject, Result, Target3D
from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.parameters import NodeParameters, QosSpec, load_parameter_file
from omg_llava_ros.ros.transport import resolve_name

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def msgs():
    return m.RosbagsMessages()


def make_result(n_objects: int = 2, with_target: bool = True) -> Result:
    h, w = 6, 8
    ids = np.zeros((h, w), np.uint16)
    objects = []
    for i in range(n_objects):
        mask = np.zeros((h, w), bool)
        if i < 2:
            mask[i : i + 2, 2 * i : 2 * i + 3] = True
            ids[mask & (ids == 0)] = i + 1
        box = (2 * i, i, 2 * i + 3, i + 2) if mask.any() else None
        target = None
        if with_target and i == 0:
            pts = np.array([[0.1, 0.2, 1.0], [0.3, 0.2, 1.2], [0.2, 0.4, 1.1]], np.float32)
            target = Target3D(pts, np.median(pts.astype(np.float64), axis=0))
        objects.append(
            DetectedObject(str(i + 1), f"thing {i}", 0.5 + i / 10, box, i + 1 if mask.any() else 0, mask, None, target)
        )
    image = np.zeros((h, w, 3), np.uint8)
    return Result(
        stamp=(1700000000, 123456789),
        frame_id="camera_color_optical_frame",
        command_id=7,
        command="pick up the red cup",
        text="<p> thing 0 </p> [SEG].",
        clean_text="thing 0.",
        follow=True,
        objects=objects,
        instance_ids=ids,
        latency_ms=42.5,
        image=image,
    )


def test_grounded_segmentation_cdr_round_trip(msgs):
    result = make_result()
    fields = m.grounded_segmentation_fields(result)
    raw = msgs.serialize(m.GROUNDED_SEGMENTATION, fields)
    back = msgs.deserialize(raw, m.GROUNDED_SEGMENTATION)
    assert (back.header.stamp.sec, back.header.stamp.nanosec) == result.stamp
    assert back.header.frame_id == result.frame_id
    assert back.command_id == 7 and back.command == result.command and back.follow is True
    assert back.text == result.text and back.clean_text == result.clean_text
    assert back.latency_ms == pytest.approx(42.5)
    first, second = back.objects
    assert (first.id, first.phrase, first.mask_index) == ("1", "thing 0", 1)
    assert first.score == pytest.approx(0.5)
    assert (first.box.center.position.x, first.box.center.position.y) == (1.5, 1.0)
    assert (first.box.size_x, first.box.size_y) == (3.0, 2.0)
    assert first.has_centroid and first.num_points == 3
    assert (first.centroid.x, first.centroid.y, first.centroid.z) == pytest.approx((0.2, 0.2, 1.1))
    assert not second.has_centroid and second.num_points == 0
    mask = back.instance_mask
    assert mask.header.stamp.sec == result.stamp[0] and mask.header.frame_id == result.frame_id
    assert (mask.encoding, mask.height, mask.width, mask.step) == ("mono8", 6, 8, 8)
    assert np.array_equal(np.asarray(mask.data).reshape(6, 8), result.instance_ids)


def test_result_message_matches_the_msg_definition(msgs):
    # Every field the .msg declares is produced (no silently defaulted field).
    produced = set(m.grounded_segmentation_fields(make_result()))
    declared = {name for name, _ in msgs.typestore.fielddefs[m.GROUNDED_SEGMENTATION][1]}
    assert produced == declared
    obj = set(m.grounded_segmentation_fields(make_result())["objects"][0])
    assert obj == {name for name, _ in msgs.typestore.fielddefs["omg_llava_ros_interfaces/msg/SegmentedObject"][1]}


def test_instance_mask_switches_to_mono16_above_255_objects():
    ids = np.arange(300, dtype=np.uint16).reshape(15, 20)
    header = m.header_fields((1, 2), "cam")
    fields = m.instance_mask_fields(ids, header)
    assert fields["encoding"] == "mono16" and fields["step"] == 40
    assert np.array_equal(fields["data"].view("<u2").reshape(15, 20), ids)
    assert m.instance_mask_fields(ids % 200, header)["encoding"] == "mono8"
    with pytest.raises(ValueError, match="mono16"):
        m.instance_mask_fields(ids, header, "mono8")


def test_detection_array_round_trip(msgs):
    result = make_result(n_objects=3)  # the third object has an empty mask: no detection
    raw = msgs.serialize(m.DETECTION2D_ARRAY, m.detection_array_fields(result))
    back = msgs.deserialize(raw, m.DETECTION2D_ARRAY)
    assert (back.header.stamp.sec, back.header.stamp.nanosec) == result.stamp
    assert [d.id for d in back.detections] == ["1", "2"]
    det = back.detections[1]
    assert det.header.frame_id == result.frame_id
    assert det.results[0].hypothesis.class_id == "thing 1"
    assert det.results[0].hypothesis.score == pytest.approx(0.6)
    assert (det.bbox.center.position.x, det.bbox.center.position.y, det.bbox.size_x, det.bbox.size_y) == (
        3.5,
        2.0,
        3.0,
        2.0,
    )


def test_pointcloud2_layout_and_round_trip(msgs):
    points = np.array([[1.0, -2.0, 3.5], [0.25, 0.5, 0.75]], np.float32)
    fields = m.pointcloud2_fields(points, m.header_fields((5, 6), "cam"), np.array([1, 2]))
    assert [(f["name"], f["offset"], f["datatype"], f["count"]) for f in fields["fields"]] == [
        ("x", 0, 7, 1),
        ("y", 4, 7, 1),
        ("z", 8, 7, 1),
        ("object", 12, 6, 1),
    ]
    assert fields["point_step"] == 16 and fields["row_step"] == 32
    assert (fields["height"], fields["width"], fields["is_bigendian"], fields["is_dense"]) == (1, 2, False, True)
    # Byte layout as sensor_msgs_py.create_cloud packs it: little-endian, fields at their offsets.
    assert fields["data"].tobytes() == struct.pack("<fffI", 1.0, -2.0, 3.5, 1) + struct.pack(
        "<fffI", 0.25, 0.5, 0.75, 2
    )
    back = msgs.deserialize(msgs.serialize(m.POINT_CLOUD2, fields), m.POINT_CLOUD2)
    cloud = m.read_pointcloud2(back)
    assert np.array_equal(np.stack([cloud["x"], cloud["y"], cloud["z"]], 1), points)
    assert cloud["object"].tolist() == [1, 2]


def test_target_cloud_and_pose_from_a_result(msgs):
    result = make_result()
    cloud = m.target_cloud_fields(result)
    assert cloud["width"] == 3 and cloud["header"]["frame_id"] == result.frame_id
    pose = msgs.deserialize(msgs.serialize(m.POSE_STAMPED, m.target_pose_fields(result)), m.POSE_STAMPED)
    assert (pose.header.stamp.sec, pose.header.stamp.nanosec) == result.stamp
    assert (pose.pose.position.x, pose.pose.position.y, pose.pose.position.z) == pytest.approx((0.2, 0.2, 1.1))
    assert pose.pose.orientation.w == 1.0
    capped = m.target_cloud_fields(result, max_points=2)
    assert capped["width"] == 2
    no_depth = make_result(with_target=False)
    assert m.target_cloud_fields(no_depth) is None and m.target_pose_fields(no_depth) is None


def test_overlay_is_rgb8_with_the_source_header(msgs):
    result = make_result()
    back = msgs.deserialize(msgs.serialize(m.IMAGE, m.overlay_fields(result)), m.IMAGE)
    assert (back.encoding, back.height, back.width, back.step) == ("rgb8", 6, 8, 24)
    assert back.header.frame_id == result.frame_id
    pixels = np.asarray(back.data).reshape(6, 8, 3)
    assert pixels[0, 0].tolist() == [115, 13, 38]  # object 1 tinted red over black
    assert pixels[5, 7].tolist() == [0, 0, 0]


def test_reading_inputs_from_rosbags_messages(msgs):
    info = msgs.build(m.CAMERA_INFO, {"width": 64, "height": 48, "k": [50.0, 0, 32, 0, 51.0, 24, 0, 0, 1]})
    k = m.intrinsics_from_camera_info(info)
    assert (k.fx, k.fy, k.cx, k.cy, k.width, k.height) == (50.0, 51.0, 32.0, 24.0, 64, 48)
    with pytest.raises(m.MessageError, match="fx"):
        m.intrinsics_from_camera_info(msgs.build(m.CAMERA_INFO, {}))  # an uncalibrated driver: K all zero
    img = msgs.build(m.IMAGE, {"header": m.header_fields((3, 4), "cam")})
    assert m.header_stamp(img) == (3, 4) and m.header_frame_id(img) == "cam"
    with pytest.raises(m.MessageError, match="header"):
        m.header_stamp(object())
    assert m.command_text(msgs.build(m.STRING, {"data": "hi"})) == "hi"
    with pytest.raises(m.MessageError):
        m.command_text(object())


def test_string_cdr_decoding_replaces_invalid_utf8(msgs):
    good = msgs.serialize(m.STRING, {"data": "pick up the cup"})
    assert m.decode_string_cdr(good).data == "pick up the cup"
    bad = good[:8] + b"\xff\xfe" + good[10:]
    assert m.decode_string_cdr(bad).data == "\ufffd\ufffdck up the cup"
    empty = msgs.serialize(m.STRING, {"data": ""})
    assert m.decode_string_cdr(empty).data == ""
    big_endian = b"\x00\x00\x00\x00" + struct.pack(">I", 3) + b"ok\x00"
    assert m.decode_string_cdr(big_endian).data == "ok"
    for broken, reason in [(good[:6], "too short"), (good[:8] + b"x", "exceeds"), (b"\x00\x07" + good[2:], "encaps")]:
        with pytest.raises(m.MessageError, match=reason):
            m.decode_string_cdr(broken)


def test_builder_rejects_unknown_fields(msgs):
    with pytest.raises(m.MessageError, match="no field"):
        msgs.build(m.IMAGE, {"pixels": 1})
    with pytest.raises(m.MessageError, match="unknown message type"):
        msgs.build("nope/msg/Nope", {})


# -- parameters and names -------------------------------------------------------------------------
def test_yaml_config_mirrors_the_parameter_declarations():
    values = load_parameter_file(ROOT / "ros2" / "omg_llava_ros" / "config" / "omg_llava.yaml")
    specs = {name: default for name, default, _ in NodeParameters.specs()}
    assert values == specs
    assert NodeParameters.from_mapping(values) == NodeParameters()


def test_parameters_default_qos_and_validation(tmp_path):
    p = NodeParameters()
    assert p.image_qos() == QosSpec("best_effort", 1, "volatile")
    assert p.result_qos() == QosSpec("reliable", 10, "volatile")
    assert p.image_qos().describe() == "best_effort, keep last 1, volatile"
    with pytest.raises(ValueError, match="backend"):
        NodeParameters(backend="cuda")
    with pytest.raises(ValueError, match="reliability"):
        NodeParameters(image_qos_reliability="sometimes")
    with pytest.raises(ValueError, match="unknown parameter"):
        NodeParameters.from_mapping({"modle_path": "x"})
    with pytest.raises(ValueError, match="must be a bool"):
        NodeParameters.from_mapping({"use_depth": "yes"})
    assert NodeParameters.from_mapping({"depth_max_offset_s": 1}).depth_max_offset_s == 1.0
    f = tmp_path / "p.yaml"
    f.write_text(
        "/**:\n  ros__parameters:\n    backend: torch\n    use_depth: false\n"
        "omg_llava:\n  ros__parameters:\n    backend: onnxruntime\n"
        "other_node:\n  ros__parameters:\n    backend: tensorrt\n"
    )
    assert load_parameter_file(f) == {"backend": "onnxruntime", "use_depth": False}


def test_topic_names_resolve_like_ros():
    assert resolve_name("~/image") == "/omg_llava/image"
    assert resolve_name("~/image", "/robot1") == "/robot1/omg_llava/image"
    assert resolve_name("image", "robot1/") == "/robot1/image"
    assert resolve_name("/abs/topic", "/robot1") == "/abs/topic"
    remaps = {"~/image": "/camera/color/image_raw", "command": "cmd"}
    assert resolve_name("~/image", "/r", remaps=remaps) == "/camera/color/image_raw"
    assert resolve_name("/r/command", "/r", remaps=remaps) == "/r/cmd"
