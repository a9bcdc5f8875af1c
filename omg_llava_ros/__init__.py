"""omg_llava_ros: OMG-LLaVA grounded segmentation as a ROS 2 perception node.

The heavy imports (torch, transformers) happen on first use of the model API, so that light modules
such as the image conversion or the message definitions import quickly on a robot.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Read by PyTorch's OpenMP runtime (GNU libgomp) when it loads, so set before anything imports torch.
# By default its worker threads spin for 300 000 rounds after every parallel region; on the CPU path
# ONNX Runtime's threads run right after PyTorch's operators and found both cores taken (measured on
# 2 cores, `bench --backends torch auto`: follow 37.9 → 48.6 Hz with ONNX Runtime vision, and 23.1 →
# 24.3 Hz on PyTorch alone, whose next operator still finds its threads awake). A setting of the
# user's own (either variable) is kept.
OPENMP_SPIN_COUNT = "20000"
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)

__all__ = ["OmgLlava", "OmgLlavaPredictor", "Prompt", "Segment", "ChatResult"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from omg_llava_ros.model.omg_llava import OmgLlava
    from omg_llava_ros.model.predictor import OmgLlavaPredictor
    from omg_llava_ros.model.results import ChatResult, Prompt, Segment

# Where each public name is defined.
_HOMES = {
    "OmgLlava": "omg_llava",
    "OmgLlavaPredictor": "predictor",
    "Prompt": "results",
    "Segment": "results",
    "ChatResult": "results",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"omg_llava_ros.model.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'omg_llava_ros' has no attribute {name!r}")
