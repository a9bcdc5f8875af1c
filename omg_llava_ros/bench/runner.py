"""`run_bench`: per-stage latency, command → mask, follow-mode rate and the ONNX Runtime speed ratio.

Everything runs through `PerceptionPipeline`, as the ROS node runs it: a command is put in force and
answered on a fresh tabletop frame (`chat`), and the following frames of the same moving scene are
followed (`follow`: encoder, pixel decoder and the cached `[SEG]` queries, masks at the input size).
Each repeat renders two new moving scenes: one runs plain, for the end-to-end numbers, and one runs
under `StageProbe`, for the per-stage table, so the probe's timers never touch the headline figures.
Warm-up repeats are discarded; every figure is a median over the repeats.

With random weights (`scripted=True`) a logits processor scripts the answer "<p> … </p> [SEG]." of the
scene's referring command, so the measured path is the real one ([SEG] state → decoder → mask); a
trained model answers the same command by itself.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omg_llava_ros.bench.machine import load_average, machine_info
from omg_llava_ros.bench.probe import STAGE_NOTES, STAGES, StageProbe
from omg_llava_ros.model.chat_template import IM_END
from omg_llava_ros.model.language_model import LogitsProcessor
from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.pipeline import Frame, PerceptionPipeline, PipelineConfig
from omg_llava_ros.toyworld import sample_moving_scene

log = logging.getLogger(__name__)

# The embedded model's budget on a 2-core CPU (follow at camera rate, a command answered within a
# robot's reaction time), on the default backend and under load.
GOALS: dict[str, tuple[str, float]] = {
    "follow_hz": (">=", 30.0),
    "command_to_mask_ms": ("<=", 150.0),
    "onnxruntime_speedup": (">=", 1.5),
}


@dataclass
class BenchOptions:
    """repeats: measured repeats (each: one plain and one probed command, `follow_frames` frames
    each); frame: (width, height) of the camera frames; scripted: force the [SEG] answer (random
    weights); onnxruntime: also measure ONNX Runtime against PyTorch (exports the graphs when missing)."""

    repeats: int = 10
    warmup: int = 2
    follow_frames: int = 10
    frame: tuple[int, int] = (256, 256)
    scripted: bool = True
    onnxruntime: bool = True
    cache_dir: str | Path | None = None
    seed: int = 0
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.follow_frames < 1:
            raise ValueError("repeats and follow_frames must be ≥ 1 and warmup ≥ 0")
        if min(self.frame) < 1:
            raise ValueError(f"frame size must be positive, got {self.frame}")


@dataclass
class Workload:
    """A fresh moving scene: frames[0] answers `command`, the other frames are followed."""

    frames: list[np.ndarray]
    command: str
    answer: str  # the toy world's reference answer, scripted for random weights


@dataclass
class Sample:
    """One command (and the frames that followed it), plain or probed."""

    command_ms: float
    has_mask: bool
    follow_ms: list[float] = field(default_factory=list)
    command_stages: dict[str, Any] | None = None
    follow_stages: list[dict[str, Any]] = field(default_factory=list)


def make_workloads(options: BenchOptions, count: int, rng: np.random.Generator) -> list[Workload]:
    width, height = options.frame
    side = max(width, height)
    works = []
    for _ in range(count):
        scene = sample_moving_scene(rng, num_frames=1 + options.follow_frames, size=side)
        top, left = (side - height) // 2, (side - width) // 2
        frames = [np.ascontiguousarray(f.image[top : top + height, left : left + width]) for f in scene.frames]
        works.append(Workload(frames, scene.command.question, scene.command.answer))
    return works


def script_answer(tokenizer, answer: str) -> LogitsProcessor:
    """A logits processor that makes any model answer `answer` and stop."""
    target = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(IM_END)]

    def force(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(logits, -1e9)
        out[target[min(len(generated), len(target) - 1)]] = 0.0
        return out

    return force


def device_sync(device: torch.device) -> Callable[[], None] | None:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def run_workload(
    model: OmgLlava,
    work: Workload,
    scripted: bool,
    max_new_tokens: int | None,
    probe: StageProbe | None = None,
) -> Sample:
    """Command on frames[0], then follow mode on the rest, through the pipeline; times each call."""
    sync = device_sync(model.device)
    processor = script_answer(model.tokenizer, work.answer) if scripted else None
    pipe = PerceptionPipeline(model, PipelineConfig(max_new_tokens=max_new_tokens), logits_processor=processor)

    def timed(call: Callable[[], Any]) -> tuple[Any, float]:
        if probe is not None:
            probe.reset()
        t0 = time.perf_counter()
        out = call()
        if sync is not None:
            sync()
        return out, 1000.0 * (time.perf_counter() - t0)

    def command() -> Any:
        pipe.set_command(work.command)
        return pipe.process(Frame(work.frames[0], (1, 0)))

    result, ms = timed(command)
    if result is None:
        raise RuntimeError("the pipeline did not answer the command")
    sample = Sample(ms, has_mask=bool(result.objects))
    if probe is not None:
        sample.command_stages = probe.stages()
    for k, frame in enumerate(work.frames[1:], start=2):
        followed, ms = timed(lambda frame=frame, k=k: pipe.process(Frame(frame, (k, 0))))
        if followed is None:  # nothing grounded: the pipeline idles until the next command
            break
        sample.follow_ms.append(ms)
        if probe is not None:
            sample.follow_stages.append(probe.stages())
    return sample


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)


def stage_table(samples: list[Sample]) -> dict[str, dict[str, Any]]:
    """stage → median ms on the command path and on the follow path (None: not on that path)."""
    commands = [s.command_stages for s in samples if s.command_stages is not None]
    frames = [f for s in samples for f in s.follow_stages]
    fused = any(c.get("fused_encoder") for c in commands + frames)
    table: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        row: dict[str, Any] = {}
        for path, recs in (("command", commands), ("follow", frames)):
            values = [r[stage] for r in recs if r.get(stage) is not None]
            row[f"{path}_ms"] = _round(_median(values))
        row["note"] = STAGE_NOTES[stage]
        if fused and stage == "encoder":
            row["note"] = "encoder + pixel decoder: one engine graph"
        if fused and stage == "pixel_decoder":
            row["note"] = "inside the encoder graph"
        table[stage] = row
    return table


def measure_onnxruntime(
    model: OmgLlava, threads: int, repeats: int, warmup: int, cache_dir: str | Path | None
) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on the same vision work, alternating within each repeat
    (engines.speed.measure_vision_speed); the graphs are exported into the cache when missing."""
    from omg_llava_ros.engines.backend import EngineOptions, select_backend
    from omg_llava_ros.engines.onnxruntime_backend import OrtOptions
    from omg_llava_ros.engines.speed import measure_vision_speed

    device = "cuda" if model.device.type == "cuda" else "cpu"
    # Its own session whatever --backend is, with the same threads as PyTorch, spinning inside a
    # run only: an ORT worker busy-waiting between runs would steal the core the PyTorch half of a
    # repeat runs on (measured: PyTorch 35 → 65 ms), no spinning at all costs ORT ≈ 10 %.
    ort = OrtOptions(device=device, intra_op_threads=threads, spin_between_runs=False)
    options = EngineOptions(cache_dir=cache_dir, build_if_missing=True, ort=ort)
    backend = select_backend("onnxruntime", model, options)
    speed = measure_vision_speed(model, backend, repeats=repeats, warmup=warmup)
    return {
        "speedup": speed.ratio,
        "torch_ms": speed.torch.total,
        "onnxruntime_ms": speed.other.total,
        "stages_ms": {
            "torch": {k: _round(v) for k, v in asdict(speed.torch).items()},
            "onnxruntime": {k: _round(v) for k, v in asdict(speed.other).items()},
        },
        "work": "encoder + pixel decoder, panoptic decode, 3 [SEG] queries, 2 visual prompts",
        "repeats": speed.repeats,
        "threads": threads,
        "provider": backend.sessions["encoder"].get_providers()[0] if hasattr(backend, "sessions") else backend.name,
    }


def check_goals(report: dict[str, Any], targets: dict[str, tuple[str, float]]) -> dict[str, dict[str, Any]]:
    goals = {}
    for key, (op, bound) in targets.items():
        value = report.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        goals[key] = {"goal": f"{op} {bound:g}", "value": value, "met": met}
    return goals


def time_workloads(
    model: OmgLlava,
    works: list[Workload],
    warmup: int,
    scripted: bool,
    max_new_tokens: int | None = None,
    probe: StageProbe | None = None,
    context: Callable[[StageProbe | None], AbstractContextManager[Any]] | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """Pairs of workloads: the first of each pair runs plain, the second under `probe`; the first
    `warmup` pairs are dropped. `context(probe or None)` wraps every run (autocast, a generator)."""
    probe = probe or StageProbe(model, device_sync(model.device))
    context = context or (lambda _probe: nullcontext())
    plain: list[Sample] = []
    probed: list[Sample] = []
    for i in range(len(works) // 2):
        with context(None):
            a = run_workload(model, works[2 * i], scripted, max_new_tokens)
        with context(probe), probe:
            b = run_workload(model, works[2 * i + 1], scripted, max_new_tokens, probe)
        if i >= warmup:
            plain.append(a)
            probed.append(b)
    return plain, probed


def summarise(plain: list[Sample], probed: list[Sample]) -> dict[str, Any]:
    """The end-to-end figures (plain runs) and the stage table (probed runs), with notes."""
    notes: list[str] = []
    with_mask = [s.command_ms for s in plain if s.has_mask]
    if not with_mask:
        notes.append("no command was answered with a mask: command_to_mask_ms is the command latency")
    command_ms = with_mask or [s.command_ms for s in plain]
    follow_ms = [ms for s in plain for ms in s.follow_ms]
    follow_median = _median(follow_ms)
    if not follow_ms:
        notes.append("no answer grounded an object, so there was nothing to follow")
    commands = [s.command_stages for s in probed if s.command_stages]
    tokens = [c["generated_tokens"] for c in commands if c.get("generated_tokens") is not None]
    prompt = [c["prompt_tokens"] for c in commands if c.get("prompt_tokens") is not None]
    stages = stage_table(probed)
    # Every followed frame runs the image encoder and pixel decoder: the most follow mode could reach
    # on this machine if everything else on a frame took no time.
    image_ms = [(stages.get(k) or {}).get("follow_ms") for k in ("encoder", "pixel_decoder")]
    encoder_ms = sum(ms for ms in image_ms if ms) if image_ms[0] else None
    return {
        "command_to_mask_ms": _round(_median(command_ms)),
        "command_to_mask_p90_ms": _round(_percentile(command_ms, 90)),
        "commands": len(plain),
        "commands_with_mask": sum(s.has_mask for s in plain),
        "follow_hz": _round(1000.0 / follow_median if follow_median else None),
        "follow_frame_ms": _round(follow_median),
        "follow_frame_p90_ms": _round(_percentile(follow_ms, 90)),
        "follow_frames": len(follow_ms),
        "follow_encoder_bound_hz": _round(1000.0 / encoder_ms if encoder_ms else None),
        "prompt_tokens": _median(prompt),
        "generated_tokens": _median(tokens),
        "stages": stages,
        "notes": notes,
    }


def run_bench(
    model: OmgLlava,
    options: BenchOptions | None = None,
    source: str = "",
    weights: str = "random",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The whole benchmark as one JSON-ready dict (see the module docstring)."""
    options = options or BenchOptions()
    say = progress or (lambda msg: log.info("%s", msg))
    threads = torch.get_num_threads()
    rng = np.random.default_rng(options.seed)
    started = time.perf_counter()
    machine = machine_info()

    total = options.warmup + options.repeats
    say(f"rendering {2 * total} moving scenes of {1 + options.follow_frames} frames")
    works = make_workloads(options, 2 * total, rng)
    say(f"timing {total} commands ({options.warmup} warm-up) and {total * options.follow_frames} follow frames")
    plain, probed = time_workloads(model, works, options.warmup, options.scripted, options.max_new_tokens)
    summary = summarise(plain, probed)
    notes = summary.pop("notes")

    report: dict[str, Any] = {
        "bench": "omg-llava-ros",
        "model": {
            "source": source,
            "config": model.config.name,
            "weights": weights,
            "backend": model.vision.name,
            "device": str(model.device),
            "threads": threads,
            "answers": "scripted <p> … </p> [SEG]." if options.scripted else "the model's own",
        },
        "machine": machine,
        **summary,
        "onnxruntime_speedup": None,
        "onnxruntime": None,
    }
    if options.onnxruntime:
        say("timing ONNX Runtime against PyTorch (encoder + decoder)")
        try:
            ort = measure_onnxruntime(model, threads, options.repeats, options.warmup, options.cache_dir)
            report["onnxruntime_speedup"] = _round(ort["speedup"], 4)
            report["onnxruntime"] = ort
        except Exception as err:  # a missing runtime or a failed export must not cost the other numbers
            notes.append(f"ONNX Runtime not measured: {type(err).__name__}: {err}")
    report["goals"] = check_goals(report, GOALS)
    report["machine"]["load_average_after"] = load_average()
    report["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()}
    report["options"]["cache_dir"] = None if options.cache_dir is None else str(options.cache_dir)
    report["wall_s"] = _round(time.perf_counter() - started, 1)
    report["notes"] = notes
    return report
