"""Configuration dataclasses of OMG-LLaVA, with the released (`official-7b`) dimensions.

Every size of the network lives here; the modules read nothing else. A config round-trips through
JSON (`to_dict` / `from_dict`) and is saved beside the weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageEncoderConfig:
    """ConvNeXt trunk (timm layout, as open_clip's `convnext_large_d_320` uses it).

    Input: (B, 3, image_size, image_size), CLIP-normalised, the image expanded to a square filled
    with the mean colour. Output: 4 maps of `dims` channels at strides 4, 8, 16, 32.
    official: depths (3, 3, 27, 3), dims (192, 384, 768, 1536), image_size 1024 → 256², 128², 64², 32².
    """

    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (192, 384, 768, 1536)
    image_size: int = 1024
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    layer_norm_eps: float = 1e-6
    # Initial value of each block's layer scale (`gamma`; its key exists either way). 1e-6 is
    # ConvNeXt's ImageNet choice and changes nothing for loaded weights; a model trained from scratch
    # in a few thousand steps needs its residual blocks on from the start (with 1e-6 the scales were
    # still ≈ 0.02 after 4 000 steps: an almost linear encoder that saw colour but not shape).
    layer_scale_init: float = 1e-6


@dataclass
class OmgDecoderConfig:
    """OMG-Seg's Mask2Former-style decoder ("OMG decoder").

    Pixel decoder: multi-scale deformable attention over the stride 8/16/32 maps
    (`pixel_decoder_layers` layers, `pixel_decoder_heads` heads, `pixel_decoder_points` points per level)
    → stride-4 mask features (B, hidden_dim, S/4, S/4) and 3 memories, low to high resolution.
    Transformer decoder: `num_layers` masked-attention layers (cross-attn, self-attn, FFN, post-norm),
    `num_queries` learned queries of `hidden_dim`; layer i attends to memory level i % 3.
    Class head: cosine similarity of `cls_proj` output (`clip_dim`) to `num_classes` text embeddings
    (`num_class_templates` synonyms each, max over synonyms) × exp(logit_scale), plus background.
    official: 256 hidden, 300 queries, 9 layers, 8 heads, FFN 2048; pixel decoder 6 layers, FFN 1024;
    133 COCO panoptic classes (80 things) with 17 synonyms of 768-d CLIP text embeddings.
    """

    hidden_dim: int = 256
    num_queries: int = 300
    num_heads: int = 8
    num_layers: int = 9
    ffn_dim: int = 2048
    num_feature_levels: int = 3
    pixel_decoder_layers: int = 6
    pixel_decoder_heads: int = 8
    pixel_decoder_points: int = 4
    pixel_decoder_ffn_dim: int = 1024
    num_groups: int = 32
    num_classes: int = 133
    num_thing_classes: int = 80
    num_class_templates: int = 17
    clip_dim: int = 768
    logit_scale: float = 4.6052
    class_names: tuple[str, ...] = ()
    # Mask2Former panoptic inference thresholds (used by `perceive`).
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    # finetuned_refseg/gcg: a second transformer decoder + mask MLP (`transformer_decoder_llm`,
    # `mask_embed_llm`) decodes the [SEG] and follow queries; perception keeps the frozen one.
    llm_decoder_copy: bool = False


@dataclass
class LanguageModelConfig:
    """The causal LM, as a Hugging Face config (`model_type` + keyword arguments).

    `vocab_size` is the embedding size *after* adding `[SEG]`, `<p>`, `</p>`, `<region>`
    (official: 92544 InternLM2 tokens + 4 = 92548; `<mark>` has no row).
    official: InternLM2-chat-7B in the Llama layout: hidden 4096, 32 layers, 32 heads, 8 KV heads,
    FFN 14336, rope_theta 1e6, dynamic RoPE scaling ×2.
    """

    model_type: str = "llama"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    intermediate_size: int = 14336
    vocab_size: int = 92548
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-5
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_hf_config(self):
        from transformers import AutoConfig

        kwargs = {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
            **self.extra,
        }
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        # transformers 5 keeps theta and scaling together in `rope_parameters`.
        config = AutoConfig.for_model(self.model_type, rope_parameters=rope, **kwargs)
        return config


@dataclass
class OmgLlavaConfig:
    """The whole model.

    Pixel-centric tokens: pixel shuffle (factor `pixel_shuffle_ratio`) of the last encoder stage
    → (S/64)² tokens of 4·dims[-1] channels (official 256 × 6144), concatenated with the
    perception-prior embedding (2·hidden_dim = 512) → pixel MLP (6656 → 4096 → 4096).
    Object-centric tokens: [query feature; query position] (512) → `query_proj` (512 → 6144)
    → object MLP (6144 → 4096 → 4096); visual prompts share this path.
    Text projector: LLM hidden (4096) → 512 → 512, split into query content and position.

    perception_prior: "concat" (the official code), "additive" (the paper's MS·Q + F; the pixel MLP
    input is then 4·dims[-1]) or "none" (the prior zeroed, for the ablation).
    object_token_grid: where a query must win the per-pixel argmax of P to become an object token:
    "tokens" (the official code: the pixel-token grid, i.e. P sampled at the token centres),
    "mask" (the decoder's stride-4 mask grid, which no object of a few tokens' size can slip through)
    or "merged" (the mask-grid winners with duplicate queries of one object suppressed, things
    ordered left to right by mask centroid, then stuff: see `perception_prior.merged_selection`)
    or "split" ("merged", and a thing whose mask falls in separate object-sized pieces gives one
    token per piece: `perception_prior.split_pieces`).
    """

    name: str = "official-7b"
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    decoder: OmgDecoderConfig = field(default_factory=OmgDecoderConfig)
    language_model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    pixel_shuffle_ratio: int = 2
    perception_prior: str = "concat"
    prior_smooth_ratio: float = 0.5
    object_token_grid: str = "tokens"
    # Half size, in model-input pixels, of the box a point prompt becomes (official: ±3 px).
    point_box_half_size: float = 3.0
    # Point and box prompts on an object the panoptic pass found become that object's mask prompt
    # (`prompt_snapping`; ours, not the official model's behaviour).
    snap_prompts: bool = False
    # Channels of the mask refiner (`mask_refiner`; ours): 0 = none, masks are the decoder's logits
    # upsampled bilinearly, as in the official model.
    mask_refiner_channels: int = 0
    # Object tokens carry where their object is, and `[SEG]` states say where theirs is
    # (`object_location`; ours): off in the official model.
    locate_objects: bool = False
    # The `[SEG]` pointer also weighs relations to an anchor object and areas (`object_location`,
    # "the star left of the red circle", "the largest object"; ours): needs locate_objects.
    point_relations: bool = False
    # The pointer applies "the {shape} left of the {color} {shape}" as a rule on what it reads: the
    # relation, the target's shape and each object's shape (`object_location`; ours). The number of
    # shapes its heads tell apart (the world's five); 0 = off. Needs point_relations.
    relation_shapes: int = 0
    max_new_tokens: int = 256
    system_prompt: str = ""

    @property
    def pixel_token_dim(self) -> int:
        return self.image_encoder.dims[-1] * self.pixel_shuffle_ratio**2

    @property
    def query_token_dim(self) -> int:
        return 2 * self.decoder.hidden_dim

    @property
    def pixel_mlp_in_dim(self) -> int:
        if self.perception_prior == "additive":
            return self.pixel_token_dim
        return self.pixel_token_dim + self.query_token_dim

    @property
    def num_pixel_tokens(self) -> int:
        side = self.image_encoder.image_size // (32 * self.pixel_shuffle_ratio)
        return side * side

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmgLlavaConfig:
        data = dict(data)
        enc = ImageEncoderConfig(**_tuples(data.pop("image_encoder", {})))
        dec = OmgDecoderConfig(**_tuples(data.pop("decoder", {})))
        lm = LanguageModelConfig(**data.pop("language_model", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown OmgLlavaConfig fields: {sorted(unknown)}")
        return cls(image_encoder=enc, decoder=dec, language_model=lm, **data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> OmgLlavaConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def official_7b() -> OmgLlavaConfig:
    """The released OMG-LLaVA 7B dimensions (ConvNeXt-L 1024², OMG decoder, InternLM2-7B)."""
    return OmgLlavaConfig(
        name="official-7b",
        language_model=LanguageModelConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        max_new_tokens=256,
    )


def tiny() -> OmgLlavaConfig:
    """A few-MB random-weight config of the same architecture, for tests and smoke runs."""
    return OmgLlavaConfig(
        name="tiny",
        image_encoder=ImageEncoderConfig(depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), image_size=256),
        decoder=OmgDecoderConfig(
            hidden_dim=64,
            num_queries=12,
            num_heads=4,
            num_layers=3,
            ffn_dim=128,
            pixel_decoder_layers=1,
            pixel_decoder_heads=4,
            pixel_decoder_points=2,
            pixel_decoder_ffn_dim=128,
            num_groups=8,
            num_classes=6,
            num_thing_classes=5,
            num_class_templates=2,
            clip_dim=32,
            class_names=("circle", "square", "triangle", "star", "cross", "table"),
            object_mask_threshold=0.0,
            overlap_threshold=0.0,
        ),
        language_model=LanguageModelConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=0,  # set from the tokenizer
            max_position_embeddings=1024,
            rope_theta=10000.0,
        ),
        max_new_tokens=32,
    )


TOYWORLD_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
TOYWORLD_SHAPES = ("circle", "square", "triangle", "star", "cross")


def embedded() -> OmgLlavaConfig:
    """The small model trained on the tabletop world and shipped in the package.

    ConvNeXt (2, 2, 6, 2) × (32, 64, 128, 256) at 256² → 64 pixel tokens of 256 (+ 256 prior): no
    pixel shuffle: object tokens carry no position (as in the official model), so where things are
    comes from the pixel tokens, and 4×4 cells of 64 px are too coarse to order objects left to right;
    OMG decoder hidden 128, 16 queries, 6 layers; classes: the 30 colour-shape pairs (things) and
    `table` (stuff); a 6-layer Llama-style LLM of hidden 256 trained from scratch.
    """
    things = tuple(f"{c} {s}" for c in TOYWORLD_COLORS for s in TOYWORLD_SHAPES)
    return OmgLlavaConfig(
        name="embedded",
        image_encoder=ImageEncoderConfig(
            depths=(2, 2, 6, 2), dims=(32, 64, 128, 256), image_size=256, layer_scale_init=1.0
        ),
        decoder=OmgDecoderConfig(
            hidden_dim=128,
            num_queries=16,
            num_heads=4,
            num_layers=6,
            ffn_dim=512,
            # One deformable layer with 2 points: the pixel decoder dominates the per-frame cost
            # of follow mode on a CPU, and the toy scenes need little global context.
            pixel_decoder_layers=1,
            pixel_decoder_heads=4,
            pixel_decoder_points=2,
            pixel_decoder_ffn_dim=256,
            num_groups=16,
            num_classes=len(things) + 1,
            num_thing_classes=len(things),
            num_class_templates=1,
            clip_dim=64,
            class_names=things + ("table",),
            object_mask_threshold=0.5,
            overlap_threshold=0.5,
        ),
        language_model=LanguageModelConfig(
            hidden_size=256,
            # 6 layers of 8 heads: with 4 of 4 the LLM lost its place in captions among neighbours
            # of one colour ("a blue cross, a blue cross" for a cross and a star).
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=8,
            intermediate_size=704,
            vocab_size=0,  # set from the tokenizer trained with the model
            max_position_embeddings=512,
            rope_theta=10000.0,
        ),
        max_new_tokens=96,
        pixel_shuffle_ratio=1,
        # Token centres lie 32 px apart, and a small object (12 px radius) often covers none of
        # them: selected on the token grid, it would reach the LLM as no object token at all. Its
        # decoder often gives two objects alike one query: "split" makes them two tokens again.
        object_token_grid="split",
        # Its decoder finds an object from a point prompt poorly (mask IoU 0.36; a box 0.65, a mask
        # 0.86), while its panoptic masks are good: see `prompt_snapping`.
        snap_prompts=True,
        # Its stride-4 masks are 64²: boundaries come out 1-3 px off, a quarter of a small object.
        mask_refiner_channels=16,
        # Of two objects alike, referring picked one by chance without it (cIoU 0.38 between them).
        locate_objects=True,
        # Without it the pointer chose the wrong object for most of "the star left of the red
        # circle" and "the largest object" (cIoU 0.59-0.73 on forms 5 and 6).
        point_relations=True,
        # Refits of that pointer found the target of 0.93-0.95 of relation questions; applying the
        # form-5 rule to what small heads read found 0.98 (`training.relation_choice_fit`).
        relation_shapes=5,
    )


PRESETS = {"official-7b": official_7b, "tiny": tiny, "embedded": embedded}


def get_config(name: str) -> OmgLlavaConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown config {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()
