"""The frame driver node and replay share: command stamps, outcome sorting, a worker that survives."""

from __future__ import annotations

import logging
import threading

from omg_llava_ros.pipeline.driver import FrameOutcome, process_frame, run_worker, stamp_after
from omg_llava_ros.pipeline.pipeline import CommandFailedError, PipelineError
from omg_llava_ros.pipeline.slot import LatestFrameSlot


def test_a_command_is_stamped_just_after_the_newest_frame():
    assert stamp_after(None) is None
    assert stamp_after((5, 999_999_999)) == (6, 0)  # carries into the seconds


class _Pipeline:
    def __init__(self, outcome):
        self.outcome = outcome

    def process(self, frame):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def test_process_frame_sorts_results_rejections_and_failed_commands():
    assert process_frame(_Pipeline("result"), None) == FrameOutcome(result="result")
    assert process_frame(_Pipeline(None), None) == FrameOutcome()
    rejected = process_frame(_Pipeline(PipelineError("frame too small")), None)
    assert rejected.error == "frame too small" and rejected.failed_command is None and rejected.level == logging.WARNING
    bad_value = process_frame(_Pipeline(ValueError("odd image")), None)
    assert bad_value.error == "odd image" and bad_value.result is None
    failed = process_frame(_Pipeline(CommandFailedError(7, "no answer")), None)
    assert failed.failed_command == 7 and failed.level == logging.ERROR and failed.result is None
    # Anything else is a bug, not an outcome: the worker's crash handler sees it.
    try:
        process_frame(_Pipeline(KeyError("x")), None)
    except KeyError:
        pass
    else:
        raise AssertionError("a KeyError must not be sorted as an outcome")


def test_the_worker_goes_on_after_a_frame_crashes_and_stops_when_the_slot_closes():
    slot: LatestFrameSlot[int] = LatestFrameSlot()
    handled, crashed = [], []
    done = threading.Event()

    def handle(item: int) -> None:
        if item == 2:
            raise RuntimeError("boom")
        handled.append(item)
        if item == 3:
            done.set()

    worker = threading.Thread(target=run_worker, args=(slot, handle, lambda i, e: crashed.append((i, str(e)))))
    worker.start()
    for item in (1, 2, 3):
        slot.put(item)
        while slot.stats.taken < item and worker.is_alive():
            threading.Event().wait(0.005)
    assert done.wait(5)
    slot.close()
    worker.join(5)
    assert not worker.is_alive() and handled == [1, 3] and crashed == [(2, "boom")]


def test_a_polling_worker_ticks_and_stops_when_told():
    slot: LatestFrameSlot[int] = LatestFrameSlot()
    ticks = []
    running = threading.Event()
    running.set()

    def tick() -> None:
        ticks.append(1)
        if len(ticks) >= 3:
            running.clear()

    run_worker(slot, lambda item: None, lambda i, e: None, running.is_set, poll_s=0.01, tick=tick)
    assert len(ticks) == 3  # stopped at the third empty poll, with the slot never closed
