"""`omg-llava-ros replay` / `make-demo-bag` on the command line, and bags recorded by real ROS 2."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omg_llava_ros.cli import main
from omg_llava_ros.replay import BagSource, ReplaySetupError, replay
from omg_llava_ros.replay import cli as replay_cli
from omg_llava_ros.replay.synthetic import BagEntry, image_fields, write_bag
from omg_llava_ros.ros import messages as m

REPO = Path(__file__).resolve().parents[1]
# CI checks shared/ out beside the clone.
FIXTURES = Path(__file__).parents[2] / "shared" / "fixtures" / "real_rosbag2"
REAL_BAGS = ["talker_sqlite3", "talker_mcap"]


def real_bag(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_dir():
        if os.environ.get("CI"):  # CI lays shared/ beside the clone: missing there is a failure
            pytest.fail(f"shared fixtures not found at {FIXTURES}")
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    return path


@pytest.mark.parametrize("name", REAL_BAGS)
def test_real_ros2_bags_are_read(name: str) -> None:
    with BagSource(real_bag(name)) as source:
        topics = source.topics
        assert topics["/topic"].msgtype == "std_msgs/msg/String" and topics["/topic"].count == 10
        texts = [source.deserialize(bm).data for bm in source.messages(["/topic"])]
        logs = [source.deserialize(bm).msg for bm in source.messages(["/rosout"])]
    assert texts == [f"Hello, world! {k}" for k in range(10)]
    assert logs[0] == "Publishing: 'Hello, world! 0'"


@pytest.mark.parametrize("name", REAL_BAGS)
def test_real_ros2_bags_without_images_exit_2_with_one_line(name: str, tmp_path: Path, capsys) -> None:
    bag = real_bag(name)
    with pytest.raises(ReplaySetupError, match="has no image topic"):
        replay(object(), bag, tmp_path / "api")
    assert main(["replay", str(bag), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "has no image topic" in err
    assert "/topic [std_msgs/msg/String] (10)" in err
    assert main(["replay", str(bag), "--out", str(tmp_path / "out"), "--command-topic", "/topic"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "read 10 command(s) from /topic" in err
    assert not (tmp_path / "out").exists()


def test_no_traceback_from_the_installed_command(tmp_path: Path) -> None:
    bag = real_bag("talker_sqlite3")
    proc = subprocess.run(
        [sys.executable, "-m", "omg_llava_ros.cli", "replay", str(bag), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1


def _small_bag(path: Path) -> Path:
    rgb = np.full((32, 32, 3), 90, np.uint8)
    rgb[8:20, 8:20] = (220, 50, 50)
    entries = [BagEntry("/cmd", m.STRING, 5, {"data": "Please segment the red square."})]
    entries += [BagEntry("/camera/image", m.IMAGE, 10 + k, image_fields(rgb, "rgb8", 10 + k)) for k in range(3)]
    return write_bag(path, entries)


def test_replay_with_the_real_model_class(tmp_path: Path, monkeypatch, capsys, tiny_model) -> None:
    asked: dict[str, object] = {}

    def load(spec, device, backend):
        asked.update(spec=spec, device=device, backend=backend)
        return tiny_model  # the real OmgLlava (random tiny weights), loaded once per session

    monkeypatch.setattr(replay_cli, "_model", load)
    bag = _small_bag(tmp_path / "bag")
    out = tmp_path / "out"
    argv = ["replay", str(bag), "--out", str(out), "--model", "tiny", "--max-new-tokens", "4", "--device", "cpu"]
    assert main(argv) == 0
    assert asked == {"spec": "tiny", "device": "cpu", "backend": "auto"}  # the node's default
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"replayed {bag} (mcap), as fast as possible: 3 frames, 3 processed, 0 dropped")
    assert lines[-1] == f"report: {out / 'report.html'}"
    met = json.loads((out / "metrics.json").read_text())
    for key in ("frames", "commands", "answered_commands", "errors", "latency_ms", "dropped_frames"):
        assert key in met
    assert set(met["latency_ms"]) >= {"p50", "p95", "max"}
    assert "ciou" not in met  # no ground truth in this bag
    assert (met["frames"], met["commands"], met["answered_commands"], met["errors"]) == (3, 1, 1, [])
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    bag = _small_bag(tmp_path / "bag")
    cases = [
        (["--rate", "-1"], "rate must be a positive number"),
        (["--image-topic", "/cmd"], "image topic /cmd is std_msgs/msg/String"),
        (["--gt-topic", "/none"], "no topic /none"),
        (["--model", str(tmp_path / "no_model")], "cannot load the model"),
    ]
    for extra, message in cases:
        assert main(["replay", str(bag), "--out", str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_make_demo_bag_command(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    argv = ["make-demo-bag", str(out), "--scenes", "1", "--frames-per-scene", "3", "--size", "64"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    assert main(argv) == 2 and "exists" in capsys.readouterr().err
    assert main([*argv, "--force", "--storage", "sqlite3"]) == 0
    with BagSource(out) as source:
        assert source.storage == "sqlite3" and source.topics["/camera/image_raw"].count == 3


def test_replay_auto_falls_back_to_pytorch_vision_where_no_engine_is_usable(monkeypatch, caplog) -> None:
    from omg_llava_ros.engines import backend as engines_backend
    from omg_llava_ros.engines.spec import EngineNotBuiltError
    from omg_llava_ros.model.vision_backend import TorchVision

    def nothing_built(name, model, options=None):
        raise EngineNotBuiltError("no TensorRT engine in the cache")

    monkeypatch.setattr(engines_backend, "select_backend", nothing_built)
    with caplog.at_level(logging.WARNING, logger="omg_llava_ros.replay.cli"):
        model = replay_cli._model("config:tiny", "cpu", "auto")
    assert isinstance(model.vision, TorchVision)
    assert any("PyTorch vision" in r.getMessage() and "no TensorRT engine" in r.getMessage() for r in caplog.records)
    assert any("build-engines" in r.getMessage() for r in caplog.records)
    with pytest.raises(EngineNotBuiltError):  # asked for by name: the reason, no silent fallback
        replay_cli._model("config:tiny", "cpu", "tensorrt")
