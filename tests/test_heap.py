"""Freed memory goes back to the system during long runs (`pipeline.heap`)."""

from __future__ import annotations

import numpy as np
import pytest

from omg_llava_ros.pipeline import Frame, PerceptionPipeline, PipelineConfig
from omg_llava_ros.pipeline.heap import HeapTrimmer, _glibc_malloc_trim


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_the_heap_is_trimmed_every_n_frames_and_never_at_zero():
    counted = Counter()
    trimmer = HeapTrimmer(3, trim=counted)
    for _ in range(10):
        trimmer.after_frame()
    assert counted.calls == trimmer.trims == 3
    never = Counter()
    off = HeapTrimmer(0, trim=never)
    for _ in range(10):
        off.after_frame()
    assert never.calls == 0
    with pytest.raises(ValueError, match="every"):
        HeapTrimmer(-1)
    with pytest.raises(ValueError, match="heap_trim_every"):
        PipelineConfig(heap_trim_every=-1)


def test_glibc_trim_is_found_and_runs_here():
    trim = _glibc_malloc_trim()
    assert trim is not None  # the CI machine runs glibc
    trim()


def test_every_frame_the_pipeline_is_offered_counts_malformed_ones_too(tiny_model):
    pipeline = PerceptionPipeline(tiny_model, PipelineConfig(heap_trim_every=2))
    counted = Counter()
    pipeline.heap = HeapTrimmer(2, trim=counted)
    image = np.zeros((32, 32, 3), np.uint8)
    for sec in range(1, 4):  # no command: nothing to answer, the frames still count
        assert pipeline.process(Frame(image, (sec, 0), "camera")) is None
    with pytest.raises(ValueError):
        pipeline.process(Frame(np.zeros((0, 4, 3), np.uint8), (5, 0), "camera"))
    assert counted.calls == 2
    assert pipeline.heap.every == 2
