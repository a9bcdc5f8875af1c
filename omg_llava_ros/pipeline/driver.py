"""The frame driver the node and the replay share: how frames meet the pipeline.

Both hand frames from a reader (transport callbacks, a bag) to one worker through a
`LatestFrameSlot`; both stamp a command strictly after the newest frame already received (that
frame predates the command, so it must not answer it: `stamp_after`); both sort what one frame
gives into a result, an error on that frame, or a command that failed for good
(`process_frame`); and both keep the worker alive whatever a frame does (`run_worker`). What they
do with the outcome — publish, or record and judge — stays theirs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from omg_llava_ros.pipeline.pipeline import CommandFailedError, PerceptionPipeline, PipelineError
from omg_llava_ros.pipeline.slot import LatestFrameSlot
from omg_llava_ros.pipeline.types import Frame, Result, Stamp, ns_to_stamp, stamp_to_ns

T = TypeVar("T")


def stamp_after(latest: Stamp | None) -> Stamp | None:
    """A command's stamp under the "latest_frame" rule: one nanosecond after the newest frame
    received (None before any frame: the next frame answers)."""
    return None if latest is None else ns_to_stamp(stamp_to_ns(latest) + 1)


@dataclass(frozen=True)
class FrameOutcome:
    """What one frame gave. result: the pipeline's output (None: nothing to publish, or an error);
    error: why the frame gave nothing, with its log level; failed_command: the id of a command the
    pipeline gave up on at this frame (CommandFailedError), whose waiters must be told."""

    result: Result | None = None
    error: str | None = None
    level: int = logging.WARNING
    failed_command: int | None = None


def process_frame(pipeline: PerceptionPipeline, frame: Frame) -> FrameOutcome:
    """Run one frame; a failed command or a frame the pipeline rejects becomes an error outcome."""
    try:
        return FrameOutcome(result=pipeline.process(frame))
    except CommandFailedError as exc:
        return FrameOutcome(error=str(exc), level=logging.ERROR, failed_command=exc.command_id)
    except (PipelineError, ValueError) as exc:
        return FrameOutcome(error=str(exc))


def run_worker(
    slot: LatestFrameSlot[T],
    handle: Callable[[T], None],
    on_crash: Callable[[T, Exception], None],
    running: Callable[[], bool] | None = None,
    poll_s: float = 0.2,
    tick: Callable[[], None] | None = None,
) -> None:
    """Handle the newest item of `slot` until it is closed (or, with `running`, until that says
    stop; the slot is then polled every `poll_s` and `tick` runs at each poll). An exception from
    `handle` goes to `on_crash` and the loop goes on: one frame must not stop the worker."""
    while running is None or running():
        item = slot.take(timeout=poll_s if running is not None else None)
        if tick is not None:
            tick()
        if item is None:
            if running is None:
                return  # closed and empty
            continue
        try:
            handle(item)
        except Exception as exc:  # noqa: BLE001 - the worker survives anything a frame can do
            on_crash(item, exc)
