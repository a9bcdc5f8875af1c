"""omg_llava_ros: OMG-LLaVA grounded segmentation as a ROS 2 perception node.

The heavy imports (torch, transformers) happen on first use of the model API, so that light modules
such as the image conversion or the message definitions import quickly on a robot.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["OmgLlava", "Prompt", "Segment", "ChatResult"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from omg_llava_ros.model.omg_llava import ChatResult, OmgLlava, Prompt, Segment


def __getattr__(name: str) -> Any:
    if name in __all__:
        from omg_llava_ros.model import omg_llava

        return getattr(omg_llava, name)
    raise AttributeError(f"module 'omg_llava_ros' has no attribute {name!r}")
