"""The frozen ConvNeXt image encoder (the CLIP visual trunk of OMG-Seg).

The official model uses the timm trunk of open_clip's `convnext_large_d_320`; only its stem and
four stages are used, giving maps at strides 4, 8, 16 and 32. The last one also feeds the LLM,
through the pixel shuffle.
"""

from __future__ import annotations

import torch
from timm.models.convnext import ConvNeXt
from torch import nn

from omg_llava_ros.model.config import ImageEncoderConfig


class ImageEncoder(nn.Module):
    """(B, 3, S, S) → [(B, dims[i], S / 2^(i+2), S / 2^(i+2)) for i in 0..3]."""

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = config
        trunk = ConvNeXt(
            depths=config.depths,
            dims=config.dims,
            num_classes=0,
            norm_eps=config.layer_norm_eps,
            ls_init_value=config.layer_scale_init,
        )
        # Keep only what OMG-Seg uses; the CLIP head (norm + projection) plays no part.
        self.stem = trunk.stem
        self.stages = trunk.stages

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(pixels)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
