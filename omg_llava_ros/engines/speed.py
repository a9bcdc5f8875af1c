"""Side-by-side speed of a vision backend against PyTorch eager, for the bench command.

One repeat runs the vision work of a chat turn on one image with each backend: the encoder (image
encoder + pixel decoder), the panoptic pass (all learned queries, with classes), three `[SEG]`-style
single queries, and two visual prompts (point and box, with their attention constraints). The two
backends alternate in blocks of a few repeats, so that load from other processes hits both alike;
the first run of each block is not counted. Switching every run penalises whichever runtime runs
second (measured: ONNX Runtime's encoder 12 ms back to back, 17 ms when each run follows a PyTorch
one; the other runtime's worker threads are still spinning), which a vision loop on one runtime
never sees.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.model.prompt_encoder import EncodedPrompt
from omg_llava_ros.model.vision_backend import TorchVision, VisionBackend

STAGES = ("encode", "panoptic", "seg_queries", "prompts")
BLOCK = 5  # counted repeats per backend before switching


@dataclass
class StageTimes:
    """Median milliseconds per stage and of the whole repeat."""

    encode: float
    panoptic: float
    seg_queries: float
    prompts: float
    total: float


@dataclass
class VisionSpeed:
    """ratio = torch total / backend total (> 1: the backend is faster)."""

    backend: str
    torch: StageTimes
    other: StageTimes
    ratio: float
    repeats: int
    torch_threads: int


def measure_vision_speed(
    model: OmgLlava, backend: VisionBackend | str, repeats: int = 20, warmup: int = 2
) -> VisionSpeed:
    """Time `backend` (an instance, or a name for `select_backend`) against `TorchVision(model)`."""
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    if isinstance(backend, str):
        from omg_llava_ros.engines.backend import select_backend

        backend = select_backend(backend, model)
    reference = TorchVision(model)
    workloads = {"torch": _workload(model, reference), "other": _workload(model, backend)}
    samples: dict[str, list[dict[str, float]]] = {"torch": [], "other": []}
    order = ["torch", "other"]
    with torch.no_grad():
        for _ in range(warmup):
            for name in order:
                workloads[name]()
        while any(len(runs) < repeats for runs in samples.values()):
            for name in order:
                count = min(BLOCK, repeats - len(samples[name]))
                if count > 0:
                    workloads[name]()  # settles the switch; not counted
                    samples[name] += [workloads[name]() for _ in range(count)]
            order.reverse()
    medians = {name: _medians(runs) for name, runs in samples.items()}
    return VisionSpeed(
        backend=backend.name,
        torch=medians["torch"],
        other=medians["other"],
        ratio=medians["torch"].total / medians["other"].total,
        repeats=repeats,
        torch_threads=torch.get_num_threads(),
    )


def _workload(model: OmgLlava, vision: VisionBackend) -> Callable[[], dict[str, float]]:
    size = model.config.image_encoder.image_size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, size, size, generator=gen).to(model.device)
    dec = model.omg_decoder
    c = dec.config.hidden_dim
    seg_q = torch.randn(3, 1, c, generator=gen).to(model.device)
    seg_pos = torch.randn(3, 1, c, generator=gen).to(model.device)
    prompts = [
        EncodedPrompt("point", point=(size * 0.3, size * 0.4)),
        EncodedPrompt("box", box=(10.0, 20.0, size * 0.6, size * 0.5)),
    ]
    prompt_q, prompt_pos = model.prompt_encoder.queries(prompts)

    def run() -> dict[str, float]:
        times = {}
        t0 = time.perf_counter()
        _, memory = vision.encode(pixels)
        t1 = time.perf_counter()
        q, pos = dec.panoptic_queries()
        vision.decode(q, pos, memory, with_class=True)
        t2 = time.perf_counter()
        vision.decode(seg_q, seg_pos, memory)
        t3 = time.perf_counter()
        constraints = model.prompt_encoder.constraints(prompts, memory.level_shapes)
        vision.decode(prompt_q, prompt_pos, memory, constraints)
        _sync(model)
        t4 = time.perf_counter()
        times.update(encode=t1 - t0, panoptic=t2 - t1, seg_queries=t3 - t2, prompts=t4 - t3, total=t4 - t0)
        return times

    return run


def _sync(model: OmgLlava) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _medians(runs: list[dict[str, float]]) -> StageTimes:
    return StageTimes(**{k: 1000 * statistics.median(r[k] for r in runs) for k in (*STAGES, "total")})
