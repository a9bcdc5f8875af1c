"""The ROS-free pipeline: command handling, chat vs follow, stamps, 3D lifting, the frame slot."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers import ANSWER, CountingModel, force_answer

from omg_llava_ros.pipeline import (
    CameraIntrinsics,
    CommandFailedError,
    Frame,
    LatestFrameSlot,
    PerceptionPipeline,
    PipelineConfig,
    PipelineError,
    StampedBuffer,
    centroid,
    instance_image,
    lift_to_3d,
    render_overlay,
)
from omg_llava_ros.pipeline.pipeline import CONTROL_TOKENS

H, W = 48, 64


@pytest.fixture
def model(tiny_model):
    return CountingModel(tiny_model)


@pytest.fixture
def pipeline(model, tiny_model):
    return PerceptionPipeline(model, logits_processor=force_answer(tiny_model.tokenizer, ANSWER))


def frame(sec: int, nanosec: int = 0, seed: int = 0, **kwargs) -> Frame:
    image = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    return Frame(image, (sec, nanosec), "camera_optical", **kwargs)


def test_command_is_answered_by_chat_then_followed_without_llm(pipeline, model):
    command_id = pipeline.set_command("pick up the red cup", stamp=(10, 0))
    first = pipeline.process(frame(10, 5))
    assert first is not None and not first.follow
    assert first.command_id == command_id and first.command == "pick up the red cup"
    assert first.stamp == (10, 5) and first.frame_id == "camera_optical"
    assert first.text == ANSWER and first.clean_text == "the red cup and the plate."
    assert [o.phrase for o in first.objects] == ["the red cup", "the plate"]
    assert [o.id for o in first.objects] == ["1", "2"]
    assert model.chats == ["pick up the red cup"] and model.follows == 0

    for i in range(3):
        res = pipeline.process(frame(11 + i, seed=i + 1))
        assert res is not None and res.follow
        assert res.command_id == command_id and res.text == ANSWER and res.stamp == (11 + i, 0)
        assert [o.phrase for o in res.objects] == ["the red cup", "the plate"]
        assert res.instance_ids.shape == (H, W) and res.instance_ids.dtype == np.uint16
    assert len(model.chats) == 1  # follow mode never calls the LLM
    assert model.follows == 3
    assert pipeline.stats.chat_calls == 1 and pipeline.stats.follow_calls == 3


def test_follow_on_the_answered_frame_reproduces_the_chat_masks(pipeline):
    pipeline.set_command("segment it")
    f = frame(1)
    answered = pipeline.process(f)
    followed = pipeline.process(Frame(f.image, (2, 0), f.frame_id))
    for a, b in zip(answered.objects, followed.objects, strict=True):
        assert np.array_equal(a.mask, b.mask)
    assert np.array_equal(answered.instance_ids, followed.instance_ids)


def test_new_command_replaces_the_old_and_is_answered_again(pipeline, model):
    first = pipeline.set_command("pick up the red cup")
    pipeline.process(frame(1))
    pipeline.process(frame(2))
    second = pipeline.set_command("now the plate")
    assert second > first
    res = pipeline.process(frame(3))
    assert res.command_id == second and not res.follow and res.command == "now the plate"
    assert model.chats == ["pick up the red cup", "now the plate"]
    assert pipeline.process(frame(4)).follow


@pytest.mark.parametrize("stop", ["", "   \n\t "])
def test_empty_command_stops_follow_mode(pipeline, model, stop):
    pipeline.set_command("pick up the red cup")
    assert pipeline.process(frame(1)) is not None
    assert pipeline.following
    stop_id = pipeline.set_command(stop)
    assert not pipeline.following and not pipeline.pending
    assert pipeline.command.id == stop_id and pipeline.command.is_stop
    assert pipeline.process(frame(2)) is None
    assert model.follows == 0 and len(model.chats) == 1


def test_command_without_any_frame_waits_for_the_first_one(pipeline, model):
    pipeline.set_command("pick up the red cup", stamp=(5, 0))
    assert pipeline.pending and model.chats == []
    res = pipeline.process(frame(6))
    assert res is not None and not res.follow and not pipeline.pending


def test_frames_older_than_the_command_are_skipped(pipeline, model):
    pipeline.set_command("pick up the red cup", stamp=(100, 500))
    assert pipeline.process(frame(99)) is None
    assert pipeline.process(frame(100, 499)) is None
    assert model.chats == [] and pipeline.stats.skipped_older_than_command == 2
    res = pipeline.process(frame(100, 500))  # same stamp: not older
    assert res is not None and res.stamp == (100, 500) and not res.follow


def test_tolerance_lets_a_slightly_older_frame_answer(model, tiny_model):
    pipe = PerceptionPipeline(
        model, PipelineConfig(command_frame_tolerance_s=0.1), force_answer(tiny_model.tokenizer, ANSWER)
    )
    pipe.set_command("pick up the red cup", stamp=(10, 0))
    assert pipe.process(frame(9, 850_000_000)) is None
    assert pipe.process(frame(9, 950_000_000)) is not None


def test_follow_skips_frames_that_arrive_out_of_order(pipeline):
    pipeline.set_command("pick up the red cup")
    pipeline.process(frame(10))
    assert pipeline.process(frame(12)).follow
    assert pipeline.process(frame(11)) is None
    assert pipeline.stats.skipped_out_of_order == 1


def test_no_command_means_no_output(pipeline, model):
    assert pipeline.process(frame(1)) is None
    assert model.chats == [] and model.follows == 0 and pipeline.stats.idle_frames == 1


def test_answer_without_objects_leaves_nothing_to_follow(model, tiny_model):
    pipe = PerceptionPipeline(model, logits_processor=force_answer(tiny_model.tokenizer, "I see no cup."))
    pipe.set_command("pick up the red cup")
    res = pipe.process(frame(1))
    assert res.objects == [] and not res.instance_ids.any()
    assert any("grounded no object" in w for w in res.warnings)
    assert pipe.process(frame(2)) is None and model.follows == 0


def test_zero_and_100k_character_commands(pipeline, model):
    assert pipeline.set_command("") and pipeline.command.is_stop
    assert pipeline.process(frame(1)) is None
    long = "pick up the red cup " * 5000  # 100 000 characters
    assert len(long) == 100_000
    pipeline.set_command(long)
    assert pipeline.command.original_length == 100_000
    res = pipeline.process(frame(2))
    assert res is not None
    assert len(model.chats[-1]) <= 2000
    assert any("truncated from 100000 to 2000" in w for w in res.warnings)
    # The warning comes with the answer only, not with every followed frame.
    assert not any("truncated" in w for w in pipeline.process(frame(3)).warnings)


def test_control_tokens_and_nul_are_removed_from_commands(pipeline, model):
    pipeline.set_command("what is <region> <image> near\x00 the <|im_end|> cup")
    res = pipeline.process(frame(1))
    sent = model.chats[-1]
    assert not any(t in sent for t in CONTROL_TOKENS) and "\x00" not in sent
    assert "near" in sent and "cup" in sent
    assert any("control token" in w for w in res.warnings) and any("NUL" in w for w in res.warnings)


def test_control_tokens_match_the_model():
    from omg_llava_ros.model.chat_template import IM_END, IM_START, IMAGE_TOKEN
    from omg_llava_ros.model.language_model import MARK_TOKEN, REGION_TOKEN

    assert set(CONTROL_TOKENS) == {IMAGE_TOKEN, REGION_TOKEN, MARK_TOKEN, IM_START, IM_END}


def test_non_utf8_replacement_text_is_a_valid_command(pipeline, model):
    text = b"pick up the \xff\xfe cup".decode("utf-8", errors="replace")
    pipeline.set_command(text)
    assert pipeline.process(frame(1)) is not None and "\ufffd" in model.chats[-1]


def test_bad_inputs_raise_clear_errors_and_keep_state(pipeline):
    with pytest.raises(TypeError, match="str"):
        pipeline.set_command(b"bytes")
    with pytest.raises(ValueError, match="nanosec"):
        pipeline.set_command("x", stamp=(1, 2_000_000_000))
    pipeline.set_command("pick up the red cup")
    for bad in (
        np.zeros((H, W), np.uint8),
        np.zeros((H, W, 3), np.float32),
        np.zeros((0, W, 3), np.uint8),
        "not an array",
    ):
        with pytest.raises(ValueError, match="frame image"):
            pipeline.process(Frame(bad, (1, 0)))
    with pytest.raises(ValueError, match="stamp"):
        pipeline.process(Frame(frame(1).image, (1, -5)))
    assert pipeline.pending  # nothing consumed the command
    assert pipeline.process(frame(2)) is not None


def test_failed_chat_drops_the_command_with_its_id(tiny_model):
    model = CountingModel(tiny_model, fail_chat=True)
    pipe = PerceptionPipeline(model)
    command_id = pipe.set_command("pick up the red cup")
    with pytest.raises(CommandFailedError, match="out of memory") as err:
        pipe.process(frame(1))
    assert err.value.command_id == command_id
    assert not pipe.pending and pipe.process(frame(2)) is None


def test_failed_follow_keeps_follow_mode_for_the_next_frame(pipeline, model):
    pipeline.set_command("pick up the red cup")
    pipeline.process(frame(1))
    model.fail_follow = True
    with pytest.raises(PipelineError, match="follow failed"):
        pipeline.process(frame(2))
    model.fail_follow = False
    assert pipeline.process(frame(3)).follow


def test_answer_on_a_given_frame_ignores_stamps_and_keeps_following(pipeline, model):
    pipeline.set_command("old", stamp=(1000, 0))
    res = pipeline.answer(frame(1), "pick up the red cup")  # goal image far older than "old"
    assert not res.follow and res.command == "pick up the red cup" and res.stamp == (1, 0)
    assert pipeline.process(frame(2)).follow
    with pytest.raises(ValueError, match="empty"):
        pipeline.answer(frame(3), "  ")


def test_command_during_inference_does_not_wait_and_is_answered_next(tiny_model):
    started, release = threading.Event(), threading.Event()

    class SlowModel(CountingModel):
        def chat(self, image, text, **kwargs):
            started.set()
            release.wait(5)
            return super().chat(image, text, **kwargs)

    model = SlowModel(tiny_model)
    pipe = PerceptionPipeline(model, logits_processor=force_answer(tiny_model.tokenizer, ANSWER))
    first = pipe.set_command("first")
    results = []
    worker = threading.Thread(target=lambda: results.append(pipe.process(frame(1))))
    worker.start()
    assert started.wait(5)
    second = pipe.set_command("second")  # must not block on the running chat
    release.set()
    worker.join(5)
    assert results[0].command_id == first  # the running inference reports its own command
    assert pipe.pending and pipe.command.id == second
    assert pipe.process(frame(2)).command_id == second


def test_latency_is_measured_from_receive_time(model, tiny_model):
    now = [100.0]
    pipe = PerceptionPipeline(model, logits_processor=force_answer(tiny_model.tokenizer, ANSWER), clock=lambda: now[0])
    pipe.set_command("x")
    res = pipe.process(frame(1, received_at=99.75))
    assert res.latency_ms == pytest.approx(250.0)


# -- instance image and overlay --------------------------------------------------------------------
def test_instance_image_first_object_wins_and_hidden_objects_get_zero():
    a = np.zeros((4, 5), bool)
    a[1:3, 1:4] = True
    b = np.zeros((4, 5), bool)
    b[2:4, 2:5] = True
    hidden = a.copy()
    ids, present = instance_image([a, b, hidden, np.zeros((4, 5), bool)], (4, 5))
    assert ids[2, 2] == 1 and ids[3, 4] == 2 and ids[0, 0] == 0
    assert present == [1, 2, 0, 0]


def test_overlay_tints_only_instance_pixels():
    image = np.full((4, 4, 3), 100, np.uint8)
    ids = np.zeros((4, 4), np.uint16)
    ids[0, 0] = 1
    out = render_overlay(image, ids, alpha=0.5)
    assert np.array_equal(out[1:, :], image[1:, :])
    assert tuple(out[0, 0]) == (165, 63, 88)  # halfway between grey 100 and palette red (230, 25, 75)


# -- 3D lifting -----------------------------------------------------------------------------------
def test_lift_to_3d_by_hand():
    # K: fx=2, fy=4, cx=1, cy=1. Pixel (u=2, v=1) at 2 m -> x=(2-1)*2/2=1, y=0, z=2.
    # Pixel (u=0, v=2) at 4 m -> x=(0-1)*4/2=-2, y=(2-1)*4/4=1, z=4.
    K = [2.0, 0.0, 1.0, 0.0, 4.0, 1.0, 0.0, 0.0, 1.0]
    depth = np.full((3, 3), np.nan, np.float32)
    depth[1, 2], depth[2, 0], depth[0, 0] = 2.0, 4.0, 1.0
    mask = np.zeros((3, 3), bool)
    mask[1, 2] = mask[2, 0] = mask[2, 2] = True  # (2, 2) has no depth
    points = lift_to_3d(mask, depth, K)
    assert points.dtype == np.float32
    assert sorted(map(tuple, points.tolist())) == [(-2.0, 1.0, 4.0), (1.0, 0.0, 2.0)]
    assert centroid(points).tolist() == [-0.5, 0.5, 3.0]


def test_centroid_is_robust_to_background_pixels():
    points = np.array([[0, 0, 1.0], [0, 0, 1.0], [0, 0, 1.02], [0, 0, 5.0]], np.float32)
    assert centroid(points)[2] == pytest.approx(1.01)
    assert np.isnan(centroid(np.zeros((0, 3)))).all()


def test_lift_rejects_mismatched_shapes_and_bad_intrinsics():
    with pytest.raises(ValueError, match="differ"):
        lift_to_3d(np.ones((2, 2), bool), np.ones((3, 3), np.float32), [1, 0, 0, 0, 1, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="fx"):
        CameraIntrinsics.from_k([0.0] * 9)


def _depth_frame(sec: int, depth: np.ndarray | None, k: CameraIntrinsics | None, depth_stamp=None) -> Frame:
    f = frame(sec)
    return Frame(f.image, f.stamp, f.frame_id, depth, k, depth_stamp)


def test_results_carry_3d_targets_with_depth(pipeline):
    k = CameraIntrinsics(50.0, 50.0, W / 2, H / 2, W, H)
    depth = np.full((H, W), 0.8, np.float32)
    pipeline.set_command("pick up the red cup")
    res = pipeline.process(_depth_frame(1, depth, k, depth_stamp=(1, 10_000_000)))
    for obj in res.objects:
        if obj.mask.any():
            assert obj.target is not None and obj.target.num_points == int(obj.mask.sum())
            assert obj.target.centroid[2] == pytest.approx(0.8)
            v, u = np.nonzero(obj.mask)
            assert obj.target.centroid[0] == pytest.approx(np.median((u - W / 2) * 0.8 / 50.0), abs=1e-5)
    assert res.targets and not res.warnings


@pytest.mark.parametrize(
    "depth, k, depth_stamp, reason",
    [
        (np.ones((H // 2, W // 2), np.float32), "k", None, "does not match the image"),
        (np.ones((H, W), np.float32), None, None, "without camera intrinsics"),
        (np.ones((H, W), np.float32), "k", (2, 0), "ms away from the image"),
        (np.ones((H, W), np.float32), "k_small", None, "camera_info is for"),
        (np.full((H, W), np.nan, np.float32), "k", None, "no valid depth"),
    ],
    ids=["size", "no-intrinsics", "stale", "intrinsics-size", "all-invalid"],
)
def test_missing_or_mismatched_depth_is_reported_not_fatal(pipeline, depth, k, depth_stamp, reason):
    intrinsics = {
        "k": CameraIntrinsics(50.0, 50.0, 32.0, 24.0, W, H),
        "k_small": CameraIntrinsics(50.0, 50.0, 32.0, 24.0, W * 2, H * 2),
        None: None,
    }[k]
    pipeline.set_command("pick up the red cup")
    res = pipeline.process(_depth_frame(1, depth, intrinsics, depth_stamp))
    assert res is not None and len(res.objects) == 2
    assert all(o.target is None for o in res.objects) and res.targets == []
    assert any(reason in w for w in res.warnings), res.warnings


# -- hand-over structures -------------------------------------------------------------------------
def test_latest_frame_slot_keeps_the_newest_and_counts_skipped():
    slot: LatestFrameSlot[int] = LatestFrameSlot()
    assert slot.take(timeout=0) is None
    assert slot.put(1) is False
    assert slot.put(2) is True and slot.put(3) is True
    assert slot.take(timeout=0) == 3
    assert slot.take(timeout=0) is None
    slot.put(4)
    assert slot.take() == 4
    stats = slot.stats
    assert (stats.received, stats.taken, stats.skipped) == (4, 2, 2)


def test_latest_frame_slot_wakes_a_waiting_worker_and_closes():
    slot: LatestFrameSlot[str] = LatestFrameSlot()
    got = []
    worker = threading.Thread(target=lambda: got.append(slot.take(timeout=5)))
    worker.start()
    slot.put("frame")
    worker.join(5)
    assert got == ["frame"]
    closer = threading.Thread(target=lambda: got.append(slot.take(timeout=5)))
    closer.start()
    slot.close()
    closer.join(5)
    assert got == ["frame", None] and not closer.is_alive()


def test_stamped_buffer_pairs_by_nearest_stamp():
    buf: StampedBuffer[str] = StampedBuffer(capacity=2)
    assert buf.closest((1, 0)) is None
    buf.add((1, 0), "a")
    buf.add((2, 0), "b")
    buf.add((3, 0), "c")  # evicts "a"
    stamp, item, offset = buf.closest((1, 100_000_000))
    assert (stamp, item) == ((2, 0), "b") and offset == pytest.approx(0.9)
    assert buf.closest((2, 900_000_000))[1] == "c"
