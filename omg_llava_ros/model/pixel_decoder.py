"""The multi-scale deformable-attention pixel decoder of the OMG decoder (Mask2Former's).

The three coarsest encoder maps (strides 8, 16, 32) are projected to `hidden_dim`, refined jointly by
deformable-attention encoder layers, and an FPN step adds the stride-4 map to give the mask features.
Deformable attention samples with `grid_sample`, so the module is plain PyTorch and exports to ONNX.
Parameter names follow mmdet/mmcv so that official checkpoints map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omg_llava_ros.model.config import OmgDecoderConfig
from omg_llava_ros.model.positional_encoding import sine_position_encoding


class ConvNormAct(nn.Module):
    """Conv → GroupNorm → optional ReLU, named like mmcv's ConvModule (`conv`, `gn`)."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int, bias: bool, relu: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)
        self.gn = nn.GroupNorm(groups, cout)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gn(self.conv(x))
        return F.relu(x) if self.relu else x


class FFN(nn.Module):
    """Linear → ReLU → Linear with the residual inside (mmcv FFN; keys `layers.0.0`, `layers.1`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU()), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class MultiScaleDeformableAttention(nn.Module):
    """Each query samples `points` locations per head and level around its reference point.

    Offsets are in units of each level's own pixels; the residual is added inside (mmcv).
    """

    def __init__(self, dim: int, heads: int, levels: int, points: int):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        level_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        """query (B, N, C) over all levels concatenated; reference_points (N, 2) in [0, 1] (x, y)."""
        b, n, c = query.shape
        heads, levels, points = self.heads, self.levels, self.points
        head_dim = c // heads
        q = query + query_pos
        value = self.value_proj(query).view(b, n, heads, head_dim)
        offsets = self.sampling_offsets(q).view(b, n, heads, levels, points, 2)
        weights = self.attention_weights(q).view(b, n, heads, levels * points).softmax(-1)
        weights = weights.view(b, n, heads, levels, points)
        normalizer = torch.tensor([[w, h] for h, w in level_shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[None, :, None, None, None, :] + offsets / normalizer[None, None, None, :, None, :]
        grids = 2 * locations - 1  # grid_sample's [-1, 1]

        out = query.new_zeros(b, heads, head_dim, n)
        start = 0
        for level, (h, w) in enumerate(level_shapes):
            v = value[:, start : start + h * w]  # (B, hw, heads, d)
            start += h * w
            v = v.permute(0, 2, 3, 1).reshape(b * heads, head_dim, h, w)
            # Points before queries, so that the query axis is the innermost (vectorised) one, and
            # contiguous: CPU grid_sample on a strided grid is about 4× slower. Same values.
            grid = grids[:, :, :, level].permute(0, 2, 3, 1, 4).reshape(b * heads, points, n, 2).contiguous()
            sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            # sampled (B·heads, d, P, N) weighted by (B·heads, 1, P, N)
            wl = weights[:, :, :, level].permute(0, 2, 3, 1).reshape(b * heads, 1, points, n)
            out = out + (sampled * wl).sum(2).view(b, heads, head_dim, n)
        out = out.reshape(b, c, n).transpose(1, 2)
        return query + self.output_proj(out)


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention → LayerNorm → FFN → LayerNorm."""

    def __init__(self, config: OmgDecoderConfig):
        super().__init__()
        d = config.hidden_dim
        self.self_attn = MultiScaleDeformableAttention(
            d, config.pixel_decoder_heads, config.num_feature_levels, config.pixel_decoder_points
        )
        self.ffn = FFN(d, config.pixel_decoder_ffn_dim)
        self.norms = nn.ModuleList([nn.LayerNorm(d), nn.LayerNorm(d)])

    def forward(self, x, pos, reference_points, level_shapes):
        x = self.norms[0](self.self_attn(x, pos, reference_points, level_shapes))
        return self.norms[1](self.ffn(x))


class DeformableEncoder(nn.Module):
    def __init__(self, config: OmgDecoderConfig):
        super().__init__()
        self.layers = nn.ModuleList([DeformableEncoderLayer(config) for _ in range(config.pixel_decoder_layers)])

    def forward(self, x, pos, reference_points, level_shapes):
        for layer in self.layers:
            x = layer(x, pos, reference_points, level_shapes)
        return x


class PixelDecoder(nn.Module):
    """Encoder maps [s4, s8, s16, s32] → (mask features (B, C, s4), memories [s32, s16, s8] as (B, C, h, w))."""

    def __init__(self, config: OmgDecoderConfig, in_channels: tuple[int, ...]):
        super().__init__()
        d, groups, levels = config.hidden_dim, config.num_groups, config.num_feature_levels
        self.levels = levels
        # input_convs[i] takes the i-th coarsest map: encoder level i is backbone level (3 - i).
        self.input_convs = nn.ModuleList(
            [ConvNormAct(in_channels[-1 - i], d, 1, groups, bias=True, relu=False) for i in range(levels)]
        )
        self.encoder = DeformableEncoder(config)
        self.level_encoding = nn.Embedding(levels, d)
        n_fpn = len(in_channels) - levels
        self.lateral_convs = nn.ModuleList(
            [ConvNormAct(in_channels[i], d, 1, groups, bias=False, relu=False) for i in range(n_fpn)]
        )
        self.output_convs = nn.ModuleList([ConvNormAct(d, d, 3, groups, bias=False, relu=True) for _ in range(n_fpn)])
        self.mask_feature = nn.Conv2d(d, d, 1)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b = features[0].shape[0]
        tokens, positions, refs, shapes = [], [], [], []
        for i in range(self.levels):
            x = self.input_convs[i](features[-1 - i])
            h, w = x.shape[-2:]
            shapes.append((h, w))
            tokens.append(x.flatten(2).transpose(1, 2))
            pos = sine_position_encoding(h, w, x.shape[1] // 2, device=x.device).to(x.dtype)
            positions.append(pos + self.level_encoding.weight[i])
            refs.append(_reference_points(h, w, x.device, x.dtype))
        memory = self.encoder(torch.cat(tokens, 1), torch.cat(positions, 0)[None], torch.cat(refs, 0), shapes)

        outs, start = [], 0
        for h, w in shapes:
            outs.append(memory[:, start : start + h * w].transpose(1, 2).reshape(b, -1, h, w))
            start += h * w
        # FPN from the coarsest encoder output down to stride 4.
        y = outs[-1]
        for i in range(len(self.lateral_convs) - 1, -1, -1):
            lateral = self.lateral_convs[i](features[i])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            y = self.output_convs[i](y)
        return self.mask_feature(y), outs


def _reference_points(h: int, w: int, device, dtype) -> torch.Tensor:
    """Pixel centres of an h×w map, normalised to [0, 1], as (h·w, 2) (x, y)."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
