"""The node shell on the in-process transport: lifecycle, topics, commands, action, bad input,
depth targets; and the launch file's structure."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import yaml
from helpers import ANSWER, CountingModel, force_answer

from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.image_conversion import mono16_fields, rgb_to_image_fields
from omg_llava_ros.ros.node import ConfigurationError, OmgLlavaNode, load_model
from omg_llava_ros.ros.parameters import NodeParameters, load_parameter_file
from omg_llava_ros.ros.transport import MemoryTransport, SegmentGoal

H, W = 48, 64
NS = "/robot1"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def msgs():
    return m.RosbagsMessages()


def topic(name: str) -> str:
    return f"{NS}/omg_llava/{name}"


def image_msg(msgs, sec: int, nanosec: int = 0, seed: int = 0, frame_id: str = "cam"):
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return msgs.build(m.IMAGE, {"header": m.header_fields((sec, nanosec), frame_id), **rgb_to_image_fields(rgb)})


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll until predicate() is true (the worker runs on its own thread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class Harness:
    def __init__(self, node: OmgLlavaNode, transport: MemoryTransport, model: CountingModel) -> None:
        self.node, self.transport, self.model = node, transport, model

    def out(self, name: str) -> list[dict]:
        return self.transport.published[topic(name)]

    def send_image(self, msg) -> None:
        """Deliver one image and wait until the worker has finished with it."""
        before = self.node.stats.frames_handled
        assert self.transport.deliver("~/image", msg) == 1
        assert wait_for(lambda: self.node.stats.frames_handled > before)

    def command(self, text) -> None:
        assert self.transport.deliver("~/command", SimpleNamespace(data=text)) == 1


def _counting_node(tiny_model, **params):
    """(transport, counting model, node) on the in-process transport, the model forced to ANSWER."""
    transport = MemoryTransport(namespace=NS)
    model = CountingModel(tiny_model)
    node = OmgLlavaNode(
        transport,
        NodeParameters(backend="torch", stats_period_s=0.0, **params),
        model_loader=lambda p, log: model,
        logits_processor=force_answer(tiny_model.tokenizer, ANSWER),
    )
    return transport, model, node


@pytest.fixture
def harness(tiny_model, msgs):
    transport, model, node = _counting_node(tiny_model, action_timeout_s=5.0, warm_up=False)
    node.configure()
    node.activate()
    yield Harness(node, transport, model)
    node.shutdown()


def test_lifecycle_creates_and_releases_io_and_logs_qos(tiny_model, caplog):
    transport = MemoryTransport(namespace=NS)
    node = OmgLlavaNode(transport, NodeParameters(backend="torch"), model_loader=lambda p, log: tiny_model)
    with caplog.at_level(logging.INFO, logger="omg_llava_ros"):
        node.configure()
        assert node.state == "inactive" and transport.publishers == {}
        node.activate()
    assert node.state == "active"
    assert set(transport.publishers) == {
        topic(n) for n in ("result", "masks", "detections", "overlay", "target_points", "target_pose")
    }
    subs = {name: s[0] for name, s in transport.subscriptions.items() if s}
    assert set(subs) == {topic(n) for n in ("image", "depth", "camera_info", "command")}
    assert subs[topic("image")].qos.reliability == "best_effort" and subs[topic("image")].qos.depth == 1
    assert transport.publishers[topic("result")].qos.reliability == "reliable"
    assert transport.publishers[topic("result")].qos.depth == 10
    text = caplog.text
    assert f"subscribed {topic('image')} [sensor_msgs/msg/Image] QoS best_effort, keep last 1, volatile" in text
    assert (
        f"publishing {topic('result')} [omg_llava_ros_interfaces/msg/GroundedSegmentation] QoS reliable, keep last 10"
        in text
    )
    assert f"serving action {topic('segment')}" in text
    node.deactivate()
    assert node.state == "inactive" and transport.publishers == {}
    assert not any(transport.subscriptions.values()) and transport.action_servers == {}
    assert transport.deliver("~/image", object()) == 0
    node.cleanup()
    assert node.state == "unconfigured" and node.model is None and node.pipeline is None


def test_warm_up_at_configure_leaves_no_command_and_ids_keep_counting_across_cleanup(tiny_model, msgs):
    transport, model, node = _counting_node(tiny_model)
    node.configure()
    assert len(model.chats) == 1 and model.follows == 1  # the warm-up, before any command
    assert node.pipeline.command is None and node.pipeline.stats.chat_calls == 0
    node.activate()
    transport.deliver("~/command", SimpleNamespace(data="pick up the red cup"))
    transport.deliver("~/command", SimpleNamespace(data="the plate"))
    assert node.pipeline.command.id == 2
    node.cleanup()
    node.configure()
    node.activate()
    transport.deliver("~/command", SimpleNamespace(data="the red cup again"))
    assert node.pipeline.command.id == 3  # GroundedSegmentation.command_id only ever increases
    node.shutdown()


def test_configure_failures_are_clear_and_leave_the_node_unconfigured():
    def missing(params, log):
        raise FileNotFoundError("/models/x is not an OMG-LLaVA model directory (no config.json)")

    node = OmgLlavaNode(MemoryTransport(), NodeParameters(), model_loader=missing)
    with pytest.raises(ConfigurationError, match="no config.json"):
        node.configure()
    assert node.state == "unconfigured"
    with pytest.raises(RuntimeError, match="activate needs state inactive"):
        node.activate()


def test_load_model_backend_choices(monkeypatch, caplog):
    import omg_llava_ros.engines.backend as engines  # the node selects through select_backend_or_torch there

    log = logging.getLogger("omg_llava_ros.test")
    with pytest.raises(ConfigurationError, match="not an OMG-LLaVA model directory"):
        load_model(NodeParameters(model_path="/nonexistent/model", device="cpu"), log)

    calls = []

    def unavailable(name, model, options):
        calls.append((name, options.build_if_missing))
        raise RuntimeError("no engine built for this model; run omg-llava-ros build-engines")

    monkeypatch.setattr(engines, "select_backend", unavailable)
    with pytest.raises(ConfigurationError, match="'tensorrt' unavailable: no engine built"):
        load_model(NodeParameters(model_path="config:tiny", backend="tensorrt", device="cpu"), log)
    with caplog.at_level(logging.WARNING):
        model = load_model(NodeParameters(model_path="config:tiny", backend="auto", device="cpu"), log)
    assert type(model.vision).__name__ == "TorchVision"
    assert "falling back to PyTorch vision" in caplog.text and "RANDOM weights" in caplog.text
    assert calls == [("tensorrt", False), ("auto", False)]  # never asked to build by default


def test_auto_backend_on_a_cpu_exports_the_onnx_graphs_once_with_a_log_line(tmp_path, caplog):
    # No GPU here: ONNX Runtime is the fast CPU path, so "auto" exports once (logged), never TensorRT.
    params = NodeParameters(model_path="config:tiny", backend="auto", device="cpu", engine_cache_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        model = load_model(params, logging.getLogger("omg_llava_ros.test"))
    assert type(model.vision).__name__ == "OnnxRuntimeVision"
    assert "exporting them once" in caplog.text
    assert any(tmp_path.rglob("*.onnx")) and not any(tmp_path.rglob("*.plan"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = load_model(params, logging.getLogger("omg_llava_ros.test"))
    assert type(again.vision).__name__ == "OnnxRuntimeVision" and "exporting" not in caplog.text  # reused


def test_auto_backend_told_not_to_export_falls_back_to_pytorch_loudly(tmp_path, caplog, monkeypatch):
    import functools

    from omg_llava_ros.engines import backend as engines_backend

    no_export = functools.partial(engines_backend.EngineOptions, export_on_cpu=False)
    monkeypatch.setattr(engines_backend, "EngineOptions", no_export)
    params = NodeParameters(model_path="config:tiny", backend="auto", device="cpu", engine_cache_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING):
        model = load_model(params, logging.getLogger("omg_llava_ros.test"))
    assert type(model.vision).__name__ == "TorchVision"
    assert "build-engines" in caplog.text
    assert not any(tmp_path.rglob("*.onnx")) and not any(tmp_path.rglob("*.plan"))


def test_command_then_frames_publish_results_with_the_source_header(harness, msgs):
    h = harness
    h.command("pick up the red cup")
    h.send_image(image_msg(msgs, 10, 1, frame_id="camera_color_optical_frame"))
    h.send_image(image_msg(msgs, 10, 2, seed=1, frame_id="camera_color_optical_frame"))
    results, masks, dets = h.out("result"), h.out("masks"), h.out("detections")
    assert len(results) == len(masks) == len(dets) == 2
    for out, nanosec in zip(results, (1, 2), strict=True):
        back = msgs.deserialize(msgs.serialize(m.GROUNDED_SEGMENTATION, out), m.GROUNDED_SEGMENTATION)
        assert (back.header.stamp.sec, back.header.stamp.nanosec) == (10, nanosec)
        assert back.header.frame_id == "camera_color_optical_frame"
        assert back.command == "pick up the red cup" and back.command_id == 1 and back.text == ANSWER
        assert [o.phrase for o in back.objects] == ["the red cup", "the plate"]
    assert [r["follow"] for r in results] == [False, True]
    assert masks[1]["header"] == results[1]["header"] == dets[1]["header"]
    assert masks[0]["encoding"] == "mono8" and (masks[0]["height"], masks[0]["width"]) == (H, W)
    assert len(h.model.chats) == 1 and h.model.follows == 1
    assert h.out("overlay")  # the memory publisher reports a subscriber
    assert h.out("target_points") == [] and h.out("target_pose") == []  # no depth


def test_frame_received_before_the_command_does_not_answer_it(harness, msgs):
    h = harness
    h.send_image(image_msg(msgs, 20))  # no command yet: nothing published
    assert h.out("result") == []
    h.command("pick up the red cup")
    h.send_image(image_msg(msgs, 19))  # older than the newest frame seen at command time
    h.send_image(image_msg(msgs, 20))  # that very frame again: it predates the command
    assert h.out("result") == [] and h.model.chats == []
    h.send_image(image_msg(msgs, 20, 1))
    assert h.out("result")[0]["header"]["stamp"] == {"sec": 20, "nanosec": 1}


def test_new_command_and_stop_through_the_topic(harness, msgs):
    h = harness
    h.command("pick up the red cup")
    h.send_image(image_msg(msgs, 1))
    h.command("now the plate")
    h.send_image(image_msg(msgs, 2))
    assert [r["command_id"] for r in h.out("result")] == [1, 2]
    assert [r["follow"] for r in h.out("result")] == [False, False]
    h.command("")
    h.send_image(image_msg(msgs, 3))
    assert len(h.out("result")) == 2 and h.model.follows == 0


def test_commands_of_0_and_100k_characters_and_non_utf8(harness, msgs):
    h = harness
    h.command("")
    h.send_image(image_msg(msgs, 1))
    assert h.out("result") == []
    h.command("x" * 100_000)
    h.send_image(image_msg(msgs, 2))
    res = h.out("result")[-1]
    assert len(res["command"]) == 2000 and len(h.model.chats[-1]) == 2000
    h.command(b"pick up the \xff cup")  # a transport handing raw bytes
    h.send_image(image_msg(msgs, 3))
    assert h.out("result")[-1]["command"] == "pick up the \ufffd cup"


def _bad_image(msgs, **override):
    good = image_msg(msgs, 5)
    fields = {
        "header": m.header_fields((5, 0), "cam"),
        "height": good.height,
        "width": good.width,
        "encoding": good.encoding,
        "is_bigendian": 0,
        "step": good.step,
        "data": good.data,
    }
    fields.update(override)
    return msgs.build(m.IMAGE, fields)


@pytest.mark.parametrize(
    "make_bad, reason",
    [
        (lambda msgs: _bad_image(msgs, data=np.zeros(10, np.uint8)), "data too short"),
        (lambda msgs: _bad_image(msgs, height=0, width=0, step=0), "empty image"),
        (lambda msgs: _bad_image(msgs, encoding="bayer_rggb8"), "unknown encoding"),
        (lambda msgs: _bad_image(msgs, step=10), "step 10 is smaller"),
        (lambda msgs: SimpleNamespace(data=b"", encoding="rgb8"), "no header stamp"),
    ],
    ids=["short-data", "zero-size", "unknown-encoding", "bad-step", "no-header"],
)
def test_malformed_images_are_logged_skipped_and_never_answer_the_command(harness, msgs, make_bad, reason, caplog):
    h = harness
    h.command("pick up the red cup")
    with caplog.at_level(logging.WARNING):
        h.transport.deliver("~/image", make_bad(msgs))
        assert wait_for(lambda: any(reason in e.reason for e in h.node.errors))
    assert reason in caplog.text
    assert h.out("result") == [] and h.model.chats == [] and h.node.pipeline.pending
    h.send_image(image_msg(msgs, 6))
    (res,) = h.out("result")
    assert res["command_id"] == 1 and res["header"]["stamp"] == {"sec": 6, "nanosec": 0}


def test_compressed_images_and_undecodable_ones(tiny_model, msgs):
    transport = MemoryTransport(namespace=NS)
    model = CountingModel(tiny_model)
    node = OmgLlavaNode(
        transport,
        NodeParameters(input_compressed=True, use_depth=False, stats_period_s=0.0, warm_up=False),
        model_loader=lambda p, log: model,
        logits_processor=force_answer(tiny_model.tokenizer, ANSWER),
    )
    node.configure()
    node.activate()
    try:
        assert transport.subscriptions[topic("image/compressed")]
        assert topic("target_points") not in transport.publishers
        transport.deliver("~/command", SimpleNamespace(data="pick up the red cup"))
        header = m.header_fields((7, 0), "cam")
        bad = msgs.build(
            m.COMPRESSED_IMAGE, {"header": header, "format": "jpeg", "data": np.arange(50, dtype=np.uint8)}
        )
        transport.deliver("~/image/compressed", bad)
        assert wait_for(lambda: any("could not decode" in e.reason for e in node.errors))
        rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
        png = np.frombuffer(cv2.imencode(".png", rgb[..., ::-1])[1].tobytes(), np.uint8)
        good = msgs.build(m.COMPRESSED_IMAGE, {"header": m.header_fields((8, 0), "cam"), "format": "png", "data": png})
        transport.deliver("~/image/compressed", good)
        assert wait_for(lambda: len(transport.published[topic("result")]) == 1)
        assert transport.published[topic("result")][0]["header"]["stamp"]["sec"] == 8
    finally:
        node.shutdown()


def test_malformed_side_inputs_are_reported_and_the_node_keeps_going(harness, msgs):
    h = harness
    h.transport.deliver("~/camera_info", msgs.build(m.CAMERA_INFO, {}))  # K all zeros
    h.transport.deliver("~/depth", SimpleNamespace())  # no header
    h.transport.deliver("~/command", SimpleNamespace(data=None))
    reasons = " | ".join(e.reason for e in h.node.errors)
    assert "unusable camera_info" in reasons and "no header stamp" in reasons and "no string data" in reasons
    depth = msgs.build(m.IMAGE, {"header": m.header_fields((9, 0), "cam"), "encoding": "32FC1", "height": 2})
    h.transport.deliver("~/depth", depth)  # stamp fine, pixels broken: reported when used
    h.command("pick up the red cup")
    h.send_image(image_msg(msgs, 9))
    assert h.out("result") and h.out("target_points") == []


def _depth_and_info(msgs, sec: int, depth_mm: np.ndarray, width: int = W, height: int = H):
    k = [40.0, 0.0, W / 2, 0.0, 40.0, H / 2, 0.0, 0.0, 1.0]
    info = msgs.build(
        m.CAMERA_INFO, {"header": m.header_fields((sec, 0), "cam"), "width": width, "height": height, "k": k}
    )
    depth = msgs.build(m.IMAGE, {"header": m.header_fields((sec, 0), "cam"), **mono16_fields(depth_mm)})
    depth.encoding = "16UC1"
    return info, depth


def test_depth_gives_target_points_and_pose_in_the_camera_frame(harness, msgs):
    h = harness
    info, depth = _depth_and_info(msgs, 30, np.full((H, W), 750, np.uint16))
    h.transport.deliver("~/camera_info", info)
    h.transport.deliver("~/depth", depth)
    h.command("pick up the red cup")
    h.send_image(image_msg(msgs, 30))
    (cloud,) = h.out("target_points")
    (pose,) = h.out("target_pose")
    assert cloud["header"] == pose["header"] == h.out("result")[0]["header"]
    points = m.read_pointcloud2(msgs.deserialize(msgs.serialize(m.POINT_CLOUD2, cloud), m.POINT_CLOUD2))
    assert np.allclose(points["z"], 0.75)
    assert set(points["object"].tolist()) <= {1, 2}
    assert pose["pose"]["position"]["z"] == pytest.approx(0.75)
    first = h.out("result")[0]["objects"][0]
    assert first["has_centroid"] and first["num_points"] > 0


def test_mismatched_depth_is_reported_and_results_still_flow(harness, msgs, caplog):
    h = harness
    info, depth = _depth_and_info(msgs, 40, np.full((H // 2, W // 2), 750, np.uint16))
    h.transport.deliver("~/camera_info", info)
    h.transport.deliver("~/depth", depth)
    h.command("pick up the red cup")
    with caplog.at_level(logging.WARNING):
        h.send_image(image_msg(msgs, 40))
    assert h.out("result") and h.out("target_points") == []
    # Reported on the input it is about, by its resolved name.
    assert f"{topic('depth')}: depth {W // 2}x{H // 2} does not match the image" in caplog.text


def test_incompatible_qos_is_logged_as_an_error(harness, caplog):
    sub = harness.transport.subscriptions[topic("image")][0]
    with caplog.at_level(logging.ERROR):
        sub.on_incompatible_qos("a publisher offers an incompatible RELIABILITY")
    assert "QoS mismatch, no messages will arrive" in caplog.text and topic("image") in caplog.text


def test_action_with_a_goal_image(harness, msgs):
    h = harness
    feedback: list[tuple[str, float]] = []
    goal = SegmentGoal("pick up the red cup", image_msg(msgs, 3, 0, frame_id="goal_cam"), use_image=True)
    outcome = h.transport.send_goal("~/segment", goal, feedback)
    assert outcome.success, outcome.message
    result = msgs.deserialize(msgs.serialize(m.GROUNDED_SEGMENTATION, outcome.result), m.GROUNDED_SEGMENTATION)
    assert result.header.frame_id == "goal_cam" and result.command == "pick up the red cup"
    assert [o.phrase for o in result.objects] == ["the red cup", "the plate"]
    assert [s for s, _ in feedback] == ["decoding_image", "generating", "done"]
    assert h.out("result")[0]["header"]["frame_id"] == "goal_cam"
    h.send_image(image_msg(msgs, 4))  # the goal's command stays in force: camera frames follow
    assert h.out("result")[-1]["follow"] and len(h.model.chats) == 1


def test_action_without_image_waits_for_the_next_frame(harness, msgs):
    h = harness
    outcomes = []
    goal = SegmentGoal("pick up the red cup")
    caller = threading.Thread(target=lambda: outcomes.append(h.transport.send_goal("~/segment", goal)))
    caller.start()
    assert wait_for(lambda: h.node.pipeline.command is not None)
    h.send_image(image_msg(msgs, 50))
    caller.join(10)
    (outcome,) = outcomes
    assert outcome.success and outcome.result["header"]["stamp"] == {"sec": 50, "nanosec": 0}
    assert outcome.result["command_id"] == h.out("result")[0]["command_id"]


def test_action_failures_are_clear(tiny_model, msgs):
    transport = MemoryTransport(namespace=NS)
    node = OmgLlavaNode(
        transport,
        NodeParameters(action_timeout_s=0.2, stats_period_s=0.0, warm_up=False),
        model_loader=lambda p, log: CountingModel(tiny_model),
    )
    node.configure()
    assert not transport.action_servers  # inactive: nothing served yet
    node.activate()
    try:
        empty = transport.send_goal("~/segment", SegmentGoal("  "))
        assert not empty.success and "empty command" in empty.message
        bad = SegmentGoal("x", _bad_image(msgs, encoding="nope"), use_image=True)
        out = transport.send_goal("~/segment", bad)
        assert not out.success and "goal image unusable" in out.message
        waited = transport.send_goal("~/segment", SegmentGoal("pick up the red cup"))
        assert not waited.success and "no image newer than the command" in waited.message
        assert "QoS" in waited.message
    finally:
        node.shutdown()


def test_a_new_command_fails_the_waiting_goal(harness):
    h = harness
    outcomes = []
    caller = threading.Thread(target=lambda: outcomes.append(h.transport.send_goal("~/segment", SegmentGoal("first"))))
    caller.start()
    assert wait_for(lambda: h.node.pipeline.command is not None)
    h.command("second")
    caller.join(10)
    assert not outcomes[0].success and "superseded by command 2" in outcomes[0].message


def test_chat_failure_is_reported_and_the_next_command_works(harness, msgs):
    h = harness
    h.model.fail_chat = True
    h.command("pick up the red cup")
    h.send_image(image_msg(msgs, 1))
    assert any("failed and was dropped" in e.reason for e in h.node.errors)
    h.model.fail_chat = False
    h.send_image(image_msg(msgs, 2))
    assert h.out("result") == []  # the failed command is not retried on its own
    h.command("pick up the red cup")
    h.send_image(image_msg(msgs, 3))
    assert h.out("result")[0]["command_id"] == 2


def test_worker_keeps_only_the_newest_frame(harness, msgs):
    h = harness
    h.node._running.clear()  # park the worker so frames pile up in the slot
    assert wait_for(lambda: not h.node._worker.is_alive())
    for i in range(5):
        h.transport.deliver("~/image", image_msg(msgs, 60, i))
    assert h.node.slot.stats.skipped == 4
    assert h.node.slot.take(timeout=0).stamp == (60, 4)


# -- launch file ------------------------------------------------------------------------------------
def test_launch_file_renders_to_the_installed_executable_with_params_and_remaps(tmp_path, monkeypatch):
    from launch_command import LAUNCH_FILE, launch_command, load_launch_description

    prefix = tmp_path / "install"
    (prefix / "lib" / "omg_llava_ros").mkdir(parents=True)
    exe = prefix / "lib" / "omg_llava_ros" / "omg_llava_node"
    exe.write_text((LAUNCH_FILE.parents[1] / "scripts" / "omg_llava_node").read_text())
    monkeypatch.setenv("AMENT_PREFIX_PATH", str(prefix))
    declared, _ = load_launch_description()
    assert declared["backend"]["default_value"] == "auto" and declared["build_engines"]["default_value"] == "false"
    params_file = Path(declared["params_file"]["default_value"])
    assert params_file == LAUNCH_FILE.parents[1] / "config" / "omg_llava.yaml" and params_file.is_file()

    command = launch_command(
        {"namespace": "robot1", "image_topic": "/cam/color", "backend": "torch", "use_depth": "false"}, tmp_path
    )
    assert command[:6] == [str(exe), "--ros-args", "-r", "__node:=omg_llava", "-r", "__ns:=/robot1"]
    files = [command[i + 1] for i, flag in enumerate(command) if flag == "--params-file"]
    assert files[0] == str(params_file)
    overrides = yaml.safe_load(Path(files[1]).read_text())["/**"]["ros__parameters"]
    assert overrides == {
        "model_path": "",
        "backend": "torch",
        "triton_url": "127.0.0.1:8000",
        "build_engines": False,
        "input_compressed": False,
        "use_depth": False,
    }
    NodeParameters.from_mapping(load_parameter_file(files[0]) | overrides)  # every value is valid
    remaps = [command[i + 1] for i, flag in enumerate(command) if flag == "-r"][2:]
    assert "~/image:=/cam/color" in remaps and "~/image/compressed:=/cam/color/compressed" in remaps
    assert {r.split(":=")[0] for r in remaps} == {
        "~/image",
        "~/image/compressed",
        "~/depth",
        "~/camera_info",
        "~/command",
    }
    with pytest.raises(ValueError, match="not launch arguments"):
        launch_command({"bakend": "torch"}, tmp_path)
