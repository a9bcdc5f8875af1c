"""Freed memory goes back to the system during long runs (`pipeline.heap`)."""

from __future__ import annotations

import numpy as np
import pytest

from omg_llava_ros.pipeline import Frame, PerceptionPipeline, PipelineConfig
from omg_llava_ros.pipeline.heap import MMAP_THRESHOLD, HeapTrimmer, _glibc_malloc_trim


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


def test_managing_the_heap_fixes_the_mmap_threshold_and_turning_it_off_does_not():
    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 1

    assert HeapTrimmer(100, trim=Counter(), mallopt=mallopt).threshold_fixed
    assert calls == [(-3, MMAP_THRESHOLD)]  # M_MMAP_THRESHOLD
    assert not HeapTrimmer(0, trim=Counter(), mallopt=mallopt).threshold_fixed
    assert len(calls) == 1


_REUSED_BLOCK = """
import ctypes, ctypes.util, os, sys
from omg_llava_ros.pipeline.heap import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
size = 8 << 20
before = resident()
for _ in range(2):  # the second block of the same size is where the dynamic threshold differs
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
print(resident() - before)
"""


@pytest.mark.skipif(_glibc_malloc_trim() is None, reason="needs glibc")
def test_with_the_threshold_fixed_a_freed_8_mb_buffer_leaves_resident_memory():
    import subprocess
    import sys

    def kept(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _REUSED_BLOCK, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert kept("dynamic") >= 6 << 20  # glibc's default: the block stays in the heap
    assert kept("fixed") < 1 << 20
