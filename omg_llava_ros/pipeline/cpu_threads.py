"""How many CPU threads the model's work gets, from how much of the machine other processes use.

Why: on a 2-core CPU the model runs fastest on both cores (ONNX Runtime's and PyTorch's thread pools,
2 threads each), but a robot's CPU is shared (planner, SLAM, drivers). Beside two busy processes,
2-thread pools spend their time waiting at each operator's barrier for a thread the OS has put
aside: `bench --load 2` measured command → mask 973 ms and follow mode 5.2 Hz, against 315 ms and
7.6 Hz with one thread (and 132 ms / 18.5 Hz against 178 ms / 13.1 Hz on an idle machine, where
two threads win). So the pipeline measures, every `period_s`, the cores the rest of the machine
kept busy (all CPU time in /proc/stat minus this process's own) and gives its work the cores left:
`round(cores - others)`, at least 1, at most `max_threads`.

Where /proc/stat is missing (not Linux) nothing changes. A GPU model is left alone: its CPU threads
only feed the device.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PERIOD_S = 2.0


def machine_busy_seconds() -> float | None:
    """CPU seconds every core of the machine has spent busy since boot (/proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    # guest time is already counted in user and nice
    busy = sum(ticks[:8]) - idle
    return busy / os.sysconf("SC_CLK_TCK")


class ThreadGovernor:
    """Call `tick(vision)` once a frame: every `period_s` it re-decides the thread count, and it keeps
    PyTorch's and the vision backend's (where it has `set_threads`) at that count.

    max_threads: the most threads to use (default: PyTorch's thread count when the governor is made,
    which is what `--threads` and the machine's cores set). Threads are the process's, so the
    pipelines of one process share one governor (`shared_governor`). The readers and the clock are
    injectable for tests: `read_machine` as `machine_busy_seconds`, `read_self` this process's CPU
    seconds, `torch_threads` a (get, set) pair as torch.get_num_threads / torch.set_num_threads.
    """

    def __init__(
        self,
        max_threads: int | None = None,
        cores: int | None = None,
        period_s: float = DEFAULT_PERIOD_S,
        read_machine: Callable[[], float | None] = machine_busy_seconds,
        read_self: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        torch_threads: tuple[Callable[[], int], Callable[[int], None]] | None = None,
    ):
        if period_s <= 0:
            raise ValueError(f"period_s must be positive, got {period_s}")
        if torch_threads is None:
            import torch

            torch_threads = (torch.get_num_threads, torch.set_num_threads)
        self._get_torch_threads, self._set_torch_threads = torch_threads
        self.cores = cores or os.cpu_count() or 1
        self.max_threads = max(1, max_threads or self._get_torch_threads())
        self.period_s = period_s
        self._read_machine, self._read_self, self._clock = read_machine, read_self, clock
        self.threads = self.max_threads
        self.others: float | None = None  # cores the rest of the machine used in the last period
        self.changes = 0
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        machine = self._read_machine()
        return None if machine is None else (self._clock(), machine, self._read_self())

    def tick(self, vision: Any = None) -> int:
        """Re-decide when a period has passed, keep PyTorch and `vision` at the count; returns it."""
        if self._last is None:  # nothing to measure here: leave every setting alone
            return self.threads
        now = self._clock()
        if now - self._last[0] >= self.period_s:
            self._decide()
        if self._get_torch_threads() != self.threads:
            self._set_torch_threads(self.threads)
        if hasattr(vision, "set_threads") and getattr(vision, "threads", self.threads) != self.threads:
            vision.set_threads(self.threads)
        return self.threads

    def _decide(self) -> None:
        sample = self._sample()
        if sample is None or self._last is None:
            return
        wall = sample[0] - self._last[0]
        self.others = max(0.0, ((sample[1] - self._last[1]) - (sample[2] - self._last[2])) / wall)
        self._last = sample
        wanted = min(self.max_threads, max(1, round(self.cores - self.others)))
        if wanted != self.threads:
            log.info(
                "other processes kept %.1f of %d cores busy: the model's work now runs on %d thread(s)",
                self.others,
                self.cores,
                wanted,
            )
            self.threads = wanted
            self.changes += 1


_shared: ThreadGovernor | None = None
_shared_lock = threading.Lock()


def shared_governor() -> ThreadGovernor:
    """The process's one governor, made on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ThreadGovernor()
        return _shared
