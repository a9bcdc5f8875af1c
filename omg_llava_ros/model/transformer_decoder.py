"""The masked-attention transformer decoder of the OMG decoder (Mask2Former's).

Each layer: masked cross-attention to one memory level → LayerNorm → self-attention → LayerNorm →
FFN → LayerNorm. The attention is written out by hand with a -inf bias: `nn.MultiheadAttention`
with a mask exports to ONNX with its traced shapes baked in, and the query count must stay dynamic.
Parameter names follow mmcv (`attn.in_proj_weight` packed q/k/v, `attn.out_proj`, `norms.{0,1,2}`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omg_llava_ros.model.config import OmgDecoderConfig
from omg_llava_ros.model.pixel_decoder import FFN


class PackedAttention(nn.Module):
    """Multi-head attention with packed q/k/v input projections, batch first.

    Key/value batch may be 1 and broadcast over the query batch (one image, many prompt queries).
    `blocked` (B, Nq, Nk) bool, True = may not attend.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query, key, value, blocked: torch.Tensor | None = None) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._heads(F.linear(query, w_q, b_q))
        k = self._heads(F.linear(key, w_k, b_k))
        v = self._heads(F.linear(value, w_v, b_v))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if blocked is not None:
            scores = scores.masked_fill(blocked[:, None], float("-inf"))
        out = torch.matmul(scores.softmax(-1), v)  # (B, heads, Nq, d)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)


class AttentionBlock(nn.Module):
    """mmcv's MultiheadAttention wrapper: positions added to query and key (not value), residual inside."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = PackedAttention(dim, heads)

    def forward(self, query, key, value, query_pos, key_pos, blocked=None):
        return query + self.attn(query + query_pos, key + key_pos, value, blocked)


class MaskedDecoderLayer(nn.Module):
    def __init__(self, config: OmgDecoderConfig):
        super().__init__()
        d = config.hidden_dim
        # Registration order as in mmdet (self, cross, ffn, norms); the forward runs cross first.
        self.self_attn = AttentionBlock(d, config.num_heads)
        self.cross_attn = AttentionBlock(d, config.num_heads)
        self.ffn = FFN(d, config.ffn_dim)
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(3)])

    def forward(self, query, query_pos, memory, memory_pos, blocked, self_blocked=None):
        query = self.norms[0](self.cross_attn(query, memory, memory, query_pos, memory_pos, blocked))
        query = self.norms[1](self.self_attn(query, query, query, query_pos, query_pos, self_blocked))
        return self.norms[2](self.ffn(query))


class TransformerDecoder(nn.Module):
    def __init__(self, config: OmgDecoderConfig):
        super().__init__()
        self.layers = nn.ModuleList([MaskedDecoderLayer(config) for _ in range(config.num_layers)])
        self.post_norm = nn.LayerNorm(config.hidden_dim)
