"""`omg-llava-ros bench`: the performance budget on this machine (see omg_llava_ros.bench.runner).

`--config official-7b --device cuda` runs the official-size GPU benchmark instead
(omg_llava_ros.bench.gpu_official). With `--json` the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

from omg_llava_ros.loading import add_model_argument

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("torch", "onnxruntime", "tensorrt", "auto", "triton")


def add_bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="benchmark: per-stage latency, command → mask, follow-mode rate, ONNX Runtime vs PyTorch",
        description="Times the perception pipeline on fresh tabletop frames: every stage, command → first "
        "mask, the follow-mode rate and ONNX Runtime against PyTorch. --config official-7b --device cuda "
        "runs the official-size GPU benchmark with random weights.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_model_argument(p)
    p.add_argument("--config", default=None, help="the same as --model config:NAME (official-7b: the GPU benchmark)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="torch", help="vision backend (default: torch)")
    p.add_argument(
        "--backends",
        nargs="+",
        choices=BACKEND_CHOICES,
        default=None,
        help="bench each of these vision backends in one run (e.g. torch auto), the same model and frames",
    )
    p.add_argument(
        "--load",
        type=int,
        default=0,
        help="keep N busy processes running beside the bench (a machine under the load of a test suite)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch and ONNX Runtime (default: all)")
    p.add_argument("--repeats", type=int, default=10, help="measured commands (each with --follow-frames frames)")
    p.add_argument("--warmup", type=int, default=2, help="discarded warm-up repeats")
    p.add_argument("--follow-frames", type=int, default=10, help="frames followed after each command")
    p.add_argument("--frame", default="256x256", help="camera frame size WxH (default 256x256, the tabletop camera)")
    p.add_argument("--no-onnxruntime", action="store_true", help="skip the ONNX Runtime comparison")
    p.add_argument("--cache-dir", default=None, help="engine cache (ONNX graphs are exported there when missing)")
    p.add_argument("--scripted", action="store_true", help="script the [SEG] answer even for a trained model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--training",
        action="store_true",
        help="time a perception (stage-0) training step of the embedded config instead: prompts in the panoptic "
        "pass against a prompt a batch row (--repeats steps each)",
    )
    p.add_argument(
        "--ros2",
        action="store_true",
        help="time the node on real rclpy instead (needs the ROS workspace sourced): image published -> result "
        "received for the first command after activation (with and without warm-up), commands and follow frames, "
        "beside the same frames in process (--repeats commands, --follow-frames each)",
    )
    p.add_argument(
        "--real-time-frames",
        type=int,
        default=300,
        help="with --ros2: frames of one moving scene published at 30 Hz after the latency runs, answered and "
        "dropped frames counted (0: skip)",
    )
    p.add_argument(
        "--triton-url",
        default="127.0.0.1:8000",
        help="backend triton: the server (omg-llava-ros serve); the run adds its per-call cost and the "
        "throughput of --clients concurrent follow-mode clients against one local pipeline",
    )
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="backend triton: fleet sizes")
    p.set_defaults(func=cmd_bench)
    return p


def parse_frame(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"error: --frame must be WxH, e.g. 640x480, got {text!r}") from None
    if width < 1 or height < 1:
        raise SystemExit(f"error: --frame must be positive, got {text!r}")
    return width, height


def load_bench_model(args: argparse.Namespace) -> tuple[Any, str, str]:
    """(model, source, weights): weights is "trained" or "random". `--config NAME` is `--model
    config:NAME` (`omg_llava_ros.loading`)."""
    from omg_llava_ros.loading import RANDOM_PREFIX, load_model, parse_model_spec

    if args.config is not None and args.model is not None:
        raise SystemExit("error: give --model or --config, not both")
    try:
        spec = parse_model_spec(f"{RANDOM_PREFIX}{args.config}" if args.config is not None else args.model)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    weights = "random" if spec.kind == "random" else "trained"
    try:
        return load_model(spec, device=args.device), str(spec), weights
    except FileNotFoundError as err:
        if args.model is not None:
            raise SystemExit(f"error: {err}") from None
        # Speed does not depend on the weights' values, so the embedded shapes still give the figures.
        log.warning("%s; benchmarking the embedded config with random weights instead", err)
        fallback = parse_model_spec(f"{RANDOM_PREFIX}embedded")
        return load_model(fallback, device=args.device), "config:embedded (no trained model)", "random"


def attach_backend(model: Any, args: argparse.Namespace, threads: int) -> None:
    if args.backend == "triton":
        from omg_llava_ros.engines.triton_backend import TritonOptions, VisionServerError, triton_vision

        try:
            model.vision = triton_vision(model, TritonOptions(url=args.triton_url))
        except (VisionServerError, ValueError) as err:
            raise SystemExit(f"error: vision backend triton: {err}") from None
        return
    if args.backend == "torch":
        from omg_llava_ros.model.vision_backend import TorchVision

        model.vision = TorchVision(model)
        return
    from omg_llava_ros.engines.backend import EngineOptions, select_backend
    from omg_llava_ros.engines.onnxruntime_backend import OrtOptions
    from omg_llava_ros.engines.spec import EngineError

    ort = OrtOptions(device=args.device, intra_op_threads=threads)
    options = EngineOptions(cache_dir=args.cache_dir, build_if_missing=True, ort=ort)
    try:
        model.vision = select_backend(args.backend, model, options)
    except (EngineError, ValueError) as err:
        raise SystemExit(f"error: vision backend {args.backend}: {err}") from None


def set_threads(args: argparse.Namespace) -> int:
    """PyTorch's CPU threads: --threads, or every core this process may use."""
    import torch

    from omg_llava_ros.bench.machine import usable_cores

    threads = args.threads or usable_cores()
    if threads < 1:
        raise SystemExit("error: --threads must be ≥ 1")
    torch.set_num_threads(threads)
    return threads


def cmd_training_bench(args: argparse.Namespace) -> int:
    from omg_llava_ros.bench.training_step import bench_training, format_training_report

    # The tabletop world's classes are the embedded config's: the one preset `train` trains.
    other_model = args.model is not None or args.config not in (None, "embedded")
    if other_model or args.device != "cpu" or args.backend != "torch":
        raise SystemExit("error: --training times the embedded config (random weights) on the CPU, no other model")
    set_threads(args)
    try:
        report = bench_training("embedded", repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(format_training_report(report))
    if args.json:
        print(json.dumps(report))
    return 0


def cmd_node_bench(args: argparse.Namespace) -> int:
    from omg_llava_ros.bench.node_latency import RealTime, bench_node, format_node_report

    if (
        args.model is not None
        or args.config is not None
        or args.device != "cpu"
        or args.backend not in ("torch", "onnxruntime", "auto")
    ):
        raise SystemExit(
            "error: --ros2 times the embedded default on the CPU with --backend torch, onnxruntime or auto (the node's)"
        )
    try:
        from omg_llava_ros.ros.rclpy_node import check_interfaces

        check_interfaces()
    except ImportError as exc:
        from omg_llava_ros.ros.main import ros_setup_hint

        raise SystemExit(f"error: {ros_setup_hint(exc)}") from None
    set_threads(args)

    def progress(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    try:
        if args.real_time_frames < 0:
            raise ValueError("--real-time-frames must be 0 or more")
        real_time = RealTime(frames=args.real_time_frames)
        report = bench_node(args.repeats, args.follow_frames, args.seed, args.backend, progress, real_time)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(format_node_report(report))
    if args.json:
        print(json.dumps(report))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.training:
        return cmd_training_bench(args)
    if args.ros2:
        return cmd_node_bench(args)
    if args.config == "official-7b" or args.model == "official-7b":
        from omg_llava_ros.bench import gpu_official

        if args.device != "cuda":
            raise SystemExit(
                "error: the official size needs a GPU (a 7B LLM in bf16 is ~16 GB): use --device cuda; "
                "`python -m omg_llava_ros.bench.gpu_official --device cpu --config tiny` checks the script on a CPU"
            )
        return gpu_official.main(gpu_official_argv(args))

    import torch

    from omg_llava_ros.bench.runner import BenchOptions, run_bench

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA GPU")
    threads = set_threads(args)
    try:
        options = BenchOptions(
            repeats=args.repeats,
            warmup=args.warmup,
            follow_frames=args.follow_frames,
            frame=parse_frame(args.frame),
            onnxruntime=not args.no_onnxruntime,
            cache_dir=args.cache_dir,
            seed=args.seed,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    model, source, weights = load_bench_model(args)
    options.scripted = args.scripted or weights == "random"

    def progress(msg: str) -> None:
        print(f"bench: {msg}", file=sys.stderr, flush=True)

    reports = {}
    with busy_processes(args.load):
        for backend in args.backends or [args.backend]:
            args.backend = backend
            attach_backend(model, args, threads)
            reports[backend] = run_bench(model, options, source=source, weights=weights, progress=progress)
            reports[backend]["machine"]["busy_processes"] = args.load
    for report in reports.values():
        print(format_report(report))
    if len(reports) > 1:
        print(format_comparison(reports))
    if "triton" in reports:
        from omg_llava_ros.bench.fleet import bench_fleet, format_fleet

        with busy_processes(args.load):
            fleet = bench_fleet(args.triton_url, args.clients, seed=args.seed, progress=progress)
        print(format_fleet(fleet))
        reports["triton"]["fleet"] = fleet
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else next(iter(reports.values()))))
    return 0


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` processes spinning on the CPU for the duration (nothing with `count` 0)."""
    import subprocess

    if count < 0:
        raise SystemExit("error: --load must be ≥ 0")
    spin = "import time\nwhile True:\n    sum(i * i for i in range(10000))\n"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()


def format_comparison(reports: dict[str, dict[str, Any]]) -> str:
    """One line per backend: follow rate and command → mask, and the goals on each."""
    lines = ["", f"{'backend':12s} {'vision':14s} {'follow Hz':>10s} {'command → mask ms':>18s}  goals"]
    for name, r in reports.items():
        goals = ", ".join(
            f"{k} {'met' if g['met'] else 'NOT met'}" for k, g in r["goals"].items() if g["met"] is not None
        )
        follow, command = _ms(r["follow_hz"]), _ms(r["command_to_mask_ms"])
        lines.append(f"{name:12s} {r['model']['backend']:14s} {follow:>10s} {command:>18s}  {goals}")
    return "\n".join(lines)


def gpu_official_argv(args: argparse.Namespace) -> list[str]:
    argv = ["--config", "official-7b", "--device", args.device, "--repeats", str(args.repeats)]
    argv += ["--warmup", str(args.warmup), "--follow-frames", str(args.follow_frames)]
    return argv + (["--json"] if args.json else [])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_report(r: dict[str, Any]) -> str:
    """The report as a readable table (the JSON has everything)."""
    m, mc = r["model"], r["machine"]
    lines = [
        f"OMG-LLaVA bench: {m['source']} ({m['weights']} weights), vision {m['backend']}, {m['device']}, "
        f"{m['threads']} thread(s); answers: {m['answers']}",
        f"machine: {mc['cpu']}, {mc['cores']} core(s), load {mc['load_average']}, torch {mc['torch']}, "
        f"onnxruntime {mc['onnxruntime']}, {mc['date']}" + (f", GPU {mc['gpu']['name']}" if mc.get("gpu") else ""),
        "",
        f"{'stage':24s} {'command ms':>11s} {'follow ms':>10s}  what",
    ]
    for stage, row in r["stages"].items():
        lines.append(f"{stage:24s} {_ms(row['command_ms']):>11s} {_ms(row['follow_ms']):>10s}  {row['note']}")
    lines += [
        "",
        f"command → mask: {_ms(r['command_to_mask_ms'])} ms (median of {r['commands']}, p90 "
        f"{_ms(r['command_to_mask_p90_ms'])}; {r['commands_with_mask']} with a mask; prompt "
        f"{r['prompt_tokens']} tokens, {r['generated_tokens']} generated)",
        f"follow mode: {_ms(r['follow_hz'])} Hz ({_ms(r['follow_frame_ms'])} ms per frame, median of "
        f"{r['follow_frames']} frames)",
    ]
    if r.get("follow_encoder_bound_hz"):
        lines.append(
            f"follow mode's bound on this machine: {r['follow_encoder_bound_hz']:.1f} Hz "
            "(encoder and pixel decoder alone, which every followed frame runs)"
        )
    ort = r.get("onnxruntime")
    if ort:
        lines.append(
            f"ONNX Runtime vs PyTorch (encoder + decoder): {r['onnxruntime_speedup']:.2f}× "
            f"(PyTorch {ort['torch_ms']:.2f} ms, ONNX Runtime {ort['onnxruntime_ms']:.2f} ms, {ort['provider']})"
        )
    goals = ", ".join(
        f"{k} {g['goal']}: {'-' if g['met'] is None else 'met' if g['met'] else 'NOT met'}"
        for k, g in r["goals"].items()
    )
    lines.append(f"goals (embedded model, 2-core CPU): {goals}")
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)
