"""`omg-llava-ros build-engines`: export, check and build the vision engines ahead of time."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omg_llava_ros.loading import add_model_argument

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def add_build_engines_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "build-engines",
        help="export the vision graphs to ONNX and build TensorRT engines into the engine cache",
        description="Export the encoder and decoder graphs to ONNX (checked for TensorRT 10), and for "
        "--backend tensorrt build the engines. Cached results that still match are reused.",
    )
    add_model_argument(p)
    p.add_argument(
        "--backend",
        choices=("onnxruntime", "tensorrt"),
        default=None,
        help="default: tensorrt when it is installed and a GPU exists, else onnxruntime",
    )
    p.add_argument("--precision", choices=("fp16", "fp32", "int8"), default="fp16", help="TensorRT precision")
    p.add_argument("--max-queries", type=int, default=None, help="queries per decoder call (default: the model's)")
    p.add_argument("--max-batch", type=int, default=16, help="decoder batch: prompts / [SEG] queries per call")
    p.add_argument("--opt-queries", type=int, default=8, help="query count TensorRT tunes for")
    p.add_argument("--workspace-gb", type=float, default=2.0, help="TensorRT builder workspace")
    p.add_argument("--cache-dir", default=None, help="engine cache folder (default: engines/cache)")
    p.add_argument("--calibration", default=None, help="INT8 only: a folder of calibration images")
    p.add_argument("--force", action="store_true", help="export and build again even when the cache matches")
    p.add_argument("--trtexec", action="store_true", help="export, then print the equivalent trtexec commands")
    p.set_defaults(func=cmd_build_engines)
    return p


def cmd_build_engines(args: argparse.Namespace) -> int:
    import torch

    from omg_llava_ros.engines.backend import EngineOptions, build_engines
    from omg_llava_ros.engines.spec import EngineError
    from omg_llava_ros.engines.tensorrt_backend import tensorrt_importable
    from omg_llava_ros.loading import cli_model as load_model

    if args.trtexec:
        return print_trtexec(args)
    backend = args.backend
    if backend is None:
        backend = "tensorrt" if tensorrt_importable() and torch.cuda.is_available() else "onnxruntime"
        log.warning("build-engines: backend %s", backend)
    if args.precision == "int8" and backend != "tensorrt":
        raise SystemExit("error: --precision int8 applies to TensorRT engines only (--backend tensorrt)")
    if args.precision == "int8" and args.calibration is None:
        raise SystemExit("error: --precision int8 needs --calibration DIR (a folder of representative images)")
    model = load_model(args.model)
    options = EngineOptions(
        cache_dir=args.cache_dir,
        precision=args.precision,
        max_queries=args.max_queries,
        max_batch=args.max_batch,
        opt_queries=args.opt_queries,
        workspace_gb=args.workspace_gb,
    )
    if args.calibration is not None:
        options.calibration = calibration_inputs(model, Path(args.calibration))
    try:
        summary = build_engines(model, backend, options, force=args.force)
    except (EngineError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"model folder: {summary.directory}")
    for role, path in summary.onnx.items():
        report = summary.reports[role]
        print(f"  {role} ONNX: {path.name} (opset {report.opset}, {sum(report.ops.values())} nodes, checks passed)")
    for role, path in summary.engines.items():
        print(f"  {role} TensorRT engine ({args.precision}): {path.name}")
    return 0


def print_trtexec(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from omg_llava_ros.engines.backend import EngineOptions, prepare_onnx
    from omg_llava_ros.engines.cache import EngineCache
    from omg_llava_ros.engines.tensorrt_backend import trtexec_command
    from omg_llava_ros.loading import cli_model as load_model

    model = load_model(args.model)
    options = EngineOptions(
        cache_dir=args.cache_dir, max_queries=args.max_queries, max_batch=args.max_batch, opt_queries=args.opt_queries
    )
    exported = prepare_onnx(model, replace(options, build_if_missing=True), force=args.force)
    shapes, cache = options.shapes(model), EngineCache(exported.directory)
    for role in exported.roles:
        profile = shapes.encoder_profile(exported.spec) if role == "encoder" else shapes.decoder_profile(exported.spec)
        # Not the cache's own file name: an engine without a key record would be rebuilt anyway.
        engine = cache.path_for(role, args.precision).with_suffix(".trtexec.engine")
        print(trtexec_command(exported.path(role), profile, args.precision, engine))
    return 0


def calibration_inputs(model, folder: Path, limit: int = 64) -> dict[str, list[dict]]:
    """INT8 calibration inputs from images: encoder pixels, and decoder inputs of the panoptic pass."""
    import cv2
    import torch

    from omg_llava_ros.engines.graph_vision import decoder_feeds
    from omg_llava_ros.engines.spec import GraphSpec
    from omg_llava_ros.model.vision_backend import TorchVision

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit] if folder.is_dir() else []
    if not files:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    spec, vision = GraphSpec.from_model(model), TorchVision(model)
    out: dict[str, list[dict]] = {"encoder": [], "decoder": []}
    with torch.no_grad():
        for path in files:
            image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            pixels, _ = model.preprocess(image)
            _, memory = vision.encode(pixels)
            q, pos = model.omg_decoder.panoptic_queries()
            feeds = decoder_feeds(spec, q, pos, memory, None)
            out["encoder"].append({"pixels": pixels.cpu().numpy()})
            out["decoder"].append({k: v.contiguous().cpu().numpy() for k, v in feeds.items()})
    return out
