"""Vision engines: ONNX export, ONNX Runtime and TensorRT backends, and the engine cache.

Imports are lazy so that `omg_llava_ros.cli` can register `build-engines` without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "BACKENDS",
    "EngineOptions",
    "OrtOptions",
    "build_engines",
    "export_onnx",
    "measure_vision_speed",
    "select_backend",
    "verify_graph",
]

_WHERE = {
    "BACKENDS": "backend",
    "EngineOptions": "backend",
    "build_engines": "backend",
    "select_backend": "backend",
    "OrtOptions": "onnxruntime_backend",
    "export_onnx": "export",
    "verify_graph": "export",
    "measure_vision_speed": "speed",
}

if TYPE_CHECKING:
    from omg_llava_ros.engines.backend import BACKENDS, EngineOptions, build_engines, select_backend
    from omg_llava_ros.engines.export import export_onnx, verify_graph
    from omg_llava_ros.engines.onnxruntime_backend import OrtOptions
    from omg_llava_ros.engines.speed import measure_vision_speed


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"omg_llava_ros.engines.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'omg_llava_ros.engines' has no attribute {name!r}")
