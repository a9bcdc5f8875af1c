"""InternLM2 (the remote-code layout of `internlm2-chat-7b`) → the transformers-native Llama layout.

What differs (official_checkpoint_keys.md §6):
- `attention.wqkv` packs q, k and v per KV head: rows are `(kv_head, slot, head_dim)` with slots
  `[q(g·h), …, q(g·h + g − 1), k(h), v(h)]`, g = heads / kv_heads. Splitting it gives q/k/v in the
  head order Llama expects; both use `rotate_half` RoPE, so no row permutation is needed.
- names: `wo`→`o_proj`, `w1`→`gate_proj`, `w3`→`up_proj`, `w2`→`down_proj`,
  `attention_norm`→`input_layernorm`, `ffn_norm`→`post_attention_layernorm`,
  `tok_embeddings`→`embed_tokens`, `output`→`lm_head`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omg_llava_ros.convert.files import ConversionError, load_pth, state_dict_from
from omg_llava_ros.model.config import LanguageModelConfig

log = logging.getLogger(__name__)

# InternLM2 module inside a layer → the Llama one (wqkv is split into QKV instead).
LAYER_LINEARS = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
}
LAYER_NORMS = {
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
WQKV = "attention.wqkv"
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


@dataclass
class InternLM2Config:
    """The fields of InternLM2's `config.json` the conversion needs."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    bias: bool = False
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def load(cls, llm_dir: str | Path) -> InternLM2Config:
        path = Path(llm_dir) / "config.json"
        if not path.is_file():
            raise ConversionError(f"--llm: {llm_dir} has no config.json (expected the internlm2-chat-7b folder)")
        raw = json.loads(path.read_text())
        needed = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
        absent = [k for k in needed if k not in raw]
        if absent:
            raise ConversionError(f"--llm: {path} lacks {absent}")
        cfg = cls(
            hidden_size=raw["hidden_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
            intermediate_size=raw["intermediate_size"],
            vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=raw.get("rope_theta", 10000.0),
            rope_scaling=raw.get("rope_scaling"),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            bias=bool(raw.get("bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            torch_dtype=raw.get("torch_dtype"),
            raw=raw,
        )
        if cfg.bias:
            raise ConversionError(f"--llm: {path} has bias=true; only InternLM2 without linear biases is supported")
        if cfg.tie_word_embeddings:
            raise ConversionError(f"--llm: {path} ties the embeddings; InternLM2-chat-7b does not")
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConversionError(f"--llm: {path}: heads do not divide the hidden size / KV heads")
        return cfg

    def language_model_config(self, vocab_size: int) -> LanguageModelConfig:
        """Our Llama-layout config; `vocab_size` = rows of the fine-tuned embedding (base + 4 tokens)."""
        scaling = None
        if self.rope_scaling:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("dynamic", "linear"):
                raise ConversionError(f"--llm: unsupported rope_scaling {self.rope_scaling}")
            # InternLM2's dynamic NTK and Llama's "dynamic" use the same formula (base rescaled past
            # max_position_embeddings); "linear" divides positions by the factor in both.
            scaling = {"rope_type": kind, "factor": float(self.rope_scaling["factor"])}
        return LanguageModelConfig(
            model_type="llama",
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=float(self.rope_theta),
            rms_norm_eps=float(self.rms_norm_eps),
            rope_scaling=scaling,
            tie_word_embeddings=False,
        )

    def base_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the InternLM2 base checkpoint (HF remote-code names) with its shape."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkv_rows = (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.tok_embeddings.weight": (v, h)}
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes[p + "attention.wqkv.weight"] = (qkv_rows, h)
            shapes[p + "attention.wo.weight"] = (h, self.num_attention_heads * self.head_dim)
            shapes[p + "feed_forward.w1.weight"] = (i, h)
            shapes[p + "feed_forward.w3.weight"] = (i, h)
            shapes[p + "feed_forward.w2.weight"] = (h, i)
            shapes[p + "attention_norm.weight"] = (h,)
            shapes[p + "ffn_norm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        shapes["output.weight"] = (v, h)
        return shapes


def split_wqkv(w: torch.Tensor, cfg: InternLM2Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed (rows = (kv_heads · (g + 2) · head_dim), …) → q, k, v rows in Llama head order.

    Works for the weight and for a LoRA `lora_B` (same row layout, any number of columns).
    """
    kv, g, d = cfg.num_key_value_heads, cfg.groups, cfg.head_dim
    if w.shape[0] != kv * (g + 2) * d:
        raise ConversionError(f"wqkv has {w.shape[0]} rows, expected {kv * (g + 2) * d}")
    cols = w.shape[1:]
    grouped = w.reshape(kv, g + 2, d, *cols)
    q = grouped[:, :g].reshape(kv * g * d, *cols)
    k = grouped[:, g].reshape(kv * d, *cols)
    v = grouped[:, g + 1].reshape(kv * d, *cols)
    return q, k, v


class BaseCheckpoint:
    """The InternLM2 base weights, tensor by tensor: `*.safetensors` (preferred) or `pytorch_model*.bin`
    shards read with weights_only and memory-mapped. Nothing is loaded until asked for."""

    def __init__(self, llm_dir: str | Path):
        self.dir = Path(llm_dir)
        files = sorted(self.dir.glob("*.safetensors"))
        self.kind = "safetensors"
        if not files:
            files = sorted(p for p in self.dir.glob("*.bin") if p.name.startswith("pytorch_model"))
            self.kind = "bin"
        if not files:
            raise ConversionError(f"--llm: no *.safetensors or pytorch_model*.bin weights in {self.dir}")
        self.files = files
        self._where: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        for path in files:
            for key in self._keys(path):
                if key in self._where:
                    raise ConversionError(f"--llm: {key} is in both {self._where[key].name} and {path.name}")
                self._where[key] = path

    def _handle(self, path: Path):
        if path not in self._open:
            if self.kind == "safetensors":
                from safetensors import safe_open

                self._open[path] = safe_open(str(path), framework="pt")
            else:
                self._open[path] = state_dict_from(load_pth(path, "--llm"), path, "--llm")
        return self._open[path]

    def _keys(self, path: Path) -> list[str]:
        handle = self._handle(path)
        return list(handle.keys())

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        handle = self._handle(self._where[key])
        if self.kind == "safetensors":
            return tuple(handle.get_slice(key).get_shape())
        return tuple(handle[key].shape)

    def numel(self, key: str) -> int:
        n = 1
        for s in self.shape(key):
            n *= s
        return n

    def get(self, key: str) -> torch.Tensor:
        handle = self._handle(self._where[key])
        if self.kind == "safetensors":
            return handle.get_tensor(key)
        return handle[key]
