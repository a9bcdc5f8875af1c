"""What the two exported graphs look like: tensor names, fixed sizes, dynamic ranges, errors.

Every backend (ONNX Runtime, TensorRT) and the exporter read their names and shapes from here, so
that a graph and the code feeding it cannot drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from omg_llava_ros.model.omg_llava import OmgLlava

# Dynamic axes: encoder image batch; decoder query batch and query count.
IMAGES, BATCH, QUERIES = "images", "batch", "queries"
PIXELS = "pixels"
DECODER_OUTPUTS = ("mask_logits", "query_out", "class_logits", "iou")
PRECISIONS = ("fp16", "fp32", "int8")


class EngineError(RuntimeError):
    """Base of the errors of the engines package."""


class BackendUnavailableError(EngineError):
    """The requested runtime (TensorRT, ONNX Runtime, a GPU) is not present on this machine."""


class EngineNotBuiltError(EngineError):
    """An ONNX file or engine is missing or stale and building was not allowed."""


class EngineBuildError(EngineError):
    """Export or engine build failed."""


class GraphCheckError(EngineError):
    """An exported graph failed validation (checker, TensorRT operator support, dynamic shapes)."""


@dataclass(frozen=True)
class GraphSpec:
    """The fixed sizes of one model's graphs at its input resolution (shared by its decoder graphs).

    level_shapes: the decoder memories, low to high resolution (strides 32, 16, 8 for 3 levels);
    mask_size: side of the stride-4 mask features; num_class_outputs: classes + background.
    """

    image_size: int
    hidden_dim: int
    encoder_channels: int
    level_shapes: tuple[tuple[int, int], ...]
    mask_size: int
    num_class_outputs: int
    seg_decoder: bool = False  # a second decoder graph for [SEG] / follow queries (llm_decoder_copy)

    @classmethod
    def from_model(cls, model: OmgLlava) -> GraphSpec:
        enc, dec = model.config.image_encoder, model.config.decoder
        # ConvNeXt: a stride-4 stem, then three stride-2 downsamplings (each floors).
        sides = [enc.image_size // 4]
        for _ in range(3):
            sides.append(sides[-1] // 2)
        levels = tuple((s, s) for s in reversed(sides[-dec.num_feature_levels :]))
        return cls(
            image_size=enc.image_size,
            hidden_dim=dec.hidden_dim,
            encoder_channels=enc.dims[-1],
            level_shapes=levels,
            mask_size=sides[0],
            num_class_outputs=dec.num_classes + 1,
            seg_decoder=bool(getattr(dec, "llm_decoder_copy", False)),
        )

    @property
    def num_levels(self) -> int:
        return len(self.level_shapes)

    @property
    def memory_names(self) -> list[str]:
        return [f"memory_{i}" for i in range(self.num_levels)]

    @property
    def allowed_names(self) -> list[str]:
        return [f"allowed_{i}" for i in range(self.num_levels)]

    @property
    def encoder_inputs(self) -> list[str]:
        return [PIXELS]

    @property
    def encoder_outputs(self) -> list[str]:
        return ["last_stage", "mask_features", *self.memory_names]

    @property
    def decoder_inputs(self) -> list[str]:
        return ["mask_features", *self.memory_names, "query", "query_pos", *self.allowed_names, "use_prediction"]

    @property
    def decoder_outputs(self) -> list[str]:
        return list(DECODER_OUTPUTS)

    def encoder_output_shapes(self, images: int) -> dict[str, tuple[int, ...]]:
        last = self.mask_size // 8
        shapes = {
            "last_stage": (images, self.encoder_channels, last, last),
            "mask_features": (images, self.hidden_dim, self.mask_size, self.mask_size),
        }
        for name, (h, w) in zip(self.memory_names, self.level_shapes, strict=True):
            shapes[name] = (images, h * w, self.hidden_dim)
        return shapes

    def decoder_output_shapes(self, batch: int, queries: int) -> dict[str, tuple[int, ...]]:
        return {
            "mask_logits": (batch, queries, self.mask_size, self.mask_size),
            "query_out": (batch, queries, self.hidden_dim),
            "class_logits": (batch, queries, self.num_class_outputs),
            "iou": (batch, queries, 1),
        }

    # -- what both runtime backends do around their engines ---------------------------------------
    def check_pixels(self, pixels: torch.Tensor) -> None:
        s = self.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"pixels must be (images, 3, {s}, {s}) for this engine, got {tuple(pixels.shape)}")

    def memory_from(self, outs: dict[str, torch.Tensor], positions: list[torch.Tensor]):
        """The encoder graph's outputs as the model's DecoderMemory."""
        from omg_llava_ros.model.omg_decoder import DecoderMemory

        return DecoderMemory(
            outs["mask_features"],
            [outs[name] for name in self.memory_names],
            positions,
            [tuple(s) for s in self.level_shapes],
        )

    @staticmethod
    def output_from(outs: dict[str, torch.Tensor], with_class: bool):
        """The decoder graph's outputs as the model's DecoderOutput (last layer only)."""
        from omg_llava_ros.model.omg_decoder import DecoderOutput

        out = DecoderOutput([outs["mask_logits"]], outs["query_out"])
        if with_class:
            out.class_logits, out.iou = outs["class_logits"], outs["iou"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphSpec:
        data = dict(data)
        data["level_shapes"] = tuple(tuple(s) for s in data["level_shapes"])
        return cls(**data)


@dataclass(frozen=True)
class EngineShapes:
    """The dynamic ranges a compiled engine accepts (TensorRT optimisation profiles).

    max_images: encoder batch; max_batch: decoder query batch (prompts, [SEG] queries and followed
    objects are decoded as a batch of single queries); max_queries: queries per batch item (the
    panoptic pass uses all learned queries); opt_queries: the count TensorRT tunes its kernels for.
    """

    max_queries: int
    max_batch: int = 16
    max_images: int = 1
    opt_queries: int = 8

    def __post_init__(self) -> None:
        for name in ("max_queries", "max_batch", "max_images", "opt_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineShapes.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.opt_queries > self.max_queries:
            object.__setattr__(self, "opt_queries", self.max_queries)

    def encoder_profile(self, spec: GraphSpec) -> dict[str, tuple[tuple[int, ...], ...]]:
        s = spec.image_size
        return {PIXELS: ((1, 3, s, s), (1, 3, s, s), (self.max_images, 3, s, s))}

    def decoder_profile(self, spec: GraphSpec) -> dict[str, tuple[tuple[int, ...], ...]]:
        """dynamic input name → (min, opt, max) shape. The memories are static (one image) and absent."""
        c, b, q, opt = spec.hidden_dim, self.max_batch, self.max_queries, self.opt_queries
        profile: dict[str, tuple[tuple[int, ...], ...]] = {}
        for name in ("query", "query_pos"):
            profile[name] = ((1, 1, c), (1, opt, c), (b, q, c))
        for name, (h, w) in zip(spec.allowed_names, spec.level_shapes, strict=True):
            profile[name] = ((1, 1, h * w), (1, opt, h * w), (b, q, h * w))
        profile["use_prediction"] = ((1, 1), (1, opt), (b, q))
        return profile


def memory_positions(spec: GraphSpec, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The decoder's constant key positions per level, as `OmgDecoder.encode_memory` makes them."""
    from omg_llava_ros.model.positional_encoding import frame_position_term, sine_position_encoding

    half = spec.hidden_dim // 2
    frame = frame_position_term(half, device=device)
    return [sine_position_encoding(h, w, half, device=device) + frame for h, w in spec.level_shapes]
