"""The soak run (short, as CI runs it): a generated stream with commands of every kind and planted
bad frames of every kind, replayed through the embedded model; every one accounted for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from omg_llava_ros.replay.bag import DecodeError
from omg_llava_ros.replay.soak import (
    BAD_FRAME_KINDS,
    COMMAND_TOPIC,
    IMAGE_TOPIC,
    GeneratedSource,
    Planted,
    SoakConfig,
    run_soak,
)
from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.image_conversion import ImageConversionError


def test_the_generated_stream_is_a_bag_of_frames_commands_and_bad_frames_of_every_kind():
    config = SoakConfig(frames=700, seed=3, command_every=(20, 40), bad_share=0.1, rss_every=50)
    planted = Planted()
    source = GeneratedSource(config, planted)
    messages = list(source.messages([IMAGE_TOPIC, COMMAND_TOPIC]))
    images = [bm for bm in messages if bm.topic == IMAGE_TOPIC]
    assert len(images) == 700 and len(planted.rss) == 14
    assert [bm.log_time_ns for bm in messages] == sorted(bm.log_time_ns for bm in messages)  # recorded order
    assert {kind for kind, _, _ in planted.bad} == set(BAD_FRAME_KINDS)
    assert {kind for kind, _ in planted.commands} == {"referring", "question", "stop", "long", "control"}
    bad = {log_ns: kind for kind, log_ns, _ in planted.bad}
    for bm in images:
        try:
            msg = source.deserialize(bm)
            m.header_stamp(msg)
            m.rgb_from_message(msg, False)
        except (DecodeError, m.MessageError, ImageConversionError):
            assert bm.log_time_ns in bad  # only the planted ones are rejected
        else:
            assert bm.log_time_ns not in bad, bad[bm.log_time_ns]  # and every planted one is
    again = list(GeneratedSource(config, Planted()).messages([IMAGE_TOPIC, COMMAND_TOPIC]))
    assert [bytes(a.raw) for a in again[:50]] == [bytes(b.raw) for b in messages[:50]]  # seeded


@pytest.fixture(scope="module")
def embedded_model():
    from omg_llava_ros import OmgLlava

    return OmgLlava.from_pretrained()


def test_a_short_soak_accounts_for_every_command_and_bad_frame(embedded_model):
    config = SoakConfig(frames=300, seed=0, command_every=(20, 50), bad_share=0.05, window=100, rss_every=25)
    report = run_soak(embedded_model, config)
    json.dumps(report)  # the command prints it
    assert report["crashes"] == 0 and report["passed"]["no_crash"]
    assert report["bad_frames"]["planted"] >= 5 and report["bad_frames"]["not_reported"] == 0
    assert report["commands"]["sent"] >= 6 and report["commands"]["unanswered_unreported"] == 0
    assert report["frames_processed"] + report["bad_frames"]["by_kind"].get("truncated_bytes", 0) >= 300 - 1
    assert report["results"] > 0 and report["errors"] >= report["bad_frames"]["planted"]
    # The figures the full run is judged by are there (their values are bench figures, not asserted).
    assert np.isfinite(report["rss_mb"]["slope_last_80pct_mb_per_1000_frames"])
    assert report["latency_p95_ms"]["first_window"] > 0 and report["latency_p95_ms"]["last_over_first"] > 0
    follow = report["latency_p95_ms"]["follow_frames"]
    assert follow["first_window"] > 0 and follow["last_over_first"] > 0
    assert report["passed"]["latency_held"] == (follow["last_over_first"] <= 1.10)
