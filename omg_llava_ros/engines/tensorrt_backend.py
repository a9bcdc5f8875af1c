"""TensorRT 10 vision backend: build engines from the exported ONNX and run them on torch CUDA tensors.

Standard TensorRT 10 Python API only: `OnnxParser` → network, one optimisation profile over the
dynamic axes (encoder images; decoder batch and query count), FP16 by default, FP32 on request,
INT8 (implicit quantisation with an entropy calibrator) only when asked for explicitly. Inference
uses `set_input_shape` / `set_tensor_address` with torch tensors and `execute_async_v3` on torch's
current CUDA stream, so results are ordered with the surrounding torch work without extra syncs.

TensorRT cannot be installed on the development machines; this file is kept small and standard
and everything around it (cache keys, rebuild decisions, graph checks) is tested without it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omg_llava_ros.engines.cache import BuildEnvironment, Profile
from omg_llava_ros.engines.graph_vision import GraphVision
from omg_llava_ros.engines.spec import (
    BackendUnavailableError,
    EngineBuildError,
    EngineShapes,
    GraphSpec,
    memory_positions,
)

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "TensorRT's Python bindings are not installed. On a Jetson (JetPack 6.x): "
    "`sudo apt install python3-libnvinfer python3-libnvinfer-dev`; on a desktop GPU: "
    "`pip install tensorrt` (wheels come from NVIDIA's index, pypi.nvidia.com). See engines/README.md"
)


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as err:
        raise BackendUnavailableError(INSTALL_HINT) from err
    return tensorrt


def tensorrt_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def gpu_environment(trt: Any) -> BuildEnvironment:
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU and torch sees none")
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return BuildEnvironment(trt.__version__, torch.cuda.get_device_name(index), f"{major}.{minor}")


def trtexec_command(onnx_path: Path, profile: Profile, precision: str, engine_path: Path) -> str:
    """The `trtexec` command line that builds (about) the same engine as `TensorRTBuilder`
    (it does not pin normalisations and reductions to FP32, and writes no cache record)."""

    def shapes(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, mm[which]))}" for name, mm in profile.items())

    parts = [f"trtexec --onnx={onnx_path}"]
    parts += [f"--{flag}={shapes(i)}" for i, flag in enumerate(("minShapes", "optShapes", "maxShapes"))]
    parts += {"fp16": ["--fp16"], "fp32": [], "int8": ["--int8", "--fp16"]}[precision]
    parts.append(f"--saveEngine={engine_path}")
    return " \\\n    ".join(parts)


class TensorRTBuilder:
    """Builds and deserializes engines (the `EngineBuilder` of the cache).

    calibration: for INT8 only, per role ("encoder"/"decoder") a list of input dicts (numpy) that
    the entropy calibrator feeds one by one.
    """

    def __init__(self, workspace_gb: float = 2.0, calibration: dict[str, list[dict[str, np.ndarray]]] | None = None):
        self.trt = import_tensorrt()
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.workspace_gb = workspace_gb
        self.calibration = calibration or {}
        self._runtime = None

    def environment(self) -> BuildEnvironment:
        return gpu_environment(self.trt)

    def build(self, onnx_path: Path, profile: Profile, precision: str, role: str) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gb * (1 << 30)))
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
            # Normalisations and reductions overflow or lose their small epsilons in FP16.
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                if layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.REDUCE):
                    layer.precision = trt.float32
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        if precision == "int8":
            # The [SEG] decoder copy takes the same inputs as the decoder.
            batches = self.calibration.get(role) or self.calibration.get("decoder" if role == "seg_decoder" else role)
            if not batches:
                raise EngineBuildError(f"INT8 needs calibration inputs for the {role}; none were given")
            log.warning("INT8 %s engine: implicit quantisation with %d calibration inputs", role, len(batches))
            config.set_flag(trt.BuilderFlag.INT8)
            config.int8_calibrator = _make_calibrator(trt, batches)
            config.set_calibration_profile(opt_profile)
        log.info("building TensorRT %s engine (%s) from %s — this takes minutes", role, precision, onnx_path.name)
        data = builder.build_serialized_network(network, config)
        if data is None:
            raise EngineBuildError(f"TensorRT failed to build the {role} engine from {onnx_path} (see its log)")
        return bytes(data)

    def deserialize(self, data: bytes) -> Any:
        if self._runtime is None:
            self._runtime = self.trt.Runtime(self.logger)
        return self._runtime.deserialize_cuda_engine(data)


def _make_calibrator(trt: Any, batches: list[dict[str, np.ndarray]]) -> Any:
    """An entropy calibrator over `batches`. It keeps no calibration cache: a cache outliving its
    ONNX file would silently calibrate a changed graph with old scales."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.index = 0
            self.buffers: list[torch.Tensor] = []

        def get_batch_size(self) -> int:
            return 1  # each calibration input carries its own batch dimension

        def get_batch(self, names: Sequence[str]) -> list[int] | None:
            if self.index >= len(batches):
                return None
            feed = batches[self.index]
            self.index += 1
            self.buffers = [torch.from_numpy(np.ascontiguousarray(feed[n])).cuda() for n in names]
            return [int(t.data_ptr()) for t in self.buffers]

        def read_calibration_cache(self) -> None:
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            pass

    return Calibrator()


_TORCH_TYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BOOL": torch.bool,
    "INT32": torch.int32,
    "INT64": torch.int64,
}


class TrtEngine:
    """One deserialized engine with its execution context; runs on torch CUDA tensors."""

    def __init__(self, engine: Any, trt: Any):
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _TORCH_TYPES[engine.get_tensor_dtype(n).name] for n in names}

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ctx = self.context
        keep = []  # inputs live until the stream reaches the engine (same-stream reuse is ordered)
        for name in self.inputs:
            t = feeds[name].to(device="cuda", dtype=self.dtypes[name]).contiguous()
            keep.append(t)
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"input {name!r} of shape {tuple(t.shape)} is outside the engine's profile")
            ctx.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            ctx.set_tensor_address(name, out.data_ptr())
            outs[name] = out
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        return outs


class TensorRTVision(GraphVision):
    """`VisionBackend` over an encoder and a decoder engine. Calls larger than the profile are split
    over the batch (batch items are independent); more queries per item than max_queries is an error."""

    name = "tensorrt"

    def __init__(
        self, engines: dict[str, Any], spec: GraphSpec, shapes: EngineShapes, device: torch.device | str = "cuda"
    ):
        trt = import_tensorrt()
        self.engines = {role: TrtEngine(engine, trt) for role, engine in engines.items()}
        self.spec, self.shapes, self.device = spec, shapes, torch.device(device)
        self.positions = memory_positions(spec, self.device)

    def run_encoder(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        step = self.shapes.max_images
        encoder = self.engines["encoder"]
        parts = [encoder.run({"pixels": pixels[i : i + step]}) for i in range(0, len(pixels), step)]
        return {k: torch.cat([p[k] for p in parts]).to(self.device) for k in parts[0]}

    def run_decoder(
        self, role: str, feeds: dict[str, torch.Tensor], batch: int, queries: int
    ) -> dict[str, torch.Tensor]:
        if queries > self.shapes.max_queries:
            raise ValueError(
                f"{queries} queries per item but the decoder engine was built for at most {self.shapes.max_queries}; "
                "rebuild it with `omg-llava-ros build-engines --max-queries N`"
            )
        engine, step = self.engines[role], self.shapes.max_batch
        per_item = {"query", "query_pos", "use_prediction", *self.spec.allowed_names}  # memories: one image
        parts = []
        for i in range(0, batch, step):
            chunk = {k: (v[i : i + step] if k in per_item else v) for k, v in feeds.items()}
            parts.append(engine.run(chunk))
        return {k: torch.cat([p[k] for p in parts]).to(self.device) for k in parts[0]}
