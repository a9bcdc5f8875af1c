"""The node on real ROS 2: rclpy from the Jazzy (or Kilted) wheels, FastDDS, a second rclpy node.

The node runs as users run it: the colcon-installed ``omg_llava_node`` with the command line the
launch file renders to (tests/launch_command.py), the embedded model, remapped topics and a
namespace. The peer (omg_llava_ros.ros.peer) is an ordinary rclpy node in this process.

Needs the workspace that ``bash ros2/setup_ros2.sh`` builds, sourced (``.ci/run`` does both).
Without it these tests skip, except under CI, where a missing ROS set-up is a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


def _ros_missing() -> str | None:
    try:
        from omg_llava_ros.ros.rclpy_node import check_interfaces

        check_interfaces()
    except ImportError as exc:
        return f"ROS 2 not set up ({exc}): bash ros2/setup_ros2.sh && . build/ros2/install/setup.bash"
    return None


_MISSING = _ros_missing()
if _MISSING and os.environ.get("CI"):
    raise RuntimeError(f"CI needs the real-rclpy tests: {_MISSING}")
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

# Loopback only, FastDDS, a domain of this run's own (parallel runs on one machine stay apart).
os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(100 + os.getpid() % 100))

NS = "/robot1"
NODE = f"{NS}/omg_llava"
INPUTS = {"image": "/cam/color", "depth": "/cam/depth", "camera_info": "/cam/info", "command": f"{NODE}/command"}
LAUNCH_ARGS = {
    "namespace": NS.strip("/"),
    "image_topic": INPUTS["image"],
    "depth_topic": INPUTS["depth"],
    "camera_info_topic": INPUTS["camera_info"],
    "backend": "torch",
}
W = H = 256
FX = FY = 200.0
START_TIMEOUT = 180.0


class NodeProcess:
    """The node in a subprocess, its output in a file."""

    def __init__(self, tmp: Path, launch_args: dict[str, str], extra: list[str] = (), env: dict | None = None) -> None:
        from launch_command import launch_command

        self.command = launch_command(launch_args, tmp) + list(extra)
        self.log_path = tmp / "node.log"
        self._log = self.log_path.open("w")
        env = dict(os.environ if env is None else env)
        # The executable starts with `#!/usr/bin/env python3`: as for a user with the venv active,
        # that must be the interpreter that has omg_llava_ros (this one).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            if self.proc.poll() is not None:
                return text in self.log()
            time.sleep(0.1)
        return False

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            self._log.close()


def _scene(seed: int):
    from omg_llava_ros.toyworld import referable_objects, render, sample_scene, shortest_expression

    rendered = render(sample_scene(np.random.default_rng(seed)))
    target = referable_objects(rendered)[0]
    return rendered, rendered.objects[target].mask, shortest_expression(rendered, target)


def _iou(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    return int(np.logical_and(a, b).sum()), int(np.logical_or(a, b).sum())


def _stamp(msg) -> tuple[int, int]:
    return msg.header.stamp.sec, msg.header.stamp.nanosec


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """The node (integers given for two float parameters, as `-p` users type them) and a peer."""
    from omg_llava_ros.ros.peer import NodePeer

    tmp = tmp_path_factory.mktemp("node")
    node = NodeProcess(tmp, LAUNCH_ARGS, ["-p", "stats_period_s:=0", "-p", "overlay_alpha:=1"])
    peer = NodePeer(NODE, INPUTS)
    try:
        assert node.wait_log("serving action", START_TIMEOUT), node.log()
        assert peer.wait_for_subscribers("image") and peer.wait_for_subscribers("command")
        yield node, peer
    finally:
        peer.close()
        if node.proc.poll() is None:
            node.stop()


def _send_frame(peer, rendered, stamp, encoding="rgb8", padding=0, depth=True, frame_id="camera_color_optical_frame"):
    from omg_llava_ros.ros.peer import camera_info_message, depth_message, image_message

    if depth:
        peer.publish("camera_info", camera_info_message(W, H, FX, FY, W / 2, H / 2, stamp, frame_id))
        depth_m = np.full((H, W), 1.25)
        peer.publish("depth", depth_message(depth_m, stamp, frame_id, "16UC1" if stamp[0] % 2 else "32FC1"))
        time.sleep(0.05)  # depth first: the node pairs each frame with the closest depth by stamp
    peer.publish("image", image_message(rendered.image, stamp, frame_id, encoding, padding))


def test_command_answers_then_follows_with_every_output_on_the_frame_header(running):
    from omg_llava_ros.ros.image_conversion import instance_ids_from_image
    from omg_llava_ros.toyworld import sample_moving_scene

    node, peer = running
    moving = sample_moving_scene(np.random.default_rng(7), num_frames=5)
    target = moving.target
    expression = moving.command.question
    peer.command(expression)
    assert node.wait_log("(topic)", 10), node.log()
    encodings = [("rgb8", 0), ("bgr8", 5), ("rgba8", 0), ("bgra8", 12), ("rgb8", 3)]
    inter = union = 0
    for i, (frame, (encoding, padding)) in enumerate(zip(moving.frames, encodings, strict=True)):
        stamp = (1000 + i, 500 + i)
        _send_frame(peer, frame, stamp, encoding, padding)
        result = peer.with_stamp("result", stamp)
        assert result is not None, f"no result for frame {i} ({encoding}):\n{node.log()[-3000:]}"
        msg = result.msg
        assert msg.header.frame_id == "camera_color_optical_frame" and msg.follow == (i > 0)
        assert msg.command == expression and msg.objects, msg.text
        masks = peer.with_stamp("masks", stamp, 5)
        detections = peer.with_stamp("detections", stamp, 5)
        overlay = peer.with_stamp("overlay", stamp, 5)
        pose = peer.with_stamp("target_pose", stamp, 5)
        cloud = peer.with_stamp("target_points", stamp, 5)
        for out in (masks, detections, overlay, pose, cloud):
            assert out is not None and out.msg.header.frame_id == "camera_color_optical_frame"
        ids = instance_ids_from_image(masks.msg)
        assert ids.shape == (H, W)
        predicted = ids == msg.objects[0].mask_index
        i_, u_ = _iou(predicted, frame.objects[target].mask)
        inter, union = inter + i_, union + u_
        assert [d.id for d in detections.msg.detections] == [o.id for o in msg.objects]
        assert overlay.msg.encoding == "rgb8" and (overlay.msg.height, overlay.msg.width) == (H, W)
        # Depth is a plane at 1.25 m: the target pose lies on it, at the mask's median pixel (the
        # centroid is a per-axis median).
        position = pose.msg.pose.position
        ys, xs = np.nonzero(predicted)
        assert position.z == pytest.approx(1.25, abs=0.01)
        assert position.x == pytest.approx((np.median(xs) - W / 2) * 1.25 / FX, abs=0.02)
        assert position.y == pytest.approx((np.median(ys) - H / 2) * 1.25 / FY, abs=0.02)
        assert 0 < cloud.msg.width <= int((ids > 0).sum()) and cloud.msg.point_step >= 12
        assert msg.objects[0].has_centroid and msg.objects[0].centroid.z == pytest.approx(1.25, abs=0.01)
    assert inter / union > 0.7, f"cIoU {inter / union:.2f} against the ground truth for {expression!r}"


def test_action_succeeds_with_feedback_aborts_on_a_bad_image_and_cancels(running):
    from action_msgs.msg import GoalStatus

    from omg_llava_ros.ros.peer import image_message
    from omg_llava_ros.ros.rclpy_node import SEGMENT, message_class

    node, peer = running
    client = peer.action_client()
    assert client.wait_for_server(timeout_sec=30)
    segment = message_class(SEGMENT)

    def run(goal, cancel_after: float | None = None):
        feedback = []
        future = client.send_goal_async(goal, feedback_callback=lambda f: feedback.append(f.feedback.stage))
        deadline = time.monotonic() + 60
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        handle = future.result()
        assert handle.accepted
        if cancel_after is not None:
            time.sleep(cancel_after)
            handle.cancel_goal_async()
        result_future = handle.get_result_async()
        while not result_future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        outcome = result_future.result()
        return outcome.status, outcome.result, feedback

    rendered, gt, expression = _scene(11)
    goal = segment.Goal()
    goal.command = f"Please segment {expression}."
    goal.image = image_message(rendered.image, (2000, 0), "goal_cam", "bgr8", 4)
    goal.use_image = True
    status, result, feedback = run(goal)
    assert status == GoalStatus.STATUS_SUCCEEDED and result.success, result.message
    assert feedback[0] == "decoding_image" and feedback[-1] == "done"
    assert result.result.header.frame_id == "goal_cam" and result.result.objects
    from omg_llava_ros.ros.image_conversion import instance_ids_from_image

    predicted = instance_ids_from_image(result.result.instance_mask) == result.result.objects[0].mask_index
    i_, u_ = _iou(predicted, gt)
    assert i_ / u_ > 0.5

    bad = segment.Goal()
    bad.command, bad.use_image = "Please segment the red circle.", True
    bad.image = image_message(rendered.image, (2001, 0), "goal_cam")
    bad.image.encoding = "no_such_encoding"
    status, result, _ = run(bad)
    assert status == GoalStatus.STATUS_ABORTED and not result.success
    assert "goal image unusable" in result.message and "no_such_encoding" in result.message

    waiting = segment.Goal()
    waiting.command, waiting.use_image = "Please segment the blue square.", False  # no frame comes
    status, result, feedback = run(waiting, cancel_after=0.5)
    assert status == GoalStatus.STATUS_CANCELED and "canceled" in result.message
    assert feedback == ["waiting_for_image"]
    client.destroy()


def test_a_goal_waiting_for_a_frame_gets_it_from_the_camera_topic(running):
    """The action server spins apart from the image subscription (its own node and executor): while
    a goal's execute callback waits, the next ~/image still arrives and answers it."""
    from action_msgs.msg import GoalStatus

    from omg_llava_ros.ros.rclpy_node import SEGMENT, message_class

    node, peer = running
    client = peer.action_client()
    assert client.wait_for_server(timeout_sec=30)
    rendered, gt, expression = _scene(12)
    goal = message_class(SEGMENT).Goal()
    goal.command, goal.use_image = f"Please segment {expression}.", False
    future = client.send_goal_async(goal)
    deadline = time.monotonic() + 60
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    handle = future.result()
    assert handle.accepted
    time.sleep(0.3)  # the goal is now waiting in its execute callback
    _send_frame(peer, rendered, (3000, 7), depth=False)
    result_future = handle.get_result_async()
    while not result_future.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    outcome = result_future.result()
    assert outcome.status == GoalStatus.STATUS_SUCCEEDED, (outcome.result.message, node.log()[-3000:])
    assert _stamp(outcome.result.result) == (3000, 7) and outcome.result.result.objects
    client.destroy()


def test_malformed_inputs_are_logged_by_resolved_topic_and_the_node_keeps_answering(running):
    from omg_llava_ros.ros.peer import image_message

    node, peer = running
    rendered, _, expression = _scene(12)
    short = image_message(rendered.image, (3000, 0), "cam")
    short.data = bytes(short.data)[:-100]
    unknown = image_message(rendered.image, (3001, 0), "cam")
    unknown.encoding = "weird8"
    zero = image_message(rendered.image, (3002, 0), "cam")
    zero.height = 0
    for msg in (short, unknown, zero):
        peer.publish("image", msg)
        time.sleep(0.3)  # keep-last-1 image QoS: one at a time
    from omg_llava_ros.ros.peer import camera_info_message

    info = camera_info_message(W, H, 0.0, 0.0, 0.0, 0.0, (3003, 0), "cam")  # K all zero
    peer.publish("camera_info", info)
    assert node.wait_log("/cam/color: malformed image skipped", 10), node.log()[-3000:]
    assert "weird8" in node.log()
    peer.command(f"Please segment {expression}.")
    time.sleep(0.3)
    _send_frame(peer, rendered, (3010, 0), depth=False)
    result = peer.with_stamp("result", (3010, 0))
    assert result is not None and result.msg.objects, node.log()[-3000:]
    log = node.log()
    assert "/cam/info: unusable camera_info" in log
    # Input problems name the input they concern, resolved: no "~/" anywhere in the log.
    assert "~/" not in log.replace("-r ~/", "")
    assert node.proc.poll() is None


def test_qos_mismatch_is_reported_on_the_resolved_topic(running):
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from omg_llava_ros.ros.rclpy_node import message_class

    node, peer = running
    # The node's commands are reliable; a best-effort publisher can never reach them.
    publisher = peer.node.create_publisher(
        message_class("std_msgs/msg/String"),
        INPUTS["command"],
        QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT),
    )
    try:
        assert node.wait_log(f"{INPUTS['command']}: QoS mismatch, no messages will arrive", 15), node.log()[-2000:]
    finally:
        peer.node.destroy_publisher(publisher)


def test_parameters_from_file_launch_and_overrides_and_routed_package_logging(running):
    node, peer = running
    values = peer.parameters(["stats_period_s", "overlay_alpha", "backend", "image_qos_reliability"])
    assert values == {
        "stats_period_s": 0,
        "overlay_alpha": 1,
        "backend": "torch",
        "image_qos_reliability": "best_effort",
    }
    log = node.log()
    assert "stats_period_s=0.0" in log and "overlay_alpha=1.0" in log  # the ints, taken as floats
    peer.command("")  # stops follow mode; the pipeline logs that through stdlib logging
    assert node.wait_log("follow mode stopped", 10)
    lines = [line for line in node.log().splitlines() if "follow mode stopped" in line]
    assert len(lines) == 1 and lines[0].startswith("[INFO]") and "[robot1.omg_llava]" in lines[0]


def test_lifecycle_services_drive_the_node_and_command_ids_keep_increasing(tmp_path):
    from omg_llava_ros.ros.peer import NodePeer

    launch_args = LAUNCH_ARGS | {"namespace": "lc", "image_topic": "/lc/color"}
    node = NodeProcess(tmp_path, launch_args, ["-p", "autostart:=false", "-p", "warm_up:=false"])
    inputs = INPUTS | {"image": "/lc/color", "command": "/lc/omg_llava/command"}
    peer = NodePeer("/lc/omg_llava", inputs)
    try:
        assert peer.lifecycle_state(START_TIMEOUT) == "unconfigured"
        assert peer.change_state("configure") and peer.lifecycle_state() == "inactive"
        assert peer.change_state("activate") and peer.lifecycle_state() == "active"
        assert peer.wait_for_subscribers("image") and peer.wait_for_subscribers("command")
        rendered, _, expression = _scene(13)
        ids = []
        for round_, stamp in enumerate(((4000, 0), (4001, 0))):
            peer.command(f"Please segment {expression}.")
            time.sleep(0.3)
            _send_frame(peer, rendered, stamp, depth=False)
            result = peer.with_stamp("result", stamp)
            assert result is not None, node.log()[-3000:]
            ids.append(result.msg.command_id)
            if round_ == 0:
                assert peer.change_state("deactivate") and peer.lifecycle_state() == "inactive"
                assert peer.change_state("cleanup") and peer.lifecycle_state() == "unconfigured"
                assert peer.change_state("configure") and peer.change_state("activate")
                assert peer.wait_for_subscribers("image") and peer.wait_for_subscribers("command")
        assert ids[1] > ids[0]
    finally:
        peer.close()
        assert node.stop() == 0


@pytest.mark.parametrize(
    ("extra", "file_value", "reason"),
    [
        (["-p", "backend:=onnxruntime", "-p", "engine_cache_dir:={tmp}"], None, "build_engines:=true"),
        (["-p", "mask_encoding:=bogus"], None, "parameter mask_encoding must be one of"),
        # A real type mistake, in the parameter file (rcl drops a `-p` value whose type differs
        # from a parameter file's value for the same name, so it would never reach the node).
        ([], "publish_overlay: maybe", "parameter publish_overlay must be a bool, got 'maybe'"),
    ],
)
def test_a_failed_autostart_logs_why_and_exits_1(tmp_path, extra, file_value, reason):
    from launch_command import load_launch_description

    launch_args = dict(LAUNCH_ARGS)
    if file_value is not None:
        declared, _ = load_launch_description()
        config = Path(declared["params_file"]["default_value"]).read_text()
        name = file_value.split(":")[0]
        lines = [f"    {file_value}" if line.strip().startswith(f"{name}:") else line for line in config.splitlines()]
        (tmp_path / "params.yaml").write_text("\n".join(lines) + "\n")
        launch_args["params_file"] = str(tmp_path / "params.yaml")
    node = NodeProcess(tmp_path, launch_args, [e.format(tmp=tmp_path) for e in extra])
    try:
        code = node.proc.wait(START_TIMEOUT)
    finally:
        node.stop(signal.SIGKILL)
    log = node.log()
    assert code == 1, log
    assert reason in log and "autostart: configure failed; exiting" in log
    assert "build_if_missing" not in log


def test_missing_interfaces_say_what_to_build_and_exit_2(tmp_path):
    # The workspace not sourced: the interfaces cannot be imported. Fails before any model loads.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if "install" not in p)
    started = time.monotonic()
    node = NodeProcess(tmp_path, LAUNCH_ARGS, env=env)
    try:
        code = node.proc.wait(60)
    finally:
        node.stop(signal.SIGKILL)
    log = node.log()
    assert code == 2, log
    assert "omg_llava_ros_interfaces" in log and "ros2/setup_ros2.sh" in log
    assert "model ready" not in log and time.monotonic() - started < 60


def test_sigint_stops_the_node_with_status_0(running):
    node, _ = running
    # Longer than the node's own shutdown limit, so a stuck shutdown shows its threads' stacks.
    code = node.stop(signal.SIGINT, timeout=60.0)
    assert code == 0, node.log()[-6000:]
    assert "Traceback" not in node.log()


# The node's rclpy shell with its last shutdown step stuck and a 2 s limit (autostart off: no model).
_STUCK_SHUTDOWN = """
import sys, time
import rclpy
from omg_llava_ros.ros import rclpy_node
rclpy_node.SHUTDOWN_LIMIT_S = 2.0
rclpy.try_shutdown = lambda: time.sleep(600)
print("spinning", flush=True)
sys.exit(rclpy_node.run_rclpy(["node", "--ros-args", "-p", "autostart:=false"]))
"""


def test_a_stuck_shutdown_prints_every_thread_and_exits_1_within_its_limit(tmp_path):
    log_path = tmp_path / "stuck.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-c", _STUCK_SHUTDOWN], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while "spinning" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # into executor.spin()
            proc.send_signal(signal.SIGINT)
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log_path.read_text()
    assert code == 1, text
    assert "most recent call first" in text and "run_rclpy" in text, text


def test_node_bench_reports_end_to_end_and_in_process_latency(capsys):
    from omg_llava_ros.cli import main

    argv = ["bench", "--ros2", "--threads", "1", "--repeats", "2", "--follow-frames", "1", "--real-time-frames", "20"]
    argv.append("--json")
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    for run in ("node_warm", "node_cold"):
        assert report[run]["first_command_ms"] > 0
        assert report[run]["command_ms"]["n"] == 1 and report[run]["follow_ms"]["n"] == 2
        # End to end includes the node's own receipt -> publish time.
        assert report[run]["follow_ms"]["p50"] >= report[run]["node_follow_ms"]["p50"]
    assert report["in_process"]["follow_ms"]["n"] == 2
    assert "first command after activation, warm-up at configure" in out
    # In real time every published frame is either answered or counted as dropped.
    real_time = report["node_warm"]["real_time"]
    assert real_time["published"] == 20 and real_time["answered"] >= 1
    assert real_time["answered"] + real_time["dropped"] == 20
    assert f"{real_time['dropped']} dropped" in out and "real_time" not in report["node_cold"]


def test_the_peers_action_client_handles_no_response_while_a_request_is_being_sent():
    """rclpy 7.1 can take a goal's response before it has recorded the goal (ros2/rclpy#1123): the
    peer's client makes a response wait for the request in flight."""
    import asyncio
    import threading

    from omg_llava_ros.ros.peer import NodePeer

    peer = NodePeer("/nobody/omg_llava", {k: f"/nobody{v}" for k, v in INPUTS.items()})
    try:
        client = peer.action_client()
        order: list[str] = []
        sending, release = threading.Event(), threading.Event()

        def send_in_flight() -> None:
            with client.requests_lock:
                sending.set()
                release.wait(10)
                order.append("request recorded")

        sender = threading.Thread(target=send_in_flight)
        sender.start()
        assert sending.wait(10)
        handler = threading.Thread(target=lambda: (asyncio.run(client.execute({})), order.append("response handled")))
        handler.start()
        handler.join(0.5)
        assert order == [] and handler.is_alive()  # the response waits for the request
        release.set()
        sender.join(10)
        handler.join(10)
        assert order == ["request recorded", "response handled"]
    finally:
        peer.close()
