"""The demo bag: deterministic, small, shipped in data/demo_bag, and replayable end to end."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from omg_llava_ros.cli import main
from omg_llava_ros.pipeline.types import stamp_to_ns
from omg_llava_ros.replay import BagSource, DemoBagConfig, build_script, write_demo_bag
from omg_llava_ros.replay import cli as replay_cli
from omg_llava_ros.replay.demo_bag import (
    CAMERA_INFO_TOPIC,
    COMMAND_LEAD_NS,
    COMMAND_TOPIC,
    GT_TOPIC,
    IMAGE_TOPIC,
    bag_size,
)
from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.image_conversion import image_to_rgb, mask_from_mono8

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data" / "demo_bag"
SMALL = DemoBagConfig(seed=3, scenes=4, frames_per_scene=4, size=64)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_demo_bag_is_deterministic(tmp_path: Path) -> None:
    # Same folder name in two places: rosbags names the storage file after the folder.
    a = _files(write_demo_bag(tmp_path / "a" / "demo", SMALL))
    b = _files(write_demo_bag(tmp_path / "b" / "demo", SMALL))
    assert a == b
    other = DemoBagConfig(seed=4, scenes=4, frames_per_scene=4, size=64)
    assert _files(write_demo_bag(tmp_path / "c" / "demo", other)) != a
    with pytest.raises(FileExistsError):
        write_demo_bag(tmp_path / "a" / "demo", SMALL)


def test_demo_bag_contents(tmp_path: Path) -> None:
    bag = write_demo_bag(tmp_path / "demo", SMALL)
    script = build_script(SMALL)
    with BagSource(bag) as source:
        counts = {name: info.count for name, info in source.topics.items()}
        assert counts == {
            IMAGE_TOPIC: 16,
            CAMERA_INFO_TOPIC: 16,
            COMMAND_TOPIC: len(script.commands),
            GT_TOPIC: sum(f.gt_mask is not None for f in script.frames),
        }
        assert source.custom["omg_llava_ros.image_topic"] == IMAGE_TOPIC
        assert source.custom["omg_llava_ros.ground_truth_topic"] == GT_TOPIC
        images, masks, commands = {}, {}, []
        for bm in source.messages([IMAGE_TOPIC, GT_TOPIC, COMMAND_TOPIC, CAMERA_INFO_TOPIC]):
            msg = source.deserialize(bm)
            if bm.topic == COMMAND_TOPIC:
                commands.append((bm.log_time_ns, msg.data))
                continue
            stamp = stamp_to_ns(m.header_stamp(msg))
            assert stamp == bm.log_time_ns  # header stamp = recorded time
            if bm.topic == IMAGE_TOPIC:
                images[stamp] = image_to_rgb(msg)
            elif bm.topic == GT_TOPIC:
                masks[stamp] = mask_from_mono8(msg)
            else:
                k = m.intrinsics_from_camera_info(msg)
                assert (k.width, k.height, k.cx) == (64, 64, 31.5)
    frames = {f.stamp_ns: f for f in script.frames}
    assert set(masks) <= set(images) == set(frames)
    for stamp, frame in frames.items():
        np.testing.assert_array_equal(images[stamp], frame.image)
        if frame.gt_mask is None:
            assert stamp not in masks
        else:
            np.testing.assert_array_equal(masks[stamp], frame.gt_mask)
    # A referring command opens every scene, 1 ms before its first frame; later events per scene:
    # another object, a question, nothing, a stop.
    starts = [f.stamp_ns - COMMAND_LEAD_NS for i, f in enumerate(script.frames) if i % 4 == 0]
    assert [t for t, _ in commands if t in starts] == starts
    texts = [text for _, text in commands]
    assert texts[-1] == "" and "How many objects are there?" in texts
    assert all(t.endswith((".", "?")) for t in texts[:-1])


def test_shipped_demo_bag_is_the_generators_output(tmp_path: Path) -> None:
    assert (SHIPPED / "metadata.yaml").is_file(), "run: omg-llava-ros make-demo-bag data/demo_bag"
    assert bag_size(SHIPPED) <= 10_000_000
    config = DemoBagConfig()
    script = build_script(config)
    with BagSource(SHIPPED) as source:
        assert source.storage == "mcap"
        assert source.topics[IMAGE_TOPIC].count == len(script.frames) == config.scenes * config.frames_per_scene
        assert source.topics[COMMAND_TOPIC].count == len(script.commands)
    # Compared message by message (serialised bytes, recorded times, definitions), not file bytes:
    # another zstd build may compress the same chunks differently.
    fresh = write_demo_bag(tmp_path / SHIPPED.name, config)
    assert _stream(fresh) == _stream(SHIPPED), (
        "data/demo_bag is stale: omg-llava-ros make-demo-bag data/demo_bag --force"
    )


def _stream(bag: Path) -> tuple[Any, ...]:
    with BagSource(bag) as source:
        topics = list(source.topics)
        definitions = sorted((c.topic, c.msgtype, c.msgdef.data) for c in source._connections)
        digest = hashlib.sha256()
        for bm in source.messages(topics):
            digest.update(f"{bm.topic} {bm.msgtype} {bm.log_time_ns} {len(bm.raw)}".encode())
            digest.update(bytes(bm.raw))
        return tuple(definitions), dict(source.custom), digest.hexdigest()


class OracleModel:
    """Answers with the demo bag's ground truth: what a perfect model would output."""

    def __init__(self, config: DemoBagConfig) -> None:
        self.masks = {
            hashlib.sha256(f.image.tobytes()).hexdigest(): f.gt_mask
            for f in build_script(config).frames
            if f.gt_mask is not None
        }

    def _segments(self, image: np.ndarray) -> list[Any]:
        mask = self.masks.get(hashlib.sha256(image.tobytes()).hexdigest())
        return [] if mask is None else [SimpleNamespace(phrase="it", mask=mask, score=1.0)]

    def chat(self, image: np.ndarray, text: str, **kwargs: Any) -> Any:
        segments = [] if text.startswith("How many") else self._segments(image)
        answer = "<p> it </p> [SEG]." if segments else "five."
        return SimpleNamespace(
            text=answer, clean_text=answer.replace("<p> ", "").replace(" </p> [SEG]", ""), segments=segments
        )

    def follow(self, image: np.ndarray, segments: list[Any]) -> list[Any]:
        return self._segments(image)


def test_readme_command_replays_the_shipped_bag(tmp_path: Path, monkeypatch, capsys) -> None:
    # `omg-llava-ros replay data/demo_bag --out out/demo`, with a perfect model standing in for the
    # embedded one: every ground-truth frame is evaluated and scores 1.
    monkeypatch.setattr(replay_cli, "_model", lambda spec, device, backend: OracleModel(DemoBagConfig()))
    out = tmp_path / "demo"
    assert main(["replay", str(SHIPPED), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"report: {out / 'report.html'}"
    met = json.loads((out / "metrics.json").read_text())
    script = build_script(DemoBagConfig())
    assert met["frames"] == met["processed_frames"] == len(script.frames)
    assert met["commands"] == len([c for c in script.commands if c]) and met["answered_commands"] == met["commands"]
    assert met["stop_commands"] == 1
    assert met["ground_truth"]["evaluated_frames"] == sum(f.gt_mask is not None for f in script.frames)
    assert met["ciou"] == 1.0 and met["giou"] == 1.0 and met["errors"] == []
    assert (out / "output" / "metadata.yaml").is_file()
