"""omg_llava_ros: OMG-LLaVA grounded segmentation as a ROS 2 perception node.

The heavy imports (torch, transformers) happen on first use of the model API, so that light modules
such as the image conversion or the message definitions import quickly on a robot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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
