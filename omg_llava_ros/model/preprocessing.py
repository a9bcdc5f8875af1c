"""Image preprocessing and the way back: expand to a mean-coloured square, resize, CLIP-normalise.

The official OMG-LLaVA pads the image to a square (centred, filled with the CLIP mean colour),
resizes it bicubically to the model size and normalises with the CLIP mean/std. Masks are predicted
on that padded square; to return them at the input size they are resized to the square of the
image's longer side and the padding is cropped away. Prompt coordinates go the other way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class Letterbox:
    """Where an H×W image sits inside the model's `size`² input.

    The image is placed at (`left`, `top`) inside a `side`² square (side = max(H, W)), which is then
    scaled by size / side.
    """

    height: int
    width: int
    side: int
    top: int
    left: int
    size: int

    @classmethod
    def for_image(cls, height: int, width: int, size: int) -> Letterbox:
        side = max(height, width)
        return cls(height, width, side, (side - height) // 2, (side - width) // 2, size)

    @property
    def scale(self) -> float:
        return self.size / self.side

    def points_to_model(self, xy: np.ndarray) -> np.ndarray:
        """Input-image pixel coordinates (…, 2) → model-input pixel coordinates."""
        xy = np.asarray(xy, dtype=np.float64)
        offset = np.array([self.left, self.top], dtype=np.float64)
        return (xy + offset) * self.scale

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """A bool H×W mask of the input image → bool size² mask on the padded model input."""
        if mask.shape != (self.height, self.width):
            raise ValueError(f"mask shape {mask.shape} does not match the image {(self.height, self.width)}")
        square = np.zeros((self.side, self.side), dtype=np.uint8)
        square[self.top : self.top + self.height, self.left : self.left + self.width] = mask.astype(np.uint8)
        resized = Image.fromarray(square * 255).resize((self.size, self.size), Image.NEAREST)
        return np.asarray(resized) > 127

    def logits_to_image(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, h, w) on the padded square → (N, H, W) logits at the input size.

        As the official evaluation does: bilinear to side², then crop the padding.
        """
        if logits.shape[0] == 0:
            return logits.new_zeros((0, self.height, self.width))
        up = F.interpolate(logits[:, None].float(), size=(self.side, self.side), mode="bilinear", align_corners=False)
        return up[:, 0, self.top : self.top + self.height, self.left : self.left + self.width]


def expand_to_square(image: np.ndarray, fill: tuple[int, int, int]) -> tuple[np.ndarray, Letterbox]:
    height, width = image.shape[:2]
    box = Letterbox.for_image(height, width, size=0)
    if height == width:
        return image, box
    square = np.empty((box.side, box.side, 3), dtype=np.uint8)
    square[:] = np.asarray(fill, dtype=np.uint8)
    square[box.top : box.top + height, box.left : box.left + width] = image
    return square, box


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate an H×W×3 uint8 RGB array (H×W grey and H×W×4 RGBA are accepted and converted)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image must be H×W×3 RGB, got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    return np.ascontiguousarray(image)


class ImagePreprocessor:
    """numpy RGB uint8 → normalised (1, 3, size, size) float tensor and its `Letterbox`."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.size = size
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.fill = tuple(int(255 * m) for m in mean)

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, Letterbox]:
        image = check_image(image)
        square, box = expand_to_square(image, self.fill)
        if square.shape[0] != self.size:
            square = np.asarray(Image.fromarray(square).resize((self.size, self.size), Image.BICUBIC))
        pixels = (square.astype(np.float32) / 255.0 - self.mean) / self.std
        tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
        return tensor, Letterbox.for_image(image.shape[0], image.shape[1], self.size)
