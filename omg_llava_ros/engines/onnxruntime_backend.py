"""ONNX Runtime vision backend: the exported encoder and decoder graphs on the CPU or CUDA provider.

On the CPU, tensors cross as numpy arrays (zero-copy for contiguous CPU tensors). With the CUDA
provider and a model on the GPU, inputs and outputs are bound to torch CUDA tensors by pointer
(I/O binding), so the per-image memories never travel through host memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from omg_llava_ros.engines.cache import atomic_write
from omg_llava_ros.engines.export import ExportedModel
from omg_llava_ros.engines.graph_vision import GraphVision, decoder_feeds, decoder_role  # noqa: F401 - re-exported
from omg_llava_ros.engines.spec import BackendUnavailableError, GraphSpec, memory_positions

log = logging.getLogger(__name__)

OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
_NUMPY_TYPES = {torch.float32: np.float32, torch.bool: np.bool_}


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendUnavailableError(
            "ONNX Runtime is not installed: `pip install onnxruntime` (CPU) or `pip install onnxruntime-gpu` (CUDA)"
        ) from err
    return onnxruntime


def fuse_gelu(path: str) -> bytes:
    """The graph at `path` with every erf GELU as one `com.microsoft.Gelu` node, serialised.

    The torch exporter writes GELU as Div → Erf → Add → Mul with `x · 0.5` on a side branch, a form
    ONNX Runtime's built-in GELU fusion does not match (its profile showed all 12 of the encoder's
    GELUs as five element-wise kernels each); the fusion tool shipped with ONNX Runtime does, after
    which the session also folds the bias in (BiasGelu). Same function, exact erf form. TensorRT
    reads the unfused file and fuses on its own.
    """
    import onnx
    from onnxruntime.transformers.fusion_gelu import FusionGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(path))
    FusionGelu(model).apply()
    model.prune_graph()
    return model.model.SerializeToString()


def session_graph(exported: ExportedModel, role: str) -> str | bytes:
    """What a session loads for `role`: the graph with its GELUs fused, written once beside the
    export as `{role}.{sha}.ort.onnx` (named after the exported file's hash, so a re-export never
    meets a stale copy) and read from there on later starts; fused in memory where the folder is
    read-only."""
    fused = exported.directory / f"{role}.{exported.hashes[role][:16]}.ort.onnx"
    if fused.is_file():
        return str(fused)
    graph = fuse_gelu(str(exported.path(role)))
    try:
        atomic_write(fused, graph)
    except OSError as err:
        log.info("ONNX Runtime graph for %s kept in memory (%s)", role, err)
    return graph


def cuda_provider_available() -> bool:
    try:
        return "CUDAExecutionProvider" in import_onnxruntime().get_available_providers()
    except BackendUnavailableError:
        return False


@dataclass
class OrtOptions:
    """Session settings. device: "cpu", "cuda" or "auto" (CUDA when ONNX Runtime and torch both see a
    GPU); optimization: one of OPTIMIZATION_LEVELS.
    allow_spinning=False stops worker threads from busy-waiting at all (kinder to a shared CPU, slower:
    every operator then wakes its workers through the OS); spin_between_runs=False keeps them
    spinning only inside a run, so that nothing spins while the LLM or another process computes."""

    device: str = "cpu"
    intra_op_threads: int = 2
    inter_op_threads: int = 1
    optimization: str = "all"
    device_id: int = 0
    allow_spinning: bool = True
    spin_between_runs: bool = False

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"OrtOptions.device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(f"OrtOptions.optimization must be one of {OPTIMIZATION_LEVELS}, got {self.optimization!r}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("thread counts must be ≥ 0 (0 lets ONNX Runtime choose)")


def session_options(opts: OrtOptions, threads: int) -> Any:
    """ONNX Runtime session options for `opts` with `threads` intra-op threads."""
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = opts.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opts.optimization]
    if not opts.allow_spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif not opts.spin_between_runs:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


class OnnxRuntimeVision(GraphVision):
    """`VisionBackend` over ONNX Runtime sessions of an `ExportedModel`. Returns tensors on `device`
    (the model's device). The decoder returns only the final mask logits (`mask_logits[-1]`)."""

    name = "onnxruntime"

    def __init__(self, exported: ExportedModel, options: OrtOptions | None = None, device: torch.device | str = "cpu"):
        ort = import_onnxruntime()
        self.options = options or OrtOptions()
        self.spec: GraphSpec = exported.spec
        self.device = torch.device(device)
        opts = self.options
        if opts.device == "auto":
            gpu = "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()
            opts = self.options = replace(opts, device="cuda" if gpu else "cpu")
        if opts.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    "ONNX Runtime has no CUDA execution provider here (install onnxruntime-gpu, and a GPU driver)"
                )
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": opts.device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self._exported, self._providers = exported, providers
        self._sessions_by_threads: dict[int, dict[str, Any]] = {}
        self.sessions = self._sessions(opts.intra_op_threads)
        self.positions = memory_positions(self.spec, self.device)
        self._io_binding = opts.device == "cuda" and self.device.type == "cuda"
        log.info(
            "ONNX Runtime vision backend: %s, %d intra-op thread(s), optimisation %s",
            self.sessions["encoder"].get_providers()[0],
            opts.intra_op_threads,
            opts.optimization,
        )

    def _sessions(self, threads: int) -> dict[str, Any]:
        """One session per graph with `threads` intra-op threads, made on first use and kept."""
        if threads not in self._sessions_by_threads:
            ort, so = import_onnxruntime(), session_options(self.options, threads)
            self._sessions_by_threads[threads] = {
                role: ort.InferenceSession(session_graph(self._exported, role), so, providers=self._providers)
                for role in self._exported.roles
            }
        return self._sessions_by_threads[threads]

    @property
    def threads(self) -> int:
        return self.options.intra_op_threads

    def set_threads(self, threads: int) -> None:
        """Run the graphs on `threads` intra-op threads from now on (CPU only; an ONNX Runtime session's
        thread pool is fixed, so each count has its own sessions, made the first time it is asked for)."""
        if threads < 1:
            raise ValueError(f"threads must be ≥ 1, got {threads}")
        if self.options.device != "cpu" or threads == self.options.intra_op_threads:
            return
        self.sessions = self._sessions(threads)
        if self.refiner is not None:
            self.refiner.set_threads(threads)
        self.options = replace(self.options, intra_op_threads=threads)

    # -- GraphVision ----------------------------------------------------------------------------
    def run_encoder(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._run(self.sessions["encoder"], {"pixels": pixels}, self.spec.encoder_output_shapes(len(pixels)))

    def run_decoder(
        self, role: str, feeds: dict[str, torch.Tensor], batch: int, queries: int
    ) -> dict[str, torch.Tensor]:
        return self._run(self.sessions[role], feeds, self.spec.decoder_output_shapes(batch, queries))

    # -- running ----------------------------------------------------------------------------------
    def _run(self, session: Any, feeds: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]):
        if self._io_binding:
            return self._run_bound(session, feeds, shapes)
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in feeds.items()}
        names = list(shapes)
        results = session.run(names, arrays)
        return {k: torch.from_numpy(v).to(self.device) for k, v in zip(names, results, strict=True)}

    def _run_bound(self, session: Any, feeds: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]):
        binding = session.io_binding()
        dev = self.options.device_id
        keep = []  # the contiguous inputs must outlive the run
        for name, t in feeds.items():
            t = t.detach().to(self.device).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", dev, _NUMPY_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        outs = {name: torch.empty(shape, dtype=torch.float32, device=self.device) for name, shape in shapes.items()}
        for name, t in outs.items():
            binding.bind_output(name, "cuda", dev, np.float32, tuple(t.shape), t.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # ORT runs on its own stream
        session.run_with_iobinding(binding)
        return outs
