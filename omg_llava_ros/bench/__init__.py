"""Benchmarks: per-stage latency, command → mask, follow-mode rate, ONNX Runtime vs PyTorch (CPU or any
device, `runner`), and the official-size GPU benchmark with random weights (`gpu_official`).

Imports are lazy so that `omg_llava_ros.cli` can register `bench` without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["BenchOptions", "StageProbe", "machine_info", "run_bench"]

_WHERE = {"BenchOptions": "runner", "run_bench": "runner", "StageProbe": "probe", "machine_info": "machine"}

if TYPE_CHECKING:
    from omg_llava_ros.bench.machine import machine_info
    from omg_llava_ros.bench.probe import StageProbe
    from omg_llava_ros.bench.runner import BenchOptions, run_bench


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"omg_llava_ros.bench.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'omg_llava_ros.bench' has no attribute {name!r}")
