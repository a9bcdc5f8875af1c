"""The vision backend seam: the two vision calls the model makes, and where they run.

The model computes its image work through a `VisionBackend`: PyTorch (`TorchVision`, the model's
own modules) unless another is attached. Other backends (ONNX Runtime, TensorRT, later a server)
live outside `model/` and are found by name: registered in-process with `register_vision_backend`,
or declared by an installed package under the entry-point group `omg_llava_ros.vision_backends`
(this package declares "onnxruntime", "tensorrt" and "auto" in pyproject.toml, implemented by
`omg_llava_ros.engines`). So `model/` imports nothing from the engines.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import torch

from omg_llava_ros.model.omg_decoder import DecoderMemory

if TYPE_CHECKING:
    from omg_llava_ros.model.omg_llava import OmgLlava

ENTRY_POINT_GROUP = "omg_llava_ros.vision_backends"
# name -> factory(name, model, options) -> VisionBackend
BackendFactory = Callable[[str, "OmgLlava", Any], "VisionBackend"]
_REGISTERED: dict[str, BackendFactory] = {}


class VisionBackend:
    """The two vision calls the model makes. `encode`: (1, 3, S, S) normalised pixels → (last encoder
    stage (1, C4, S/32, S/32), DecoderMemory). `decode`: queries (B, N, C), positions (B, N, C) over one
    image's memory, optional constraints → DecoderOutput (`with_class`: class logits and IoU too;
    `seg_decoder`: the [SEG] decoder copy, asked for only when the config has `llm_decoder_copy`).
    `refiner`: where the mask refiner's convolutions run (`mask_refiner.RefinerCompute`), or None for
    the model's own module."""

    name = "abstract"
    refiner: Any = None

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, DecoderMemory]:
        raise NotImplementedError

    def decode(
        self, query, query_pos, memory: DecoderMemory, constraints=None, with_class: bool = False, seg_decoder=False
    ):
        raise NotImplementedError


class TorchVision(VisionBackend):
    """Plain PyTorch: the model's own modules."""

    name = "torch"

    def __init__(self, model: OmgLlava):
        self.model = model

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, DecoderMemory]:
        m = self.model
        features = m.image_encoder(pixels.to(m.device))
        return features[-1], m.omg_decoder.encode_memory(features)

    def decode(
        self, query, query_pos, memory: DecoderMemory, constraints=None, with_class: bool = False, seg_decoder=False
    ):
        return self.model.omg_decoder.decode(query, query_pos, memory, constraints, with_class, seg_decoder=seg_decoder)


def register_vision_backend(name: str, factory: BackendFactory) -> None:
    """Make `name` loadable by `load_vision_backend` in this process (tests, plugins)."""
    _REGISTERED[name] = factory


def available_vision_backends() -> list[str]:
    """ "torch", the registered names and the installed entry points, sorted."""
    return sorted({"torch", *_REGISTERED, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


def load_vision_backend(name: str, model: OmgLlava, options: Any = None) -> VisionBackend:
    """The backend `name` for `model` ("torch": its own modules); `options` go to the backend's
    factory (for the engines an `EngineOptions`). ValueError for a name nobody provides."""
    if name == "torch":
        return TorchVision(model)
    factory = _REGISTERED.get(name)
    if factory is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise ValueError(f"unknown vision backend {name!r}; choose one of {available_vision_backends()}")
        factory = found[0].load()
    return factory(name, model, options)
