"""The mask refiner's two convolution stacks as ONNX graphs, run by ONNX Runtime on the CPU.

Why: the refiner works on small crops (about 60 x 60 pixels, 16 channels), where PyTorch's CPU
convolutions cost about 5x ONNX Runtime's (1.75 against 0.37 ms for guide and head on a 64 x 64 crop,
2 threads); on a follow frame that was 8 of 27 ms. The crops themselves are still chosen by
`MaskRefiner.forward`; only `image_features` and `correct` (`RefinerCompute`) run here.

Two graphs, any crop size (height and width are dynamic):
- guide: pixels (1, 3, H, W) → features (1, C, H, W);
- head: logits (1, H, W) upsampled to the input size, features (1, C, H, W) → refined logits (1, H, W).
They live beside the vision graphs in the model's engine folder, named after a hash of the refiner's
weights (`refiner_guide.<hash>.onnx`, `refiner_head.<hash>.onnx`): the folder is named after the
encoder's and decoder's weights only, so a retrained refiner gets new files. Exporting takes a few
seconds; it happens when the vision graphs may be exported (`build_if_missing`, `build-engines`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from omg_llava_ros.engines.export import EXPORT_FORMAT, export_graph
from omg_llava_ros.engines.onnxruntime_backend import OrtOptions, import_onnxruntime, session_options
from omg_llava_ros.engines.spec import EngineBuildError

if TYPE_CHECKING:
    from omg_llava_ros.model.mask_refiner import MaskRefiner

log = logging.getLogger(__name__)

ROLES = ("refiner_guide", "refiner_head")


class RefinerGuideGraph(nn.Module):
    def __init__(self, refiner: MaskRefiner):
        super().__init__()
        self.refiner = refiner

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.refiner.image_features(pixels)


class RefinerHeadGraph(nn.Module):
    def __init__(self, refiner: MaskRefiner):
        super().__init__()
        self.refiner = refiner

    def forward(self, up: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.refiner.correct(up, features)


def refiner_fingerprint(refiner: MaskRefiner) -> str:
    """A content hash of the refiner's weights and of the export format."""
    h = hashlib.sha256(f"refiner:{EXPORT_FORMAT}".encode())
    for name, tensor in sorted(refiner.state_dict().items()):
        t = tensor.detach().to("cpu").float().contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def refiner_paths(refiner: MaskRefiner, directory: str | Path) -> dict[str, Path]:
    """role → the file of that graph for these weights in the engine folder `directory`."""
    tag = refiner_fingerprint(refiner)[:16]
    return {role: Path(directory) / f"{role}.{tag}.onnx" for role in ROLES}


def export_refiner(refiner: MaskRefiner, directory: str | Path) -> dict[str, Path]:
    """Export both graphs (float32, CPU) into `directory`; EngineBuildError if the exporter fails."""
    paths = refiner_paths(refiner, directory)
    Path(directory).mkdir(parents=True, exist_ok=True)
    module = copy.deepcopy(refiner).float().to("cpu").eval()  # the model's own copy keeps its dtype
    channels = module.guide[-1].out_channels
    # Distinct example sizes above 1, so that neither dimension is specialised to a constant.
    height = torch.export.Dim("height", min=2, max=4096)
    width = torch.export.Dim("width", min=2, max=4096)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 37, 41, generator=gen)
    up, features = torch.randn(1, 37, 41, generator=gen), torch.randn(1, channels, 37, 41, generator=gen)
    guide_dims = ({2: height, 3: width},)
    export_graph(RefinerGuideGraph(module), (pixels,), paths["refiner_guide"], ["pixels"], ["features"], guide_dims)
    head_dims = ({1: height, 2: width}, {2: height, 3: width})
    head = RefinerHeadGraph(module)
    export_graph(head, (up, features), paths["refiner_head"], ["up", "features"], ["refined"], head_dims)
    return paths


class OnnxRuntimeRefiner:
    """`RefinerCompute` over ONNX Runtime CPU sessions of the two graphs; tensors in and out are torch
    CPU tensors (the outputs in the inputs' dtype)."""

    def __init__(self, paths: dict[str, Path], options: OrtOptions | None = None):
        self.paths = paths
        self.options = options or OrtOptions(device="cpu")
        self._sessions_by_threads: dict[int, dict[str, Any]] = {}
        self.sessions = self._sessions(self.options.intra_op_threads)

    def _sessions(self, threads: int) -> dict[str, Any]:
        if threads not in self._sessions_by_threads:
            ort, so = import_onnxruntime(), session_options(self.options, threads)
            self._sessions_by_threads[threads] = {
                role: ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                for role, path in self.paths.items()
            }
        return self._sessions_by_threads[threads]

    def set_threads(self, threads: int) -> None:
        self.sessions = self._sessions(threads)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        (out,) = self.sessions["refiner_guide"].run(None, {"pixels": _array(pixels)})
        return torch.from_numpy(out).to(pixels.dtype)

    def correct(self, up: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        feeds = {"up": _array(up), "features": _array(features)}
        (out,) = self.sessions["refiner_head"].run(None, feeds)
        return torch.from_numpy(out).to(up.dtype)


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def onnxruntime_refiner(
    refiner: MaskRefiner, directory: str | Path, options: OrtOptions, build_if_missing: bool
) -> OnnxRuntimeRefiner | None:
    """The refiner's graphs in ONNX Runtime from the engine folder `directory`, exported first when
    missing (or unloadable) and `build_if_missing`; None, with a log line saying why, where they
    cannot be had: the model then refines in PyTorch, with the same result, more slowly."""
    paths = refiner_paths(refiner, directory)
    if not all(p.is_file() for p in paths.values()):
        if not build_if_missing:
            log.info(
                "mask refiner: no ONNX graphs for these weights in %s, so it runs in PyTorch "
                "(`omg-llava-ros build-engines --backend onnxruntime` exports them)",
                directory,
            )
            return None
        log.info("mask refiner: exporting its two graphs to %s (a few seconds, once)", directory)
        try:
            export_refiner(refiner, directory)
        except (EngineBuildError, OSError) as err:
            log.warning("mask refiner: export failed, it runs in PyTorch: %s", err)
            return None
    try:
        return OnnxRuntimeRefiner(paths, options)
    except Exception as err:  # ONNX Runtime raises its own types for an unreadable graph
        bad = ", ".join(str(p) for p in paths.values())
        if not build_if_missing:
            log.warning("mask refiner: ONNX Runtime cannot load %s (%s); it runs in PyTorch", bad, err)
            return None
        log.warning("mask refiner: ONNX Runtime cannot load %s (%s); exporting them again", bad, err)
    try:
        export_refiner(refiner, directory)
        return OnnxRuntimeRefiner(paths, options)
    except Exception as err:
        log.warning("mask refiner: still unusable after a new export, it runs in PyTorch: %s", err)
        return None
