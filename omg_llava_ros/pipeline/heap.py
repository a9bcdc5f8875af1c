"""Giving freed memory back to the system during a long run.

Why: every frame allocates and frees tensors and arrays of sizes that vary with the scene (masks,
object tokens, prompt lengths). glibc's allocator keeps what was freed in its heaps, fragmented,
instead of returning it: over a 3000-frame run of the pipeline resident memory crept up by about
10 MB per 1000 frames, and stayed flat (within ±12 MB) when `malloc_trim` ran every 500 frames.
A robot's node runs for hours, so the pipeline trims the heap every `PipelineConfig.heap_trim_every`
frames. Where the C library has no `malloc_trim` (musl, macOS) nothing is done.

Trimming returns only the free top of each heap. The rest came from glibc's dynamic mmap threshold:
a freed mmapped block raises the threshold to its size, so the next buffers of that size (a long
command's attention buffers, a scene's mask stack) come from the heaps and stay there. Over a
4000-frame soak resident memory then swung by ±100-250 MB from one sample to the next, and its
slope said more about where the swings fell than about a leak. With the threshold fixed at
`MMAP_THRESHOLD` (which also switches the dynamic adjustment off) every block of 1 MB or more is
mapped and unmapped on its own, and the samples of the same run stayed within ±15 MB once warm.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import Any

DEFAULT_EVERY = 100
# Blocks at least this large are mmapped and given back on free (glibc's mallopt M_MMAP_THRESHOLD).
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # find_library runs ldconfig (milliseconds): once a process, not once a pipeline
    library = ctypes.util.find_library("c")
    if library is None:
        return None
    try:
        return ctypes.CDLL(library)
    except OSError:
        return None


def _libc_function(name: str, argtypes: list[Any], restype: Any) -> Any | None:
    """The C library's function `name` with its signature set, or None where there is none."""
    libc = _libc()
    if libc is None:
        return None
    try:
        function = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


def _glibc_malloc_trim() -> Callable[[], None] | None:
    trim = _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
    return None if trim is None else (lambda: trim(0))


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    return _libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD, mallopt: Callable[[int, int], int] | None = None) -> bool:
    """Fix glibc's mmap threshold for this process (see the module docstring); False where there is
    no glibc `mallopt` or it refuses."""
    setter = mallopt if mallopt is not None else _glibc_mallopt()
    return setter is not None and setter(_M_MMAP_THRESHOLD, threshold) == 1


class HeapTrimmer:
    """Call `after_frame()` once a handled frame; every `every` frames it trims the heap (`trim`:
    glibc's malloc_trim by default; 0 frames: never, and the mmap threshold is left as it is).
    With `every` > 0 the process's mmap threshold is fixed first (`fix_mmap_threshold`)."""

    def __init__(
        self,
        every: int = DEFAULT_EVERY,
        trim: Callable[[], None] | None = None,
        mallopt: Callable[[int, int], int] | None = None,
    ):
        if every < 0:
            raise ValueError(f"every must be ≥ 0, got {every}")
        self.every = every
        self._trim = trim if trim is not None else _glibc_malloc_trim()
        self.threshold_fixed = every > 0 and fix_mmap_threshold(mallopt=mallopt)
        self._frames = 0
        self.trims = 0

    def after_frame(self) -> None:
        if self.every == 0 or self._trim is None:
            return
        self._frames += 1
        if self._frames % self.every == 0:
            self._trim()
            self.trims += 1
