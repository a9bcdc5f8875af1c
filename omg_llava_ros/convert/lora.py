"""The official LoRA (peft, r = 512, α = 256 on every InternLM2 linear and the LM head): merged into
the base weights, or kept as a peft adapter for the Llama-layout model.

Merge: W = W_base + (α / r) · B · A, computed in float32 over blocks of rows (the LM head is
92548 × 4096) and cast to the output dtype. The packed `wqkv` is merged before it is split; for an
adapter its `lora_B` is split with the same row layout while `lora_A` is shared by q, k and v, which
gives exactly the same ΔW per projection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

OFFICIAL_LORA_ALPHA = 256.0
OFFICIAL_LORA_RANK = 512
OFFICIAL_LORA_DROPOUT = 0.05
_ROW_BLOCK = 8192


@dataclass(frozen=True)
class LoraPair:
    """One adapted linear: A (r, in), B (out, r)."""

    a: torch.Tensor
    b: torch.Tensor

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def merge_lora(
    base: torch.Tensor, lora: LoraPair | None, scaling: float, dtype: torch.dtype, block: int = _ROW_BLOCK
) -> torch.Tensor:
    """base (out, in) + scaling · B · A → `dtype`, block by block so float32 copies stay small."""
    if lora is None:
        return base.to(dtype)
    out_f, in_f = base.shape
    if lora.a.shape[1] != in_f or lora.b.shape[0] != out_f or lora.b.shape[1] != lora.a.shape[0]:
        raise ValueError(
            f"LoRA shapes A {list(lora.a.shape)}, B {list(lora.b.shape)} do not fit a {list(base.shape)} weight"
        )
    out = torch.empty(base.shape, dtype=dtype)
    a = lora.a.float()
    for start in range(0, out_f, block):
        stop = min(start + block, out_f)
        rows = base[start:stop].float()
        rows.addmm_(lora.b[start:stop].float(), a, alpha=scaling)
        out[start:stop] = rows.to(dtype)
    return out


@dataclass
class AdapterConfig:
    """peft's `adapter_config.json` for a LoRA on the Llama-layout model."""

    r: int
    lora_alpha: float
    target_modules: list[str]
    lora_dropout: float = OFFICIAL_LORA_DROPOUT
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": None,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "bias": "none",
            "target_modules": sorted(self.target_modules),
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "use_rslora": False,
            "use_dora": False,
            **self.extra,
        }

    def save(self, directory: str | Path) -> None:
        Path(directory, "adapter_config.json").write_text(json.dumps(self.to_json(), indent=2))


def adapter_key(module_path: str, which: str) -> str:
    """peft's saved name for `lora_A`/`lora_B` of a module of the causal LM (adapter name dropped)."""
    return f"base_model.model.{module_path}.lora_{which}.weight"
