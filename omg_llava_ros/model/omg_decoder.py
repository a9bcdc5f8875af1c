"""The OMG decoder: pixel decoder + masked-attention decoder + heads (OMG-Seg's panoptic head).

One decoding routine serves every kind of query: the learned panoptic queries of the perception
pass, visual-prompt queries (with their attention constraints) and the LLM's `[SEG]` queries. The
image side (pixel decoder, memories with level embeddings and positions) is computed once per image
and reused, which is what makes prompt and `[SEG]` passes cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omg_llava_ros.model.config import OmgDecoderConfig
from omg_llava_ros.model.pixel_decoder import PixelDecoder
from omg_llava_ros.model.positional_encoding import frame_position_term, sine_position_encoding
from omg_llava_ros.model.transformer_decoder import TransformerDecoder


@dataclass
class DecoderMemory:
    """The per-image inputs of the transformer decoder.

    mask_features: (B, C, S/4, S/4). memories[l]: (B, h_l·w_l, C), level embedding added;
    positions[l]: (h_l·w_l, C); level_shapes[l] = (h_l, w_l), low to high resolution.
    """

    mask_features: torch.Tensor
    memories: list[torch.Tensor]
    positions: list[torch.Tensor]
    level_shapes: list[tuple[int, int]]


@dataclass
class QueryConstraints:
    """Where visual-prompt queries may attend, per memory level.

    allowed[l]: (B, N, h_l·w_l) bool. use_prediction: (B, N) bool — where False the attention is
    exactly `allowed` (mask prompts); where True it is the query's own predicted mask inside `allowed`
    (points: everything allowed; boxes: the box).
    """

    allowed: list[torch.Tensor]
    use_prediction: torch.Tensor


@dataclass
class DecoderOutput:
    """mask_logits: one (B, N, S/4, S/4) per prediction (initial + one per layer).
    query: (B, N, C) the last layer's output (before the post-norm). class_logits: (B, N, K+1) with
    background last, and iou: (B, N, 1), from the last layer, when asked for."""

    mask_logits: list[torch.Tensor]
    query: torch.Tensor
    class_logits: torch.Tensor | None = None
    iou: torch.Tensor | None = None
    class_logits_per_layer: list[torch.Tensor] | None = None  # training: one per mask prediction


def mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def attention_blocked(
    mask_logits: torch.Tensor,
    level_shape: tuple[int, int],
    constraints: QueryConstraints | None = None,
    level: int = 0,
) -> torch.Tensor:
    """Cross-attention mask for the next layer: True where a query may not look.

    From the query's own prediction resized to the level (sigmoid < 0.5), restricted by the
    constraints; a query that would see nothing sees everything instead (Mask2Former).
    """
    b, n = mask_logits.shape[:2]
    resized = F.interpolate(mask_logits, size=level_shape, mode="bilinear", align_corners=False)
    blocked = resized.flatten(2) < 0  # sigmoid(x) < 0.5
    if constraints is not None:
        use = constraints.use_prediction[..., None]
        blocked = (blocked & use) | ~constraints.allowed[level].expand(b, n, -1)
    fully = blocked.all(-1, keepdim=True)
    return blocked & ~fully


def independent_query_sets(shared: int, single: int, device: torch.device | None = None) -> torch.Tensor:
    """(1, N, N) self-attention mask, True = may not look: the first `shared` queries see each other,
    each of the next `single` sees only itself. A query that sees only itself is decoded exactly as if
    alone (a visual prompt), so prompts of one image can ride in its panoptic pass, on one copy of
    its memory, rather than each in a batch row of its own."""
    n = shared + single
    blocked = ~torch.eye(n, dtype=torch.bool, device=device)
    blocked[:shared, :shared] = False
    return blocked[None]


class OmgDecoder(nn.Module):
    """Parameter names follow OMG-Seg's `panoptic_head` (mmdet), one to one."""

    def __init__(self, config: OmgDecoderConfig, in_channels: tuple[int, ...]):
        super().__init__()
        self.config = config
        d = config.hidden_dim
        self.pixel_decoder = PixelDecoder(config, in_channels)
        self.transformer_decoder = TransformerDecoder(config)
        self.query_feat = nn.Embedding(config.num_queries, d)
        self.query_embed = nn.Embedding(config.num_queries, d)
        self.level_embed = nn.Embedding(config.num_feature_levels, d)
        self.mask_embed = mlp([d, d, d, d])
        self.iou_embed = mlp([d, d, d, 1])
        self.cls_proj = mlp([d, d, d, config.clip_dim])
        self.mask_pooling_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        # Visual prompts: one mask token, point/box type embeddings, box-encoding → position.
        self.mask_tokens = nn.Embedding(1, d)
        self.pb_embedding = nn.Embedding(2, d)
        self.pos_linear = nn.Linear(2 * d, d)
        if config.llm_decoder_copy:
            # finetuned_refseg/gcg's trainable copy (official names), used only for [SEG] queries.
            self.transformer_decoder_llm = TransformerDecoder(config)
            self.mask_embed_llm = mlp([d, d, d, d])
        # Class text embeddings (classes, synonyms, clip_dim), L2-normalised; background is added
        # as a zero vector at use. Official: from convnext_large_d_320_CocoPanopticOVDataset.pth.
        self.register_buffer(
            "class_embed", torch.zeros(config.num_classes, config.num_class_templates, config.clip_dim)
        )

    # -- image side -----------------------------------------------------------------------------
    def encode_memory(self, features: list[torch.Tensor]) -> DecoderMemory:
        mask_features, outs = self.pixel_decoder(features)
        memories, positions, shapes = [], [], []
        d = self.config.hidden_dim
        frame_term = frame_position_term(d // 2, device=mask_features.device).to(mask_features.dtype)
        for level, x in enumerate(outs):
            h, w = x.shape[-2:]
            shapes.append((h, w))
            memories.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[level])
            pos = sine_position_encoding(h, w, d // 2, device=x.device).to(x.dtype)
            positions.append(pos + frame_term)
        return DecoderMemory(mask_features, memories, positions, shapes)

    # -- heads ----------------------------------------------------------------------------------
    def predict_masks(
        self, query: torch.Tensor, mask_features: torch.Tensor, mask_embed: nn.Module | None = None
    ) -> torch.Tensor:
        """(B, N, C) queries (after post-norm) → (B, N, h, w) mask logits."""
        embed = (self.mask_embed if mask_embed is None else mask_embed)(query)
        b, c, h, w = mask_features.shape
        return torch.matmul(embed, mask_features.flatten(2)).view(embed.shape[0], embed.shape[1], h, w)

    def classify(self, query: torch.Tensor, mask_logits: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        """Open-vocabulary class logits (B, N, K+1), background last.

        Computed in float32 even under autocast: cosine similarities scaled by 100 lose the
        differences between similar classes in bfloat16 (logit resolution ≈ 0.5).
        """
        with torch.autocast(device_type=query.device.type, enabled=False):
            return self._classify(query.float(), mask_logits.float(), mask_features.float())

    def _classify(self, query: torch.Tensor, mask_logits: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        binary = (mask_logits > 0).to(mask_features.dtype).flatten(2)
        weights = binary / (binary.sum(-1, keepdim=True) + 1e-8)
        pooled = torch.matmul(weights, mask_features.flatten(2).transpose(1, 2))  # (B, N, C)
        embed = F.normalize(self.cls_proj(self.mask_pooling_proj(pooled) + query), dim=-1)
        sims = torch.einsum("bnd,ktd->bnkt", embed, self.class_embed).amax(-1)
        logits = sims * torch.exp(torch.tensor(self.config.logit_scale, dtype=sims.dtype))
        return torch.cat([logits, logits.new_zeros(logits.shape[:-1] + (1,))], dim=-1)

    # -- decoding -------------------------------------------------------------------------------
    def decode(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        memory: DecoderMemory,
        constraints: QueryConstraints | None = None,
        with_class: bool = False,
        class_per_layer: bool = False,
        seg_decoder: bool = False,
        self_blocked: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Run the masked-attention decoder for (B, N, C) queries over one image's memory (batch 1 or B).

        `class_per_layer` (training, deep supervision) classifies after every prediction, as the
        official head does; inference only needs the last one (`with_class`).
        `seg_decoder`: decode with the [SEG] decoder copy (layers, post-norm, mask MLP) where there is one.
        `self_blocked` (1 or B, N, N) bool, True where a query may not look in self-attention: lets
        independent query sets share one pass (`independent_query_sets`).
        """
        decoder, mask_embed = self.transformer_decoder, self.mask_embed
        if seg_decoder and self.config.llm_decoder_copy:
            decoder, mask_embed = self.transformer_decoder_llm, self.mask_embed_llm
        post_norm = decoder.post_norm
        levels = len(memory.memories)
        normed = post_norm(query)
        mask_logits = self.predict_masks(normed, memory.mask_features, mask_embed)
        all_masks = [mask_logits]
        classes = [self.classify(normed, mask_logits, memory.mask_features)] if class_per_layer else None
        blocked = attention_blocked(mask_logits, memory.level_shapes[0], constraints, 0)
        for i, layer in enumerate(decoder.layers):
            level = i % levels
            query = layer(query, query_pos, memory.memories[level], memory.positions[level], blocked, self_blocked)
            normed = post_norm(query)
            mask_logits = self.predict_masks(normed, memory.mask_features, mask_embed)
            all_masks.append(mask_logits)
            if classes is not None:
                classes.append(self.classify(normed, mask_logits, memory.mask_features))
            nxt = (i + 1) % levels
            blocked = attention_blocked(mask_logits, memory.level_shapes[nxt], constraints, nxt)
        out = DecoderOutput(all_masks, query, class_logits_per_layer=classes)
        if with_class or class_per_layer:
            out.class_logits = classes[-1] if classes else self.classify(normed, mask_logits, memory.mask_features)
            out.iou = self.iou_embed(normed)
        return out

    def panoptic_queries(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            self.query_feat.weight[None].expand(batch, -1, -1),
            self.query_embed.weight[None].expand(batch, -1, -1),
        )
