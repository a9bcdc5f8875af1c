"""Replay on bags written here by rosbags: storages, encodings, ground-truth metrics, bad messages,
real-time dropping, the output bag, ROS 1 bags and bags without stored definitions."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from omg_llava_ros.pipeline.types import NANOSECONDS
from omg_llava_ros.replay import (
    OUTPUT_TOPICS,
    BagSource,
    ReplayConfig,
    Replayer,
    ReplaySetupError,
    replay,
)
from omg_llava_ros.replay.metrics import IouAccumulator, jitter_summary, latency_summary
from omg_llava_ros.replay.synthetic import (
    RAW_ENCODINGS,
    BagEntry,
    compressed_fields,
    grey,
    image_fields,
    write_bag,
)
from omg_llava_ros.replay.thumbnails import ThumbnailStrip
from omg_llava_ros.ros import messages as m

H = W = 20
IMAGE_TOPIC = "/cam/image"
COMMAND_TOPIC = "/cmd"
GT_TOPIC = "/cam/gt"
SEGMENT = "Please segment the red square."
QUESTION = "How many objects are there?"


@dataclass
class Seg:
    phrase: str | None
    mask: np.ndarray
    score: float = 0.9


class ScriptedModel:
    """Grounds the red pixels (R > 128) for commands about a square; answers "two." otherwise."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.chats: list[str] = []
        self.follows = 0
        self.images: list[np.ndarray] = []

    def chat(self, image: np.ndarray, text: str, **kwargs: Any) -> Any:
        time.sleep(self.delay_s)
        self.chats.append(text)
        self.images.append(image.copy())
        if "square" in text:
            segs = [Seg("the red square", image[..., 0] > 128)]
            return SimpleNamespace(text="<p> the red square </p> [SEG].", clean_text="the red square.", segments=segs)
        return SimpleNamespace(text="two.", clean_text="two.", segments=[])

    def follow(self, image: np.ndarray, segments: list[Any]) -> list[Any]:
        time.sleep(self.delay_s)
        self.follows += 1
        return [Seg(s.phrase, image[..., 0] > 128, s.score) for s in segments]


def square_image(rows: slice | None, cols: slice | None) -> np.ndarray:
    img = np.full((H, W, 3), 60, dtype=np.uint8)
    if rows is not None and cols is not None:
        img[rows, cols] = (200, 30, 30)
    return img


def rect_mask(rows: slice | None, cols: slice | None) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    if rows is not None and cols is not None:
        mask[rows, cols] = 255
    return mask


def ns(seconds: float) -> int:
    return round(seconds * NANOSECONDS)


def frame(t: float, rgb: np.ndarray, encoding: str = "rgb8") -> BagEntry:
    return BagEntry(IMAGE_TOPIC, m.IMAGE, ns(t), image_fields(rgb, encoding, ns(t)))


def command(t: float, text: str) -> BagEntry:
    return BagEntry(COMMAND_TOPIC, m.STRING, ns(t), {"data": text})


def gt(t: float, mask: np.ndarray, log_t: float | None = None) -> BagEntry:
    header = m.header_fields((int(ns(t) // NANOSECONDS), int(ns(t) % NANOSECONDS)), "camera")
    return BagEntry(
        GT_TOPIC, m.IMAGE, ns(log_t if log_t is not None else t), {"header": header, **m.mono8_fields(mask)}
    )


TOP_LEFT = (slice(0, 10), slice(0, 10))


def ground_truth_entries() -> list[BagEntry]:
    """Five frames whose IoUs are known (see test_ground_truth_metrics_by_hand)."""
    return [
        command(0.9, SEGMENT),
        gt(1.0, rect_mask(slice(0, 10), slice(5, 15)), log_t=0.95),  # before its frame in the bag
        frame(1.0, square_image(*TOP_LEFT)),  # answer: 100 px vs 100 px, overlap 50 -> 1/3
        frame(1.1, square_image(*TOP_LEFT)),  # follow: identical -> 1
        gt(1.1, rect_mask(*TOP_LEFT)),
        command(1.15, QUESTION),
        frame(1.2, square_image(*TOP_LEFT)),  # answered without objects; empty vs empty -> 1
        gt(1.2, rect_mask(None, None)),
        frame(1.3, square_image(*TOP_LEFT)),  # nothing to follow: empty vs 40 px -> 0
        gt(1.3, rect_mask(slice(0, 4), slice(0, 10))),
        frame(1.4, square_image(*TOP_LEFT)),  # no ground truth: not evaluated
    ]


@pytest.fixture(params=["mcap", "sqlite3"])
def gt_bag(request, tmp_path: Path) -> Path:
    return write_bag(tmp_path / f"gt_{request.param}", ground_truth_entries(), storage=request.param)


def test_ground_truth_metrics_by_hand(gt_bag: Path, tmp_path: Path) -> None:
    model = ScriptedModel()
    out = replay(model, gt_bag, tmp_path / "out")
    met = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert met["topics"] == {"image": IMAGE_TOPIC, "command": COMMAND_TOPIC, "ground_truth": GT_TOPIC}
    assert (met["frames"], met["processed_frames"], met["dropped_frames"], met["results"]) == (5, 5, 0, 3)
    assert (met["commands"], met["answered_commands"]) == (2, 2)
    assert model.chats == [SEGMENT, QUESTION] and model.follows == 1
    # cIoU = (50 + 100 + 0 + 0) / (150 + 100 + 0 + 40); gIoU = (1/3 + 1 + 1 + 0) / 4
    assert met["ciou"] == pytest.approx(150 / 290, abs=1e-4)
    assert met["giou"] == pytest.approx((1 / 3 + 2) / 4, abs=1e-4)
    assert met["ground_truth"] == {"masks": 4, "evaluated_frames": 4}
    per = {c["command"]: c for c in met["per_command"]}
    assert per[SEGMENT]["ciou"] == pytest.approx(150 / 250, abs=1e-4)
    assert per[SEGMENT]["giou"] == pytest.approx(2 / 3, abs=1e-4)
    assert per[SEGMENT]["answer"] == "the red square." and per[SEGMENT]["objects"] == 1
    assert per[QUESTION]["ciou"] == 0.0 and per[QUESTION]["giou"] == pytest.approx(0.5)
    assert per[QUESTION]["answer"] == "two." and per[QUESTION]["results"] == 1
    assert met["errors"] == []
    lat = met["latency_ms"]
    assert set(lat) >= {"p50", "p95", "max"} and 0 <= lat["p50"] <= lat["p95"] <= lat["max"]
    ious = [r.iou for r in out.records]
    assert ious[:4] == pytest.approx([1 / 3, 1.0, 1.0, 0.0]) and ious[4] is None


def test_as_fast_as_possible_processes_every_frame_in_order(tmp_path: Path) -> None:
    entries = [command(0.0, SEGMENT)] + [frame(0.01 * k + 0.001, square_image(*TOP_LEFT)) for k in range(6)]
    bag = write_bag(tmp_path / "bag", entries)
    out = replay(ScriptedModel(), bag, None)
    assert out.processed_frames == out.frames == out.results == 6 and out.dropped_frames == 0
    stamps = [r.stamp for r in out.records]
    assert stamps == sorted(stamps) and [r.follow for r in out.records] == [False] + [True] * 5


@pytest.mark.parametrize(
    ("encoding", "storage"),
    [(enc, ("mcap", "sqlite3")[i % 2]) for i, enc in enumerate(RAW_ENCODINGS)]
    + [("jpeg", "mcap"), ("png", "sqlite3"), ("jpeg", "sqlite3"), ("png", "mcap")],
)
def test_every_image_encoding(encoding: str, storage: str, tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([yy * 12, xx * 12, 255 - (yy + xx) * 6], axis=-1).astype(np.uint8)
    if encoding in ("jpeg", "png"):
        entries = [
            command(0.0, SEGMENT),
            BagEntry(IMAGE_TOPIC, m.COMPRESSED_IMAGE, ns(0.1), compressed_fields(rgb, encoding, ns(0.1))),
        ]
    else:
        entries = [command(0.0, SEGMENT), frame(0.1, rgb, encoding)]
    bag = write_bag(tmp_path / "bag", entries, storage=storage)
    model = ScriptedModel()
    out = replay(model, bag, None)
    assert out.errors == [] and out.results == 1
    expected = np.repeat(grey(rgb)[..., None], 3, axis=2) if encoding.startswith("mono") else rgb
    seen = model.images[0]
    assert seen.shape == (H, W, 3) and seen.dtype == np.uint8
    if encoding == "jpeg":
        assert np.abs(seen.astype(int) - expected).mean() < 4  # lossy, but the channel order is right
    else:
        np.testing.assert_array_equal(seen, expected)


def test_malformed_messages_become_errors_and_the_rest_is_evaluated(tmp_path: Path) -> None:
    good = square_image(*TOP_LEFT)
    short = image_fields(good, "rgb8", ns(1.1))
    short["data"] = short["data"][:-7]
    weird = image_fields(good, "rgb8", ns(1.2))
    weird["encoding"] = "rgb4k"
    bad_stamp = image_fields(good, "rgb8", ns(1.4))
    bad_stamp["header"]["stamp"]["nanosec"] = 1_500_000_000
    wrong_gt = {"header": m.header_fields((1, 500_000_000), "camera"), **m.rgb_to_image_fields(good)}
    small_gt = {"header": m.header_fields((1, 0), "camera"), **m.mono8_fields(np.zeros((4, 4), np.uint8))}
    entries = [
        command(0.9, SEGMENT),
        BagEntry(COMMAND_TOPIC, m.STRING, ns(0.95), raw=b"\x00\x01\x00\x00\xff\xff\xff\x7f"),  # length past the end
        frame(1.0, good),
        BagEntry(GT_TOPIC, m.IMAGE, ns(1.0), small_gt),  # 4x4 ground truth for a 20x20 frame
        BagEntry(IMAGE_TOPIC, m.IMAGE, ns(1.1), short),
        BagEntry(IMAGE_TOPIC, m.IMAGE, ns(1.2), weird),
        BagEntry(IMAGE_TOPIC, m.IMAGE, ns(1.3), raw=b"\x00\x01\x00\x00\xde\xad\xbe"),  # not CDR of an Image
        BagEntry(IMAGE_TOPIC, m.IMAGE, ns(1.4), bad_stamp),
        BagEntry(GT_TOPIC, m.IMAGE, ns(1.5), wrong_gt),  # rgb8 is no mask
        frame(1.5, good),
    ]
    bag = write_bag(tmp_path / "bag", entries)
    out = replay(ScriptedModel(), bag, tmp_path / "out")
    errors = json.loads((tmp_path / "out" / "metrics.json").read_text())["errors"]
    by_reason = {e["reason"]: e for e in errors}
    assert len(errors) == 7, errors

    def find(*words: str) -> dict[str, Any]:
        hits = [e for r, e in by_reason.items() if all(w in r for w in words)]
        assert len(hits) == 1, (words, errors)
        return hits[0]

    assert find("command skipped", "length")["topic"] == COMMAND_TOPIC
    assert find("data too short")["stamp"] == [1, 100_000_000]
    assert find("unknown encoding", "rgb4k")["stamp"] == [1, 200_000_000]
    cdr = find("cannot deserialise 7 bytes as sensor_msgs/msg/Image")
    assert cdr["stamp"] is None and cdr["log_time_ns"] == ns(1.3) and cdr["topic"] == IMAGE_TOPIC
    assert find("nanosec")["topic"] == IMAGE_TOPIC
    assert find("ground-truth mask skipped", "rgb8")["topic"] == GT_TOPIC
    assert find("does not match the image")["stamp"] == [1, 0]
    # The good frames around the bad ones are answered, then followed (the short and odd-encoding frames
    # reach the worker, which converts images, as in the node; the other two fail on deserialisation).
    assert (out.frames, out.processed_frames, out.results) == (6, 4, 2)
    assert [r.stamp for r in out.records if r.latency_ms is not None] == [(1, 0), (1, 500_000_000)]
    assert out.iou.frames == 0


def test_malformed_compressed_images(tmp_path: Path) -> None:
    rgb = square_image(*TOP_LEFT)

    def comp(t: float, **override: Any) -> BagEntry:
        return BagEntry(IMAGE_TOPIC, m.COMPRESSED_IMAGE, ns(t), {**compressed_fields(rgb, "png", ns(t)), **override})

    entries = [
        command(0.0, SEGMENT),
        comp(0.1),
        comp(0.2, data=np.frombuffer(b"\xff\xd8\xff\xe0 not really a jpeg", np.uint8), format="jpeg"),
        comp(0.3, format="bmp"),
        comp(0.4, data=np.zeros(0, np.uint8)),
        comp(0.5),
    ]
    out = replay(ScriptedModel(), write_bag(tmp_path / "bag", entries, storage="sqlite3"), None)
    reasons = [e.reason for e in out.errors]
    assert len(reasons) == 3
    assert "could not decode" in reasons[0] and "bmp" in reasons[1] and "empty compressed data" in reasons[2]
    assert [e.stamp for e in out.errors] == [(0, 200_000_000), (0, 300_000_000), (0, 400_000_000)]
    assert out.results == 2


def test_real_time_drops_frames_a_slow_model_cannot_keep_up_with(tmp_path: Path) -> None:
    entries = [command(0.0, SEGMENT)] + [frame(0.001 + 0.01 * k, square_image(*TOP_LEFT)) for k in range(10)]
    bag = write_bag(tmp_path / "bag", entries)
    model = ScriptedModel(delay_s=0.3)  # 30x slower than the 100 Hz camera
    out = Replayer(model, ReplayConfig(rate=1.0)).run(bag, tmp_path / "out")
    met = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert met["mode"] == "real_time" and met["rate"] == 1.0
    assert met["frames"] == 10
    assert met["dropped_frames"] >= 1
    assert met["processed_frames"] + met["dropped_frames"] == 10
    assert met["results"] == met["processed_frames"] == len(out.records)
    assert len(model.chats) + model.follows == met["processed_frames"]
    assert met["pipeline"]["frames"] == met["processed_frames"]


def test_output_bag_reads_back_with_its_own_definitions(gt_bag: Path, tmp_path: Path) -> None:
    from rosbags.highlevel import AnyReader

    out = replay(ScriptedModel(), gt_bag, tmp_path / "out")
    output = tmp_path / "out" / "output"
    assert "version: 8" in (output / "metadata.yaml").read_text()
    assert list(output.glob("*.mcap"))
    # No default typestore: every type must come from the definitions stored in the bag.
    with AnyReader([output]) as reader:
        types = {c.topic: c.msgtype for c in reader.connections}
        assert types == {f"/omg_llava/{k}": v for k, v in OUTPUT_TOPICS.items()}
        result_def = next(c.msgdef.data for c in reader.connections if c.topic == "/omg_llava/result")
        # rosbag2's ros2msg encoding, which Foxglove decodes without the package installed
        assert "MSG: omg_llava_ros_interfaces/msg/SegmentedObject" in result_def
        assert "MSG: vision_msgs/msg/BoundingBox2D" in result_def
        decoded: dict[str, list[Any]] = {}
        for conn, _, raw in reader.messages():
            decoded.setdefault(conn.topic, []).append(reader.deserialize(raw, conn.msgtype))
    assert {t: len(v) for t, v in decoded.items()} == {f"/omg_llava/{k}": out.results for k in OUTPUT_TOPICS}
    results = decoded["/omg_llava/result"]
    assert [r.command for r in results] == [SEGMENT, SEGMENT, QUESTION]
    assert [r.follow for r in results] == [False, True, False]
    assert [len(r.objects) for r in results] == [1, 1, 0]
    first = results[0]
    assert (first.header.stamp.sec, first.header.stamp.nanosec) == (1, 0)
    assert first.objects[0].phrase == "the red square" and first.clean_text == "the red square."
    mask = decoded["/omg_llava/masks"][0]
    ids = np.asarray(mask.data).reshape(mask.height, mask.width)
    np.testing.assert_array_equal(ids > 0, rect_mask(*TOP_LEFT) > 0)
    detection = decoded["/omg_llava/detections"][0].detections[0]
    assert (detection.bbox.size_x, detection.bbox.size_y) == (10.0, 10.0)
    overlay = decoded["/omg_llava/overlay"][0]
    assert overlay.encoding == "rgb8" and (overlay.height, overlay.width) == (H, W)


def test_output_bag_in_sqlite3(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / "bag", ground_truth_entries())
    out = Replayer(ScriptedModel(), ReplayConfig(output_storage="sqlite3")).run(bag, tmp_path / "out")
    with BagSource(tmp_path / "out" / "output") as source:
        assert source.storage == "sqlite3"
        msgs = list(source.messages(list(source.topics)))
        assert len(msgs) == 4 * out.results
        assert all(source.deserialize(bm) is not None for bm in msgs)


def test_rerun_replaces_its_own_output(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / "bag", ground_truth_entries())
    replay(ScriptedModel(), bag, tmp_path / "out")
    again = replay(ScriptedModel(), bag, tmp_path / "out")
    assert again.output_counts["result"] == again.results == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "output").mkdir()
    (tmp_path / "other" / "output" / "notes.txt").write_text("mine")
    with pytest.raises(ReplaySetupError, match="not a bag written by replay"):
        replay(ScriptedModel(), bag, tmp_path / "other")


def test_sqlite3_bag_without_definitions_uses_the_default_store(tmp_path: Path) -> None:
    bag = write_bag(tmp_path / "bag", ground_truth_entries(), storage="sqlite3")
    db = next(bag.glob("*.db3"))
    with sqlite3.connect(db) as conn:  # what a bag of format version < 8 looks like
        conn.execute("DELETE FROM message_definitions")
    with BagSource(bag) as source:
        assert all(not c.msgdef.data for c in source._connections)
    out = replay(ScriptedModel(), bag, None)
    assert out.results == 3 and out.errors == []


def test_ros1_bag(tmp_path: Path) -> None:
    from rosbags.rosbag1 import Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS1_NOETIC)
    conv = m.RosbagsMessages(store)
    path = tmp_path / "cam.bag"
    with Writer(path) as writer:
        cmd = writer.add_connection(COMMAND_TOPIC, m.STRING, typestore=store)
        cam = writer.add_connection(IMAGE_TOPIC, m.IMAGE, typestore=store)
        writer.write(cmd, ns(0.5), store.serialize_ros1(conv.build(m.STRING, {"data": SEGMENT}), m.STRING))
        for k in range(3):
            fields = image_fields(square_image(*TOP_LEFT), "bgr8", ns(1 + k * 0.1))
            writer.write(cam, ns(1 + k * 0.1), store.serialize_ros1(conv.build(m.IMAGE, fields), m.IMAGE))
    model = ScriptedModel()
    out = replay(model, path, None)
    assert out.storage == "rosbag1" and out.results == 3 and model.chats == [SEGMENT]
    np.testing.assert_array_equal(model.images[0], square_image(*TOP_LEFT))


def test_topic_detection(tmp_path: Path) -> None:
    rgb = square_image(*TOP_LEFT)
    depth = BagEntry("/cam/depth", m.IMAGE, ns(1), image_fields(rgb, "mono16", ns(1)))
    entries = [command(0.5, SEGMENT), frame(1.0, rgb), depth, gt(1.0, rect_mask(*TOP_LEFT))]
    bag = write_bag(tmp_path / "bag", entries)
    out = replay(ScriptedModel(), bag, None)  # /cam/depth and /cam/gt are not the colour camera
    assert (out.topics.image, out.topics.command, out.topics.gt) == (IMAGE_TOPIC, COMMAND_TOPIC, GT_TOPIC)
    two = write_bag(
        tmp_path / "two", [frame(1.0, rgb), BagEntry("/cam2/image", m.IMAGE, ns(1), image_fields(rgb, "rgb8", ns(1)))]
    )
    with pytest.raises(ReplaySetupError, match="several image topics .*--image-topic"):
        replay(ScriptedModel(), two, None)
    chosen = Replayer(ScriptedModel(), ReplayConfig(image_topic="/cam2/image", command=SEGMENT)).run(two)
    assert chosen.topics.image == "/cam2/image" and chosen.results == 1
    with pytest.raises(ReplaySetupError, match="no topic /nope"):
        Replayer(ScriptedModel(), ReplayConfig(gt_topic="/nope")).run(bag)
    declared = write_bag(
        tmp_path / "declared", [frame(1.0, rgb), depth], custom={"omg_llava_ros.image_topic": "/cam/depth"}
    )
    assert Replayer(ScriptedModel(), ReplayConfig(command=SEGMENT)).run(declared).topics.image == "/cam/depth"


def test_missing_or_broken_bags_are_setup_errors(tmp_path: Path) -> None:
    with pytest.raises(ReplaySetupError, match="does not exist"):
        replay(ScriptedModel(), tmp_path / "missing", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplaySetupError, match="not a rosbag2"):
        replay(ScriptedModel(), tmp_path / "empty", None)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.yaml").write_text("rosbag2_bagfile_information: {version: 8}\n")
    with pytest.raises(ReplaySetupError, match="cannot read"):
        replay(ScriptedModel(), broken, None)


def test_metric_helpers() -> None:
    acc = IouAccumulator()
    assert acc.ciou is None and acc.giou is None
    acc.add(0, 0)  # empty vs empty
    acc.add(1, 4)
    assert acc.giou == pytest.approx((1 + 0.25) / 2) and acc.ciou == pytest.approx(1 / 4)
    assert latency_summary([])["p50"] is None
    assert latency_summary([10.0, 20.0, 30.0])["max"] == 30.0
    # outputs at 0, 0.1, 0.3, 0.4 s: intervals 100, 200, 100 ms -> jitter 100, 100 ms
    assert jitter_summary([0.0, 0.1, 0.3, 0.4]) == {"mean": 100.0, "max": 100.0, "std": 0.0}


def test_thumbnail_strip_keeps_evenly_spaced_items() -> None:
    strip = ThumbnailStrip(keep=4)
    for k in range(100):
        keep = strip.wants_next()
        strip.offer(SimpleNamespace(k=k) if keep else None)  # type: ignore[arg-type]
    held = [t.k for t in strip._items]
    assert len(held) < 8 and held[0] == 0
    steps = np.diff(held)
    assert len(set(steps.tolist())) == 1  # evenly spaced
    chosen = [t.k for t in strip.selected()]
    assert len(chosen) == 4 and chosen[0] == 0 and chosen[-1] == held[-1]
