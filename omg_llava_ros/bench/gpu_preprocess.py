"""The model's preprocessing on the device: letterbox, PIL-compatible bicubic resize, normalisation.

`ImagePreprocessor` resizes with PIL on the CPU; at 1024² that and the float conversion cost several
milliseconds a frame, more than a GPU spends on the encoder. `DevicePreprocessor` does the same steps
with tensors: the square is filled and pasted on the device, then resized with PIL's own bicubic
weights (a = -0.5, widened when shrinking, normalised per output pixel) as two matrix products,
rounded to 8 bits after each pass as PIL does. PIL computes with 22-bit fixed-point weights, so a
pixel may differ by one grey level where the sum falls on a rounding boundary.
"""

from __future__ import annotations

import numpy as np
import torch

from omg_llava_ros.model.preprocessing import ImagePreprocessor, Letterbox, check_image


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pil_bicubic_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) float64 matrix M with M @ x == PIL's bicubic resize of a line (before rounding)."""
    scale = src / dst
    filterscale = max(scale, 1.0)  # shrinking widens the kernel (antialiasing), as PIL does
    support = 2.0 * filterscale
    m = np.zeros((dst, src))
    for i in range(dst):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), src)
        w = _cubic((np.arange(lo, hi) - center + 0.5) / filterscale)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0.0 else w
    return m


class DevicePreprocessor:
    """Drop-in for `OmgLlava.preprocess` that returns the (1, 3, S, S) pixels on `device`."""

    def __init__(self, reference: ImagePreprocessor, device: torch.device | str):
        self.size = reference.size
        self.device = torch.device(device)
        self.fill = torch.tensor(reference.fill, dtype=torch.uint8, device=self.device)
        self.mean = torch.tensor(reference.mean, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(reference.std, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._matrices: dict[int, torch.Tensor] = {}

    def _matrix(self, side: int) -> torch.Tensor:
        if side not in self._matrices:
            m = pil_bicubic_matrix(side, self.size)
            self._matrices[side] = torch.from_numpy(m).to(self.device, torch.float32)
        return self._matrices[side]

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, Letterbox]:
        image = check_image(image)
        height, width = image.shape[:2]
        box = Letterbox.for_image(height, width, self.size)
        side = box.side
        src = torch.from_numpy(image).to(self.device, non_blocking=True)
        square = self.fill.expand(side, side, 3).clone()
        square[box.top : box.top + height, box.left : box.left + width] = src
        x = square.permute(2, 0, 1).float()  # (3, side, side), 0..255
        if side != self.size:
            m = self._matrix(side)
            # PIL: horizontal pass, round to 8 bits, vertical pass, round again.
            x = torch.matmul(x, m.T).add_(0.5).floor_().clamp_(0, 255)
            x = torch.matmul(m, x).add_(0.5).floor_().clamp_(0, 255)
        pixels = (x / 255.0 - self.mean) / self.std
        return pixels[None].contiguous(), box
