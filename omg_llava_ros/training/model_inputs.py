"""Toyworld scenes and prompts as the model takes them (pixels, encoded prompts, per-image memory)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from omg_llava_ros.model.omg_decoder import DecoderMemory
from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.model.prompt_encoder import EncodedPrompt


def to_encoded(prompt) -> EncodedPrompt:
    """A toyworld VisualPrompt (image pixels) → model-input prompt; the embedded model's input is the
    native square image, so the coordinates are the same."""
    if prompt.kind == "point":
        return EncodedPrompt("point", point=tuple(float(v) for v in prompt.point))
    if prompt.kind == "box":
        return EncodedPrompt("box", box=tuple(float(v) for v in prompt.box))
    return EncodedPrompt("mask", mask=np.asarray(prompt.mask, bool))


def select_memory(memory: DecoderMemory, index: torch.Tensor | slice) -> DecoderMemory:
    """The memory of the images `index` picks: a tensor of indices copies, a slice gives views."""
    return replace(memory, mask_features=memory.mask_features[index], memories=[m[index] for m in memory.memories])


def pixels_of(model: OmgLlava, images: list[np.ndarray]) -> torch.Tensor:
    return torch.cat([model.preprocess(img)[0] for img in images])
