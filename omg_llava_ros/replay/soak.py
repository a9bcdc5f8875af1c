"""Soak: a long replay of generated moving scenes with commands and planted bad frames.

    omg-llava-ros soak [--frames 10000] [--seed 0] [--model SPEC] [--backend auto] [--json]

What a fielded node must promise over a long run, measured: no crash, every command answered or
reported, every planted bad frame reported (by its stamp, or its log time where the bytes give no
stamp), resident memory flat, latency at the end as at the start (judged on follow frames, the same
work at both ends). The stream is generated while it is replayed (`GeneratedSource`, the same
methods as a bag's `BagSource`, CDR bytes as a recorder writes them), so 10 000 frames need no disk
and the generator holds one frame at a time.

The run: scenes of the tabletop world (`../shared/toyworld.md`) moving at 30 Hz stamps, a new scene
at each command; a command every 50-200 frames drawn from referring commands (expressions of every
form, drawn form first), questions, stop (empty) commands, 5 kB commands and commands carrying the
model's control tokens; 1% of the frames replaced by one of `BAD_FRAME_KINDS`, each of which the
image converters or the deserialiser must reject.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omg_llava_ros.pipeline.types import NANOSECONDS, ns_to_stamp, stamp_to_ns
from omg_llava_ros.replay.bag import IMAGE, STRING, BagMessage, DecodeError, TopicInfo
from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.image_conversion import rgb_to_image_fields

IMAGE_TOPIC = "/camera/color/image_raw"
COMMAND_TOPIC = "/omg_llava/command"
START_NS = 1_704_067_200 * NANOSECONDS
CONTROL_TOKENS = ("<image>", "[SEG]", "<region>", "<|im_end|>", "<|im_start|>", "<p>", "</p>", "<s>", "</s>")
# Planted frames, each rejected by a different check (`ros.image_conversion`, `ros.messages`, CDR).
BAD_FRAME_KINDS = (
    "truncated_bytes",  # the CDR bytes cut short: no message at all
    "short_data",  # data shorter than step × height
    "unknown_encoding",
    "zero_size",
    "step_too_small",  # rows shorter than width × channels
    "stamp_out_of_range",  # nanosec ≥ 1e9
    "huge_dimensions",  # height × step beyond any real camera, with a few bytes of data
)


@dataclass
class SoakConfig:
    frames: int = 10_000
    seed: int = 0
    size: int = 256
    fps: float = 30.0
    command_every: tuple[int, int] = (50, 200)
    bad_share: float = 0.01
    rss_every: int = 100  # frames between resident-memory samples
    window: int = 1000  # frames at the start and the end whose latency p95 is compared (follow frames: the pass)

    def __post_init__(self) -> None:
        if self.frames < 1 or not 1 <= self.command_every[0] <= self.command_every[1]:
            raise ValueError("frames must be positive and command_every a (low, high) range of positive counts")
        if not 0 <= self.bad_share < 1:
            raise ValueError(f"bad_share must be in [0, 1), got {self.bad_share}")


@dataclass
class Planted:
    """What the generator sent, to check the replay's account against."""

    bad: list[tuple[str, int, tuple[int, int] | None]] = field(default_factory=list)  # kind, log ns, stamp
    commands: list[tuple[str, int]] = field(default_factory=list)  # kind, log ns
    rss: list[tuple[int, float]] = field(default_factory=list)  # frames sent, resident MB


def resident_mb() -> float:
    """This process's resident set size in MB (Linux /proc; the peak from getrusage elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _command(rng: np.random.Generator, rendered: Any) -> tuple[str, str]:
    """(kind, text) of one drawn command about `rendered`."""
    from omg_llava_ros.toyworld.conversations import REFERRING_TEMPLATES, sample_conversation
    from omg_llava_ros.toyworld.referring import enumerate_expressions

    kind = ("referring", "referring", "referring", "question", "stop", "long", "control")[int(rng.integers(7))]
    if kind == "question":
        task = ("counting", "attribute", "existence", "caption")[int(rng.integers(4))]
        return kind, sample_conversation(rng, rendered, task, ref_mode="any").question
    if kind == "stop":
        return kind, ""
    named = [(t, e) for t in range(len(rendered.objects)) for e in enumerate_expressions(rendered, t)]
    forms = sorted({e.form for _, e in named})
    form = forms[int(rng.integers(len(forms)))]
    pool = [e for _, e in named if e.form == form]
    expression = pool[int(rng.integers(len(pool)))].text
    text = REFERRING_TEMPLATES[int(rng.integers(len(REFERRING_TEMPLATES)))].format(ref=expression)
    if kind == "long":
        filler = " ".join(["please"] * 900)  # about 5 kB
        return kind, f"{text} {filler}"[:5120]
    if kind == "control":
        tokens = " ".join(CONTROL_TOKENS[int(i)] for i in rng.integers(len(CONTROL_TOKENS), size=4))
        return kind, f"{tokens} {text} {tokens}"
    return kind, text


def _bad_frame(kind: str, good: dict[str, Any], conv: Any) -> bytes:
    """Serialised Image bytes of one planted bad frame, made from a good frame's fields."""
    f = dict(good)
    if kind == "truncated_bytes":
        raw = conv.serialize(IMAGE, f)
        return bytes(raw[: len(raw) // 3])
    if kind == "short_data":
        f["data"] = np.asarray(f["data"])[: len(f["data"]) // 2]
    elif kind == "unknown_encoding":
        f["encoding"] = "yuv_made_up"
    elif kind == "zero_size":
        f.update(width=0, height=0, step=0, data=np.zeros(0, dtype=np.uint8))
    elif kind == "step_too_small":
        f["step"] = f["width"] * 2  # rgb8 rows need width × 3
    elif kind == "stamp_out_of_range":
        f["header"] = {**f["header"], "stamp": {**f["header"]["stamp"], "nanosec": 2_000_000_000}}
    elif kind == "huge_dimensions":
        f.update(height=1_000_000, width=1_000_000, step=3_000_000, data=np.zeros(16, dtype=np.uint8))
    else:
        raise ValueError(f"unknown bad frame kind {kind!r}")
    return bytes(conv.serialize(IMAGE, f))


class GeneratedSource:
    """A bag's `BagSource`, generated: images and commands of `SoakConfig` in recorded order."""

    ros1 = False
    storage = "generated"
    type_notes: list[str] = []

    def __init__(self, config: SoakConfig, planted: Planted):
        self.config, self.planted = config, planted
        self.path = Path(f"generated-soak-seed{config.seed}")
        self.conv = m.RosbagsMessages(m.make_typestore())
        self.typestore = self.conv.typestore
        self.custom = {"omg_llava_ros.image_topic": IMAGE_TOPIC, "omg_llava_ros.command_topic": COMMAND_TOPIC}

    @property
    def topics(self) -> dict[str, TopicInfo]:
        return {
            COMMAND_TOPIC: TopicInfo(COMMAND_TOPIC, STRING, 0),
            IMAGE_TOPIC: TopicInfo(IMAGE_TOPIC, IMAGE, self.config.frames),
        }

    def messages(self, topics: Sequence[str]) -> Iterator[BagMessage]:
        from omg_llava_ros.toyworld.moving import iter_moving_frames

        cfg, planted = self.config, self.planted
        rng = np.random.default_rng(cfg.seed)
        period = round(NANOSECONDS / cfg.fps)
        sent = 0
        while sent < cfg.frames:
            length = min(int(rng.integers(cfg.command_every[0], cfg.command_every[1] + 1)), cfg.frames - sent)
            for k, rendered in enumerate(iter_moving_frames(rng, length, cfg.size)):
                stamp_ns = START_NS + sent * period
                if k == 0 and COMMAND_TOPIC in topics:
                    kind, text = _command(rng, rendered)
                    planted.commands.append((kind, stamp_ns - 1))
                    yield BagMessage(
                        COMMAND_TOPIC, STRING, stamp_ns - 1, bytes(self.conv.serialize(STRING, {"data": text}))
                    )
                header = m.header_fields(ns_to_stamp(stamp_ns), "camera")
                fields = {"header": header, **rgb_to_image_fields(rendered.image)}
                if rng.random() < cfg.bad_share:
                    kind = BAD_FRAME_KINDS[int(rng.integers(len(BAD_FRAME_KINDS)))]
                    stamp = None if kind in ("truncated_bytes", "stamp_out_of_range") else ns_to_stamp(stamp_ns)
                    planted.bad.append((kind, stamp_ns, stamp))
                    raw = _bad_frame(kind, fields, self.conv)
                else:
                    raw = bytes(self.conv.serialize(IMAGE, fields))
                sent += 1
                if sent % cfg.rss_every == 0:
                    planted.rss.append((sent, resident_mb()))
                if IMAGE_TOPIC in topics:
                    yield BagMessage(IMAGE_TOPIC, IMAGE, stamp_ns, raw)

    def deserialize(self, msg: BagMessage) -> Any:
        try:
            return self.typestore.deserialize_cdr(bytes(msg.raw), msg.msgtype)
        except Exception as exc:  # rosbags raises struct/index/value errors for bad CDR
            raise DecodeError(f"{msg.msgtype} does not deserialise: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        pass


def _slope_per_1000(samples: list[tuple[int, float]]) -> float | None:
    """Least-squares slope (MB per 1000 frames) of the last 80% of the samples."""
    tail = samples[len(samples) // 5 :]
    if len(tail) < 3:
        return None
    x = np.array([s[0] for s in tail], dtype=float)
    y = np.array([s[1] for s in tail], dtype=float)
    return float(np.polyfit(x, y, 1)[0] * 1000)


def _p95(values: list[float]) -> float | None:
    return float(np.percentile(values, 95)) if values else None


def _drift(latencies: list[float], window: int) -> tuple[float | None, float | None, float | None]:
    """p95 of the first and of the last `window` latencies, and last / first."""
    first, last = _p95(latencies[:window]), _p95(latencies[-window:])
    return first, last, (last / first if first and last is not None else None)


def run_soak(model: Any, config: SoakConfig | None = None) -> dict[str, Any]:
    """Replay the generated stream through a pipeline around `model`; the figures as a dict, with
    `passed` per promise (crashes, commands, bad frames, memory, latency)."""
    from omg_llava_ros.replay.runner import ReplayConfig, Replayer

    config = config or SoakConfig()
    planted = Planted()
    started = time.monotonic()
    outcome = Replayer(model, ReplayConfig(thumbnails_per_command=1)).run(
        "generated", None, source=GeneratedSource(config, planted)
    )
    crashes = [e for e in outcome.errors if e.reason.startswith("unexpected error")]
    reported_stamps = {stamp_to_ns(e.stamp) for e in outcome.errors if e.stamp is not None}
    reported_logs = {e.log_time_ns for e in outcome.errors if e.log_time_ns is not None}
    missed = [
        (kind, log_ns)
        for kind, log_ns, stamp in planted.bad
        if not (stamp is not None and stamp_to_ns(stamp) in reported_stamps) and log_ns not in reported_logs
    ]
    command_logs = {c.log_time_ns: c for c in outcome.commands}
    unanswered = [
        (kind, log_ns)
        for kind, log_ns in planted.commands
        if log_ns not in command_logs
        or not (command_logs[log_ns].answered or command_logs[log_ns].stop or command_logs[log_ns].warnings)
    ]
    latencies = [r.latency_ms for r in outcome.records if r.latency_ms is not None]
    p95_first, p95_last, ratio = _drift(latencies, config.window)
    # The same work at both ends: a window's command answers (LLM calls, as long as the answer)
    # depend on which commands the draw put there; follow frames cost the same all run long.
    follow = [r.latency_ms for r in outcome.records if r.latency_ms is not None and r.follow]
    follow_first, follow_last, follow_ratio = _drift(follow, config.window)
    slope = _slope_per_1000(planted.rss)
    by_kind = dict(Counter(kind for kind, _, _ in planted.bad))
    command_kinds = dict(Counter(kind for kind, _ in planted.commands))
    return {
        "frames": config.frames,
        "seed": config.seed,
        "wall_s": round(time.monotonic() - started, 1),
        "frames_processed": outcome.processed_frames,
        "results": outcome.results,
        "crashes": len(crashes),
        "commands": {
            "sent": len(planted.commands),
            "by_kind": command_kinds,
            "unanswered_unreported": len(unanswered),
            "examples": unanswered[:5],
        },
        "bad_frames": {
            "planted": len(planted.bad),
            "by_kind": by_kind,
            "not_reported": len(missed),
            "examples": missed[:5],
        },
        "errors": len(outcome.errors),
        "rss_mb": {
            "first": round(planted.rss[0][1], 1) if planted.rss else None,
            "last": round(planted.rss[-1][1], 1) if planted.rss else None,
            "slope_last_80pct_mb_per_1000_frames": None if slope is None else round(slope, 3),
            "every_frames": config.rss_every,
            "samples": [round(mb, 1) for _, mb in planted.rss],
        },
        "latency_p95_ms": {
            "first_window": None if p95_first is None else round(p95_first, 1),
            "last_window": None if p95_last is None else round(p95_last, 1),
            "last_over_first": None if ratio is None else round(ratio, 3),
            "window_frames": config.window,
            "follow_frames": {
                "first_window": None if follow_first is None else round(follow_first, 1),
                "last_window": None if follow_last is None else round(follow_last, 1),
                "last_over_first": None if follow_ratio is None else round(follow_ratio, 3),
            },
        },
        "passed": {
            "no_crash": not crashes,
            "every_command_answered_or_reported": not unanswered,
            "every_bad_frame_reported": not missed,
            "memory_flat": slope is not None and slope < 1.0,
            "latency_held": follow_ratio is not None and follow_ratio <= 1.10,
        },
    }


def add_soak_parser(sub: Any) -> None:
    from omg_llava_ros.loading import add_model_argument

    p = sub.add_parser("soak", help="a long replay of generated scenes with commands and bad frames (JSON figures)")
    p.add_argument("--frames", type=int, default=SoakConfig.frames)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bad-share", type=float, default=SoakConfig.bad_share, help="share of planted bad frames")
    p.add_argument("--window", type=int, default=SoakConfig.window, help="frames whose latency p95 is compared")
    p.add_argument("--threads", type=int, default=2, help="most CPU threads the model uses (PyTorch, ONNX Runtime)")
    add_model_argument(p)
    p.add_argument(
        "--backend", default="auto", help="vision backend, as the node's parameter (default auto: what the node runs)"
    )
    p.add_argument("--json", action="store_true", help="one line of JSON")
    p.set_defaults(func=cmd_soak)


def cmd_soak(args: Any) -> int:
    """Exit 0 when every promise held, 1 otherwise (the JSON says which)."""
    import json

    import torch

    from omg_llava_ros.loading import cli_model

    torch.set_num_threads(args.threads)
    model = cli_model(args.model, backend=args.backend)
    config = SoakConfig(frames=args.frames, seed=args.seed, bad_share=args.bad_share, window=args.window)
    report = run_soak(model, config)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0 if all(report["passed"].values()) else 1
