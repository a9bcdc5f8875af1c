"""The vision calls over the exported graphs, whatever runs them (ONNX Runtime, TensorRT).

`GraphVision` turns the model's `encode` / `decode` calls into the graphs' named inputs and back
(`GraphSpec`), once for every engine backend; a backend only says how a graph runs
(`run_encoder`, `run_decoder`).
"""

from __future__ import annotations

import torch

from omg_llava_ros.engines.spec import GraphSpec
from omg_llava_ros.model.omg_decoder import DecoderMemory, DecoderOutput, QueryConstraints
from omg_llava_ros.model.vision_backend import VisionBackend


class GraphVision(VisionBackend):
    """encode / decode over the encoder and decoder graphs of `spec`; `positions` are the memory's
    position encodings (`memory_positions`), which the graphs do not output."""

    spec: GraphSpec
    positions: list[torch.Tensor]

    def run_encoder(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) float pixels → the encoder graph's outputs by name."""
        raise NotImplementedError

    def run_decoder(
        self, role: str, feeds: dict[str, torch.Tensor], batch: int, queries: int
    ) -> dict[str, torch.Tensor]:
        """The decoder graph `role` ("decoder" / "seg_decoder") on `feeds` → its outputs by name."""
        raise NotImplementedError

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, DecoderMemory]:
        self.spec.check_pixels(pixels)
        outs = self.run_encoder(pixels.float())
        return outs["last_stage"], self.spec.memory_from(outs, self.positions)

    def decode(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        memory: DecoderMemory,
        constraints: QueryConstraints | None = None,
        with_class: bool = False,
        seg_decoder: bool = False,
    ) -> DecoderOutput:
        feeds = decoder_feeds(self.spec, query, query_pos, memory, constraints)
        b, n = query.shape[:2]
        outs = self.run_decoder(decoder_role(self.spec, seg_decoder), feeds, b, n)
        return self.spec.output_from(outs, with_class)


def decoder_role(spec: GraphSpec, seg_decoder: bool) -> str:
    """[SEG] and follow queries use the decoder copy where the model has one (as OmgDecoder.decode)."""
    return "seg_decoder" if seg_decoder and spec.seg_decoder else "decoder"


def decoder_feeds(
    spec: GraphSpec,
    query: torch.Tensor,
    query_pos: torch.Tensor,
    memory: DecoderMemory,
    constraints: QueryConstraints | None,
) -> dict[str, torch.Tensor]:
    """The decoder graph's inputs for one call; without constraints all-True masks, which give the
    unconstrained attention exactly. Validates shapes with clear messages."""
    c = spec.hidden_dim
    if query.ndim != 3 or query.shape[-1] != c:
        raise ValueError(f"query must be (batch, queries, {c}), got {tuple(query.shape)}")
    if query_pos.shape != query.shape:
        raise ValueError(f"query_pos {tuple(query_pos.shape)} must have the query's shape {tuple(query.shape)}")
    b, n = query.shape[:2]
    if b < 1 or n < 1:
        raise ValueError(f"at least one query is needed, got shape {tuple(query.shape)}")
    if memory.mask_features.shape[0] != 1:
        raise ValueError(
            f"the decoder engine decodes over one image's memory; got {memory.mask_features.shape[0]} images"
        )
    if len(memory.memories) != spec.num_levels:
        raise ValueError(f"expected {spec.num_levels} memory levels, got {len(memory.memories)}")
    feeds = {"mask_features": memory.mask_features.float()}
    for name, m in zip(spec.memory_names, memory.memories, strict=True):
        feeds[name] = m.float()
    feeds["query"], feeds["query_pos"] = query.float(), query_pos.float()
    dev = query.device
    for i, (name, (h, w)) in enumerate(zip(spec.allowed_names, spec.level_shapes, strict=True)):
        if constraints is None:
            feeds[name] = torch.ones(1, 1, h * w, dtype=torch.bool, device=dev).expand(b, n, -1)
        else:
            allowed = constraints.allowed[i]
            if allowed.ndim != 3 or allowed.shape[-1] != h * w:
                raise ValueError(
                    f"constraints.allowed[{i}] must be (batch, queries, {h * w}), got {tuple(allowed.shape)}"
                )
            feeds[name] = allowed.to(torch.bool).expand(b, n, h * w)
    if constraints is None:
        feeds["use_prediction"] = torch.ones(1, 1, dtype=torch.bool, device=dev).expand(b, n)
    else:
        feeds["use_prediction"] = constraints.use_prediction.to(torch.bool).expand(b, n)
    return feeds
