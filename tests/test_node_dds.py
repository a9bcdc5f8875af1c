"""The node end to end over Cyclone DDS on loopback (unicast peer 127.0.0.1, multicast off).

The node runs in a subprocess through its real entry point (``run_dds``: ROS-args parsing, the DDS
transport, the worker) with the tiny random model forced to answer with two [SEG]. This test is
the "ROS 2 side": it talks to the node with *stock* cyclonedds-python writers and readers (their own
CDR encoder/decoder, not the node's rosbags fast path) on ROS 2 names ``rt/...`` and types
``pkg::msg::dds_::T_``, as an rmw_cyclonedds node would.

Run ``python tests/test_node_dds.py --serve --ros-args ...`` to start the same node by hand.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NS = "/e2e"
H, W = 48, 64

CONFIG = """<?xml version="1.0" encoding="UTF-8" ?>
<CycloneDDS xmlns="https://cdds.io/config">
  <Domain id="any">
    <General>
      <Interfaces><NetworkInterface address="127.0.0.1"/></Interfaces>
      <AllowMulticast>false</AllowMulticast>
    </General>
    <Discovery>
      <ParticipantIndex>auto</ParticipantIndex>
      <MaxAutoParticipantIndex>32</MaxAutoParticipantIndex>
      <Peers><Peer address="127.0.0.1"/></Peers>
    </Discovery>
  </Domain>
</CycloneDDS>
"""


def serve(argv: list[str]) -> int:
    """Subprocess side: the node on DDS with the tiny model; prints model call counts on exit."""
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from test_pipeline import ANSWER, CountingModel, force_answer

    from omg_llava_ros import OmgLlava
    from omg_llava_ros.ros.node import run_dds

    tiny = OmgLlava.from_config("tiny", seed=0)
    model = CountingModel(tiny)
    code = run_dds(argv, model_loader=lambda params, log: model, logits_processor=force_answer(tiny.tokenizer, ANSWER))
    print(json.dumps({"chats": model.chats, "follows": model.follows}), flush=True)
    return code


# -- test side ------------------------------------------------------------------------------------
class RosPeer:
    """A stand-in ROS 2 node on stock cyclonedds-python entities."""

    def __init__(self, domain_id: int) -> None:
        from cyclonedds.domain import DomainParticipant
        from cyclonedds.qos import Policy, Qos

        from omg_llava_ros.ros.messages import make_typestore

        self.store = make_typestore()
        self.dp = DomainParticipant(domain_id)
        reliable = Policy.Reliability.Reliable(max_blocking_time=100_000_000)
        self.qos = Qos(reliable, Policy.History.KeepLast(50), Policy.DataRepresentation(use_cdrv0_representation=True))
        self.writers: dict[str, object] = {}
        self.readers: dict[str, object] = {}

    def _topic(self, name: str, msgtype: str):
        from cyclonedds.topic import Topic

        from omg_llava_ros.ros.dds_transport import idl_type

        return Topic(self.dp, "rt" + name, idl_type(self.store, msgtype))

    def writer(self, name: str, msgtype: str):
        from cyclonedds.pub import DataWriter

        self.writers[name] = DataWriter(self.dp, self._topic(name, msgtype), self.qos)
        return self.writers[name]

    def reader(self, name: str, msgtype: str):
        from cyclonedds.sub import DataReader

        self.readers[name] = DataReader(self.dp, self._topic(name, msgtype), self.qos)
        return self.readers[name]

    def idl(self, msgtype: str):
        from omg_llava_ros.ros.dds_transport import idl_type

        return idl_type(self.store, msgtype)


def _gather(reader, store: list) -> list:
    """Everything the reader has received so far, accumulated in `store`."""
    store.extend(reader.take(N=100))
    return store


def wait_for(predicate, timeout: float = 30.0, step: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.fixture
def dds_env(tmp_path, monkeypatch):
    pytest.importorskip("cyclonedds")
    config = tmp_path / "cyclonedds.xml"
    config.write_text(CONFIG)
    domain_id = random.randint(100, 200)  # away from a real robot's domain and from other runs
    monkeypatch.setenv("CYCLONEDDS_URI", config.as_uri())
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain_id))
    return domain_id


def test_node_end_to_end_over_dds(dds_env, tmp_path):
    domain_id = dds_env
    from omg_llava_ros.ros.image_conversion import mono16_fields
    from omg_llava_ros.ros.messages import (
        CAMERA_INFO,
        DETECTION2D_ARRAY,
        GROUNDED_SEGMENTATION,
        IMAGE,
        POSE_STAMPED,
        STRING,
    )

    log = (tmp_path / "node.log").open("w+")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(Path(__file__)), "--serve", "--ros-args", "-r", f"__ns:={NS}"]
    cmd += ["-p", "backend:=torch", "-p", "device:=cpu", "-p", "stats_period_s:=0.0"]
    node = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        peer = RosPeer(domain_id)
        base = f"{NS}/omg_llava"
        image_w = peer.writer(f"{base}/image", IMAGE)
        depth_w = peer.writer(f"{base}/depth", IMAGE)
        info_w = peer.writer(f"{base}/camera_info", CAMERA_INFO)
        command_w = peer.writer(f"{base}/command", STRING)
        result_r = peer.reader(f"{base}/result", GROUNDED_SEGMENTATION)
        masks_r = peer.reader(f"{base}/masks", IMAGE)
        dets_r = peer.reader(f"{base}/detections", DETECTION2D_ARRAY)
        pose_r = peer.reader(f"{base}/target_pose", POSE_STAMPED)
        # Discovery: the node is up once it has matched every endpoint we opened.
        endpoints = [image_w, depth_w, info_w, command_w]
        ok = wait_for(
            lambda: (
                all(w.get_matched_subscriptions() for w in endpoints)
                and all(r.get_matched_publications() for r in (result_r, masks_r, dets_r, pose_r))
            ),
            timeout=60,
        )
        assert ok, f"node did not come up on DDS: {_log_text(log)}"

        Image, Header, Time = peer.idl(IMAGE), peer.idl("std_msgs/msg/Header"), peer.idl("builtin_interfaces/msg/Time")
        String, CameraInfo = peer.idl(STRING), peer.idl(CAMERA_INFO)
        RegionOfInterest = peer.idl("sensor_msgs/msg/RegionOfInterest")
        rng = np.random.default_rng(0)

        def header(sec: int, nanosec: int = 0):
            return Header(stamp=Time(sec=sec, nanosec=nanosec), frame_id="camera_color_optical_frame")

        def send_frame(sec: int, nanosec: int = 0, data: bytes | None = None) -> None:
            depth = mono16_fields(np.full((H, W), 900, np.uint16))
            depth_w.write(
                Image(
                    header=header(sec, nanosec),
                    height=H,
                    width=W,
                    encoding="16UC1",
                    is_bigendian=0,
                    step=depth["step"],
                    data=depth["data"].tolist(),
                )
            )
            pixels = rng.integers(0, 256, H * W * 3, dtype=np.uint8).tobytes() if data is None else data
            image_w.write(
                Image(
                    header=header(sec, nanosec),
                    height=H,
                    width=W,
                    encoding="rgb8",
                    is_bigendian=0,
                    step=W * 3,
                    data=list(pixels),
                )
            )

        results: list = []

        def collect():
            results.extend(result_r.take(N=100))
            return results

        info_w.write(
            CameraInfo(
                header=header(0),
                height=H,
                width=W,
                distortion_model="plumb_bob",
                d=[],
                k=[40.0, 0.0, W / 2, 0.0, 40.0, H / 2, 0.0, 0.0, 1.0],
                r=[1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
                p=[40.0, 0.0, W / 2, 0.0, 0.0, 40.0, H / 2, 0.0, 0.0, 0.0, 1.0, 0.0],
                binning_x=0,
                binning_y=0,
                roi=RegionOfInterest(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False),
            )
        )
        command_w.write(String(data="pick up the red cup"))

        # Frames until the command is answered (the first frames may beat the command there).
        sec = 100
        while not any(not r.follow for r in collect()) and sec < 400:
            send_frame(sec)
            sec += 1
            wait_for(lambda: len(collect()) > 0, timeout=0.3)
        answered = [r for r in results if not r.follow]
        assert answered, f"command never answered: {_log_text(log)}"
        first = answered[0]
        assert first.command == "pick up the red cup" and first.text.startswith("<p> the red cup </p> [SEG]")
        assert [o.phrase for o in first.objects] == ["the red cup", "the plate"]
        assert first.header.frame_id == "camera_color_optical_frame"
        answered_stamp = first.header.stamp.sec

        # Follow mode: later frames come back with their own headers, same command, no new answer.
        for s in range(sec, sec + 3):
            send_frame(s, 5)
            assert wait_for(lambda s=s: any(r.header.stamp.sec == s for r in collect())), _log_text(log)
        followed = [r for r in results if r.header.stamp.sec > answered_stamp]
        assert [r.header.stamp.sec for r in followed[-3:]] == [sec, sec + 1, sec + 2]
        assert all(r.follow and r.command_id == first.command_id and r.text == first.text for r in followed)
        assert all(r.header.stamp.nanosec == 5 for r in followed[-3:])

        # Every output carries the header of its source image.
        masks = masks_r.take(N=100)
        assert {(x.header.stamp.sec, x.header.stamp.nanosec) for x in masks} >= {(sec + 2, 5)}
        assert masks[-1].encoding == "mono8" and (masks[-1].height, masks[-1].width) == (H, W)
        # Samples of different topics arrive independently: wait for the last frame's on each.
        dets: list = []
        assert wait_for(lambda: any(d.header.stamp.sec == sec + 2 for d in _gather(dets_r, dets)))
        det = next(d for d in dets if d.header.stamp.sec == sec + 2)
        assert [d.id for d in det.detections]
        poses: list = []
        assert wait_for(lambda: any(p.header.stamp.sec == sec + 2 for p in _gather(pose_r, poses)))
        pose = next(p for p in poses if p.header.stamp.sec == sec + 2)
        assert pose.pose.position.z == pytest.approx(0.9)

        # Bad input over the wire: short image data, an undecodable payload, non-UTF-8 command.
        # Each report is awaited before the next sample: images are a keep-last queue, and a bad
        # frame overwritten by the next one before the node read it is never reported (a CI flake).
        send_frame(sec + 3, data=b"\x00" * 10)
        assert wait_for(lambda: "data too short" in _log_text(log, tail=None), timeout=15), _log_text(log)
        from cyclonedds._clayer import ddspy_write

        # Cyclone itself drops CDR that does not fit the type; valid CDR with a non-UTF-8 string
        # reaches us and must be reported by the transport, not crash it.
        from omg_llava_ros.ros.messages import RosbagsMessages, header_fields

        fields = {"header": header_fields((sec + 4, 0), "cam"), "height": 1, "width": 1, "encoding": "rgbX"}
        raw = RosbagsMessages(peer.store).serialize(IMAGE, {**fields, "step": 3, "data": np.zeros(3, np.uint8)})
        assert ddspy_write(image_w._ref, raw.replace(b"rgbX\x00", b"rgb\xff\x00")) >= 0
        undecodable = "undecodable sensor_msgs/msg/Image"
        assert wait_for(lambda: undecodable in _log_text(log, tail=None), timeout=15), _log_text(log)
        bad_text = b"segment the \xff cup\x00"
        raw = b"\x00\x01\x00\x00" + len(bad_text).to_bytes(4, "little") + bad_text
        assert ddspy_write(command_w._ref, raw.ljust((len(raw) + 3) & ~3, b"\0")) >= 0
        target = sec + 10
        assert wait_for(lambda: _send_until_answered(send_frame, collect, target, "segment the \ufffd cup")), _log_text(
            log
        )
        # The whole log: the reports come before the frames sent while waiting, which log lines too.
        log_text = _log_text(log, tail=None)
        assert "data too short" in log_text and "undecodable sensor_msgs/msg/Image" in log_text
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            out, _ = node.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
            out, _ = node.communicate()
    assert node.returncode == 0, _log_text(log)
    counts = json.loads(out.strip().splitlines()[-1])
    assert counts["chats"] == ["pick up the red cup", "segment the \ufffd cup"]  # the LLM ran once per command
    assert counts["follows"] >= 3


def _send_until_answered(send_frame, collect, sec: int, command: str) -> bool:
    """Send a frame, look for an answer to `command`; called repeatedly by wait_for."""
    send_frame(sec + int(time.monotonic() * 10) % 100_000)
    time.sleep(0.05)
    return any(r.command == command and not r.follow for r in collect())


def _log_text(log, tail: int | None = 4000) -> str:
    """The node's log: its last `tail` characters (for failure messages), or all of it (None)."""
    log.flush()
    log.seek(0)
    text = log.read()
    return text if tail is None else text[-tail:]


if __name__ == "__main__":
    if "--serve" in sys.argv:
        sys.exit(serve(sys.argv))
    sys.exit(pytest.main([__file__, "-q"]))
