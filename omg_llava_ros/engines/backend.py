"""Choosing, preparing and building the vision backend of a model.

`select_backend(name, model)` returns the `VisionBackend` to put in `model.vision`:
- "torch": the model's own modules;
- "onnxruntime": the exported graphs in ONNX Runtime (CUDA provider when present, else CPU);
- "tensorrt": TensorRT engines from the cache (built from the exported graphs);
- "auto": TensorRT if it is importable and a GPU exists, else ONNX Runtime with CUDA, else ONNX
  Runtime on the CPU; a choice whose files are not built yet is skipped with a warning, and the
  choice is logged.
Nothing is exported or built at load time unless `EngineOptions.build_if_missing` is set; otherwise
a missing or stale file raises EngineNotBuiltError naming the `omg-llava-ros build-engines` command.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from omg_llava_ros.engines import tensorrt_backend
from omg_llava_ros.engines.cache import EngineBuilder, EngineCache, EngineKey, engines_root, load_or_build
from omg_llava_ros.engines.export import (
    EXPORT_META,
    ExportedModel,
    GraphReport,
    export_onnx,
    load_exported,
    model_fingerprint,
    verify_graph,
)
from omg_llava_ros.engines.onnxruntime_backend import OnnxRuntimeVision, OrtOptions, cuda_provider_available
from omg_llava_ros.engines.refiner_graphs import export_refiner, onnxruntime_refiner
from omg_llava_ros.engines.spec import (
    PRECISIONS,
    BackendUnavailableError,
    EngineBuildError,
    EngineNotBuiltError,
    EngineShapes,
)

if TYPE_CHECKING:
    from omg_llava_ros.model.omg_llava import OmgLlava
    from omg_llava_ros.model.vision_backend import VisionBackend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


@dataclass
class EngineOptions:
    """How engines are found and built. max_queries: None → the model's learned query count."""

    cache_dir: str | Path | None = None
    precision: str = "fp16"
    build_if_missing: bool = False
    max_queries: int | None = None
    max_batch: int = 16
    max_images: int = 1
    opt_queries: int = 8
    workspace_gb: float = 2.0
    ort: OrtOptions = field(default_factory=lambda: OrtOptions(device="auto"))
    calibration: dict[str, list[dict[str, Any]]] | None = None  # INT8 only (TensorRTBuilder)
    # "auto" on a machine with no CUDA GPU: export the ONNX graphs once when the cache lacks them
    # (about 20 s for the embedded model on a 2-core CPU, logged) and run ONNX Runtime, about 2.5x
    # PyTorch's vision speed there; False falls back to PyTorch vision instead. TensorRT engines
    # (minutes) are never built unasked.
    export_on_cpu: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def shapes(self, model: OmgLlava) -> EngineShapes:
        q = self.max_queries if self.max_queries is not None else model.config.decoder.num_queries
        return EngineShapes(q, self.max_batch, self.max_images, self.opt_queries)


def model_directory(model: OmgLlava, options: EngineOptions, fingerprint: str | None = None) -> Path:
    fingerprint = fingerprint or model_fingerprint(model)
    return engines_root(options.cache_dir) / f"{model.config.name}-{fingerprint[:16]}"


BUILD_IF_MISSING_HINT = "set build_if_missing=True to build at start"


def build_hint(backend: str, options: EngineOptions) -> str:
    cmd = f"omg-llava-ros build-engines --model <model dir> --backend {backend}"
    if backend == "tensorrt":
        cmd += f" --precision {options.precision}"
        if options.max_queries is not None:
            cmd += f" --max-queries {options.max_queries}"
    if options.cache_dir is not None:
        cmd += f" --cache-dir {options.cache_dir}"
    return f"Build it ahead of time with `{cmd}`, or {BUILD_IF_MISSING_HINT}"


def prepare_onnx(
    model: OmgLlava, options: EngineOptions, force: bool = False, backend: str = "onnxruntime"
) -> ExportedModel:
    """The model's exported graphs from the cache; exported when missing or stale only if allowed.
    `backend` only completes the build-engines command named in the error."""
    fingerprint = model_fingerprint(model)
    directory = model_directory(model, options, fingerprint)
    if not force:
        try:
            return load_exported(directory, fingerprint)
        except EngineNotBuiltError as err:
            if not options.build_if_missing:
                raise EngineNotBuiltError(f"{err}. {build_hint(backend, options)}") from None
            # A first export is routine; replacing a stale or damaged one deserves a warning.
            stale = (directory / EXPORT_META).is_file()
            log.log(logging.WARNING if stale else logging.INFO, "%s: exporting the ONNX graphs", err)
    return export_onnx(model, directory)


def onnxruntime_vision(model: OmgLlava, options: EngineOptions, device: str | None = None) -> OnnxRuntimeVision:
    exported = prepare_onnx(model, options)
    ort = options.ort if device is None else replace(options.ort, device=device)
    vision = OnnxRuntimeVision(exported, ort, device=model.device)
    if model.mask_refiner is not None and vision.options.device == "cpu" and model.device.type == "cpu":
        # On a GPU the refiner stays in PyTorch there; on the CPU ONNX Runtime runs it ~5x faster.
        vision.refiner = onnxruntime_refiner(
            model.mask_refiner, exported.directory, vision.options, options.build_if_missing
        )
    return vision


def tensorrt_engines(
    model: OmgLlava, options: EngineOptions, builder: EngineBuilder, force: bool = False
) -> tuple[ExportedModel, dict[str, Any]]:
    """The deserialized engine of every exported graph (role → engine), from the cache or (re)built."""
    exported = prepare_onnx(model, options, backend="tensorrt")
    shapes = options.shapes(model)
    env = builder.environment()
    cache = EngineCache(exported.directory)
    engines = {}
    for role in exported.roles:
        path = exported.path(role)
        profile = shapes.encoder_profile(exported.spec) if role == "encoder" else shapes.decoder_profile(exported.spec)
        key = EngineKey.make(role, exported.hashes[role], env, options.precision, profile)

        def build(path: Path = path, profile: dict = profile, role: str = role) -> bytes:
            return builder.build(path, profile, options.precision, role)

        engines[role] = load_or_build(
            cache, key, build, builder.deserialize, options.build_if_missing, build_hint("tensorrt", options), force
        )
    return exported, engines


def tensorrt_vision(model: OmgLlava, options: EngineOptions) -> VisionBackend:
    builder = tensorrt_backend.TensorRTBuilder(options.workspace_gb, options.calibration)
    exported, engines = tensorrt_engines(model, options, builder)
    if model.device.type != "cuda":
        log.warning("TensorRT runs on the GPU but the model is on %s: every call copies across", model.device)
    return tensorrt_backend.TensorRTVision(engines, exported.spec, options.shapes(model), model.device)


def select_backend(name: str, model: OmgLlava, options: EngineOptions | None = None) -> VisionBackend:
    """The vision backend `name` (one of BACKENDS) for `model`; see the module docstring."""
    from omg_llava_ros.model.vision_backend import TorchVision

    if name not in BACKENDS:
        raise ValueError(f"unknown vision backend {name!r}; choose one of {BACKENDS}")
    options = options or EngineOptions()
    if name == "torch":
        return TorchVision(model)
    if model.device.type == "meta":
        raise ValueError("a model on the meta device has no weights to export; load weights first")
    if name == "onnxruntime":
        return onnxruntime_vision(model, options)
    if name == "tensorrt":
        if not tensorrt_backend.tensorrt_importable():
            raise BackendUnavailableError(tensorrt_backend.INSTALL_HINT)
        return tensorrt_vision(model, options)
    return _auto(model, options)


def select_backend_or_torch(
    name: str,
    model: OmgLlava,
    options: EngineOptions | None = None,
    hint: str = "Build engines ahead of time with `omg-llava-ros build-engines`",
    logger: logging.Logger | Any = log,
) -> VisionBackend:
    """`select_backend`, except that "auto" with no usable engine (a GPU machine where none is built
    yet) gives PyTorch vision with a warning ending in `hint`: the node and `replay` start anyway,
    slower. A backend asked for by name still raises with the reason."""
    from omg_llava_ros.model.vision_backend import TorchVision

    try:
        return select_backend(name, model, options)
    except Exception as exc:
        if name != "auto":
            raise
        logger.warning("no vision engine usable, falling back to PyTorch vision (slower): %s. %s", exc, hint)
        return TorchVision(model)


def _auto(model: OmgLlava, options: EngineOptions) -> VisionBackend:
    skipped: list[str] = []
    not_built = False
    gpu = torch.cuda.is_available()
    if not tensorrt_backend.tensorrt_importable():
        skipped.append("TensorRT: not installed")
    elif not gpu:
        skipped.append("TensorRT: no CUDA GPU")
    else:
        try:
            backend = tensorrt_vision(model, options)
            log.info("vision backend (auto): TensorRT %s on %s", options.precision, torch.cuda.get_device_name())
            return backend
        except (EngineNotBuiltError, BackendUnavailableError) as err:
            not_built |= isinstance(err, EngineNotBuiltError)
            skipped.append(f"TensorRT: {err}")
            log.warning("vision backend (auto): TensorRT not usable: %s", err)
    devices = ["cpu"]
    if cuda_provider_available() and gpu:
        devices.insert(0, "cuda")
    else:
        skipped.append("ONNX Runtime CUDA: " + ("no CUDA execution provider" if gpu else "no CUDA GPU"))
    for device in devices:
        opts = options
        if device == "cpu" and not gpu and options.export_on_cpu and not options.build_if_missing:
            fingerprint = model_fingerprint(model)
            directory = model_directory(model, options, fingerprint)
            try:
                load_exported(directory, fingerprint)
            except EngineNotBuiltError:
                log.warning(
                    "vision backend (auto): no GPU and no usable ONNX graphs in %s: exporting them once "
                    "(about 20 s for the embedded model on a 2-core CPU; later starts reuse them)",
                    directory,
                )
            opts = replace(options, build_if_missing=True)
        try:
            backend = onnxruntime_vision(model, opts, device=device)
        except (EngineNotBuiltError, BackendUnavailableError) as err:
            not_built |= isinstance(err, EngineNotBuiltError)
            skipped.append(f"ONNX Runtime {device.upper()}: {err}")
            continue
        log.info("vision backend (auto): ONNX Runtime on %s (skipped: %s)", device.upper(), "; ".join(skipped) or "-")
        return backend
    error = EngineNotBuiltError if not_built else BackendUnavailableError
    raise error("no vision engine backend is usable:\n  " + "\n  ".join(skipped))


@dataclass
class BuildSummary:
    """What `build_engines` produced."""

    backend: str
    directory: Path
    onnx: dict[str, Path]
    reports: dict[str, GraphReport]
    engines: dict[str, Path] = field(default_factory=dict)


def build_engines(
    model: OmgLlava,
    backend: str,
    options: EngineOptions,
    force: bool = False,
    builder: EngineBuilder | None = None,
) -> BuildSummary:
    """Export (if needed) and check the graphs; for TensorRT also build (if needed) both engines."""
    if backend not in ("onnxruntime", "tensorrt"):
        raise ValueError(f"build-engines builds for 'onnxruntime' or 'tensorrt', not {backend!r}")
    if backend == "tensorrt" and builder is None and not tensorrt_backend.tensorrt_importable():
        raise BackendUnavailableError(tensorrt_backend.INSTALL_HINT)  # before a possibly long export
    options = replace(options, build_if_missing=True)
    exported = prepare_onnx(model, options, force=force)
    onnx = {role: exported.path(role) for role in exported.roles}
    summary = BuildSummary(backend, exported.directory, onnx, {role: verify_graph(p) for role, p in onnx.items()})
    if backend == "onnxruntime":
        OnnxRuntimeVision(exported, replace(options.ort, device="cpu"))  # the sessions must load
        if model.mask_refiner is not None:  # its graphs run on the CPU only, beside these
            if force:
                export_refiner(model.mask_refiner, exported.directory)
            cpu = replace(options.ort, device="cpu")
            refiner = onnxruntime_refiner(model.mask_refiner, exported.directory, cpu, build_if_missing=True)
            if refiner is None:
                raise EngineBuildError(f"the mask refiner's ONNX graphs could not be made in {exported.directory}")
            summary.onnx.update(refiner.paths)
            summary.reports.update({role: verify_graph(p) for role, p in refiner.paths.items()})
        return summary
    builder = builder or tensorrt_backend.TensorRTBuilder(options.workspace_gb, options.calibration)
    tensorrt_engines(model, options, builder, force=force)
    cache = EngineCache(exported.directory)
    summary.engines = {role: cache.path_for(role, options.precision) for role in exported.roles}
    return summary


def vision_backend_plugin(
    name: str, model: OmgLlava, options: EngineOptions | dict[str, Any] | None = None
) -> VisionBackend:
    """The entry point behind `omg_llava_ros.model.vision_backend.load_vision_backend` for the
    engines' names (pyproject.toml, group `omg_llava_ros.vision_backends`); a dict of options is read
    as `EngineOptions` fields."""
    if isinstance(options, dict):
        options = EngineOptions(**options)
    return select_backend(name, model, options)
