"""The projectors between the perception module and the LLM.

VisualProjector (official `projector.model.*`):
- pixel MLP `model_feat`: [pixel-shuffled feature ; perception prior] (6656) → 4096 → 4096;
- object path: [query feature ; query position] (512) → `query_proj` (6144) → object MLP `model`
  (6144 → 4096 → 4096); shared by object-centric tokens and visual prompts;
- `seperate_embed` (sic): the separator token between pixel and object tokens.
TextProjector (official `projector_text2vision.model.*`): LLM hidden → 512 → 512, split into a
decoder query's content and position.
"""

from __future__ import annotations

import torch
from torch import nn

from omg_llava_ros.model.config import OmgLlavaConfig


def gelu_mlp(din: int, dout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(din, dout), nn.GELU(), nn.Linear(dout, dout))


class VisualProjector(nn.Module):
    def __init__(self, config: OmgLlavaConfig):
        super().__init__()
        hidden = config.language_model.hidden_size
        self.variant = config.perception_prior
        self.query_proj = nn.Linear(config.query_token_dim, config.pixel_token_dim)
        self.model = gelu_mlp(config.pixel_token_dim, hidden)
        self.model_feat = gelu_mlp(config.pixel_mlp_in_dim, hidden)
        self.seperate_embed = nn.Embedding(1, hidden)

    def pixel_tokens(self, shuffled: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """(B, T, 6144) image features and (B, T, 512) prior → (B, T, hidden)."""
        if self.variant == "additive":
            return self.model_feat(shuffled + self.query_proj(prior))
        return self.model_feat(torch.cat([shuffled, prior], dim=-1))

    def object_tokens(self, queries: torch.Tensor) -> torch.Tensor:
        """(…, 512) [feature; position] → (…, hidden); objects and visual prompts alike."""
        return self.model(self.query_proj(queries))

    def image_sequence(self, pixel_tokens: torch.Tensor, object_tokens: torch.Tensor) -> torch.Tensor:
        """One image's LLM visual sequence: [pixel tokens, separator, object tokens] → (T + 1 + n, hidden)."""
        return torch.cat([pixel_tokens, self.seperate_embed.weight, object_tokens], dim=0)


class TextProjector(nn.Module):
    def __init__(self, config: OmgLlavaConfig):
        super().__init__()
        self.model = gelu_mlp(config.language_model.hidden_size, config.query_token_dim)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, hidden) `[SEG]` states → (N, C) query content, (N, C) query position."""
        out = self.model(hidden)
        c = out.shape[-1] // 2
        return out[..., :c], out[..., c:]
