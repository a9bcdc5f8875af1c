"""ONNX export of the vision engines and the checks every exported graph must pass.

Two graphs per model and input resolution:
- encoder: pixels (images, 3, S, S) → last_stage (images, C4, S/32, S/32), mask_features
  (images, C, S/4, S/4) and one memory per level (images, h·w, C), level embedding added.
- decoder: one image's mask_features and memories (batch 1), queries and positions (batch, queries, C),
  per-level `allowed` (batch, queries, h·w) bool and `use_prediction` (batch, queries) bool →
  the last layer's mask logits, the final query, class logits and IoU.
The key positions are constants at a fixed resolution and are baked into the decoder graph.
Unconstrained calls pass all-True `allowed` and `use_prediction`, which reproduces the
unconstrained attention masks exactly, so one decoder graph serves every kind of query.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). Compared with the
TorchScript exporter it folds all shape arithmetic into constants, names the output dimensions after
the input dimensions they come from (so "no data-dependent output shape" can be checked from the
graph alone) and is the maintained path; the TorchScript exporter is deprecated.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from omg_llava_ros.engines import trt_operators as trt_ops
from omg_llava_ros.engines.cache import atomic_write
from omg_llava_ros.engines.spec import (
    BATCH,
    IMAGES,
    QUERIES,
    EngineBuildError,
    EngineNotBuiltError,
    GraphCheckError,
    GraphSpec,
    memory_positions,
)
from omg_llava_ros.model.omg_decoder import DecoderMemory, OmgDecoder, QueryConstraints

if TYPE_CHECKING:
    import onnx

    from omg_llava_ros.model.omg_llava import OmgLlava

log = logging.getLogger(__name__)

# Bump when the graph wrappers or tensor names change: older exports are then redone.
EXPORT_FORMAT = 1
OPSET = 18  # LayerNormalization needs ≥ 17; TensorRT 10 parses up to 20.
EXPORT_META = "export.json"


# -- graph wrappers -----------------------------------------------------------------------------
class EncoderGraph(nn.Module):
    """Image encoder + pixel decoder, returning plain tensors (the level positions are dropped)."""

    def __init__(self, model: OmgLlava):
        super().__init__()
        self.image_encoder = model.image_encoder
        self.omg_decoder = model.omg_decoder

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.image_encoder(pixels)
        memory = self.omg_decoder.encode_memory(features)
        return (features[-1], memory.mask_features, *memory.memories)


class DecoderGraph(nn.Module):
    """The masked-attention decoder with constraints always present and only the final outputs."""

    def __init__(self, decoder: OmgDecoder, spec: GraphSpec, seg_decoder: bool = False):
        super().__init__()
        self.decoder = decoder
        self.spec = spec
        self.seg_decoder = seg_decoder and spec.seg_decoder
        layers = decoder.transformer_decoder_llm if self.seg_decoder else decoder.transformer_decoder
        self.post_norm = layers.post_norm
        for i, pos in enumerate(memory_positions(spec, device=decoder.query_feat.weight.device)):
            self.register_buffer(f"position_{i}", pos, persistent=False)

    def forward(self, mask_features: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = self.spec.num_levels
        memories = list(rest[:n])
        query, query_pos = rest[n], rest[n + 1]
        allowed, use_prediction = list(rest[n + 2 : 2 * n + 2]), rest[2 * n + 2]
        positions = [getattr(self, f"position_{i}") for i in range(n)]
        memory = DecoderMemory(mask_features, memories, positions, list(self.spec.level_shapes))
        dec = self.decoder
        constraints = QueryConstraints(allowed, use_prediction)
        out = dec.decode(query, query_pos, memory, constraints, with_class=False, seg_decoder=self.seg_decoder)
        normed = self.post_norm(out.query)
        mask_logits = out.mask_logits[-1]
        class_logits = fp16_safe_classify(dec, normed, mask_logits, mask_features)
        return mask_logits, out.query, class_logits, dec.iou_embed(normed)


def fp16_safe_classify(
    dec: OmgDecoder, query: torch.Tensor, mask_logits: torch.Tensor, mask_features: torch.Tensor
) -> torch.Tensor:
    """`OmgDecoder.classify` with the mask-pooling denominator clamped at 1 instead of `+ 1e-8`.

    1e-8 is 0 in FP16, so an empty mask would give 0/0 = NaN in a TensorRT FP16 engine. The
    denominator counts pixels (an integer), so in FP32 both forms give the same numbers.
    """
    binary = (mask_logits > 0).to(mask_features.dtype).flatten(2)
    weights = binary / binary.sum(-1, keepdim=True).clamp(min=1.0)
    pooled = torch.matmul(weights, mask_features.flatten(2).transpose(1, 2))
    embed = F.normalize(dec.cls_proj(dec.mask_pooling_proj(pooled) + query), dim=-1)
    sims = torch.einsum("bnd,ktd->bnkt", embed, dec.class_embed).amax(-1)
    logits = sims * torch.exp(torch.tensor(dec.config.logit_scale, dtype=sims.dtype))
    return torch.cat([logits, logits.new_zeros(logits.shape[:-1] + (1,))], dim=-1)


# -- export -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportedModel:
    """The exported graphs of one model in `directory`: roles "encoder", "decoder" and, for models
    with the [SEG] decoder copy, "seg_decoder"; `hashes` maps each role to its file's sha256."""

    directory: Path
    spec: GraphSpec
    hashes: dict[str, str]
    fingerprint: str

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.hashes)

    def path(self, role: str) -> Path:
        return self.directory / f"{role}.onnx"

    @property
    def encoder_path(self) -> Path:
        return self.path("encoder")

    @property
    def decoder_path(self) -> Path:
        return self.path("decoder")


def graph_roles(spec: GraphSpec) -> tuple[str, ...]:
    return ("encoder", "decoder", "seg_decoder") if spec.seg_decoder else ("encoder", "decoder")


def model_fingerprint(model: OmgLlava) -> str:
    """A content hash of what the vision graphs are made of: the vision config and weights."""
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    h.update(json.dumps({"image_encoder": cfg["image_encoder"], "decoder": cfg["decoder"]}, sort_keys=True).encode())
    for prefix, module in (("image_encoder.", model.image_encoder), ("omg_decoder.", model.omg_decoder)):
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{prefix}{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def export_onnx(model: OmgLlava, directory: str | Path, verify: bool = True) -> ExportedModel:
    """Export every graph of `model` into `directory` (overwriting), validate them and record hashes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = GraphSpec.from_model(model)
    fingerprint = model_fingerprint(model)
    log.info("exporting the vision graphs of %r at %d² to %s", model.config.name, spec.image_size, directory)
    (directory / EXPORT_META).unlink(missing_ok=True)  # no record while the files are being replaced
    was_training = model.training
    model.eval()
    try:
        export_encoder(model, spec, directory / "encoder.onnx")
        export_decoder(model, spec, directory / "decoder.onnx")
        if spec.seg_decoder:
            export_decoder(model, spec, directory / "seg_decoder.onnx", seg_decoder=True)
    finally:
        model.train(was_training)
    roles = graph_roles(spec)
    if verify:
        for role in roles:
            _check_against_spec(verify_graph(directory / f"{role}.onnx"), spec, role)
    files = {}
    for role in roles:
        path = directory / f"{role}.onnx"
        stat = path.stat()
        files[role] = {"name": path.name, "sha256": file_sha256(path), "size": stat.st_size, "mtime": stat.st_mtime}
    meta = {
        "format": EXPORT_FORMAT,
        "opset": OPSET,
        "torch": torch.__version__,
        "fingerprint": fingerprint,
        "spec": spec.to_dict(),
        "files": files,
    }
    atomic_write(directory / EXPORT_META, json.dumps(meta, indent=2).encode())
    return ExportedModel(directory, spec, {r: f["sha256"] for r, f in files.items()}, fingerprint)


def _check_against_spec(report: GraphReport, spec: GraphSpec, role: str) -> None:
    """The backends allocate and validate from `spec`; the graph must agree with it."""
    if role == "encoder":
        expected = {k: [IMAGES, *v[1:]] for k, v in spec.encoder_output_shapes(1).items()}
    else:
        expected = {k: [BATCH, QUERIES, *v[2:]] for k, v in spec.decoder_output_shapes(1, 1).items()}
    if report.outputs != expected:
        raise GraphCheckError(f"{report.path}: outputs {report.outputs} differ from the expected {expected}")


def load_exported(directory: str | Path, fingerprint: str | None = None) -> ExportedModel:
    """The export in `directory`; EngineNotBuiltError (with the reason) if it is absent or stale."""
    directory = Path(directory)
    meta_path = directory / EXPORT_META
    if not meta_path.is_file():
        raise EngineNotBuiltError(f"no ONNX export in {directory}")
    try:
        meta = json.loads(meta_path.read_text())
        spec = GraphSpec.from_dict(meta["spec"])
        fmt, stored_fp = meta["format"], meta["fingerprint"]
        files = {role: meta["files"][role] for role in graph_roles(spec)}
        hashes = {role: str(info["sha256"]) for role, info in files.items()}
    except (ValueError, KeyError, TypeError) as err:
        raise EngineNotBuiltError(f"the ONNX export record {meta_path} is unreadable ({err!r})") from None
    if fmt != EXPORT_FORMAT:
        raise EngineNotBuiltError(f"the ONNX export in {directory} has format {fmt}, not {EXPORT_FORMAT}")
    if fingerprint is not None and stored_fp != fingerprint:
        raise EngineNotBuiltError(f"the ONNX export in {directory} was made from other weights or another config")
    for info in files.values():
        path = directory / info["name"]
        if not path.is_file():
            raise EngineNotBuiltError(f"{path} is missing")
        stat = path.stat()
        # Re-hash only when size or mtime changed: hashing a large encoder on every start is slow.
        if (stat.st_size, stat.st_mtime) != (info["size"], info["mtime"]) and file_sha256(path) != info["sha256"]:
            raise EngineNotBuiltError(f"{path} was modified or is corrupt (its hash differs from the export record)")
    return ExportedModel(directory, spec, hashes, stored_fp)


def export_encoder(model: OmgLlava, spec: GraphSpec, path: Path) -> None:
    s = spec.image_size
    # Batch 2 as the example: torch.export specialises a dimension of size 1 to a constant.
    pixels = torch.zeros(2, 3, s, s, device=model.device)
    images = torch.export.Dim(IMAGES, min=1, max=1024)
    export_graph(EncoderGraph(model), (pixels,), path, spec.encoder_inputs, spec.encoder_outputs, ({0: images},))


def export_decoder(model: OmgLlava, spec: GraphSpec, path: Path, seg_decoder: bool = False) -> None:
    dev, c, m = model.device, spec.hidden_dim, spec.mask_size
    b, n = 2, 3  # > 1 for the same reason as the encoder batch
    gen = torch.Generator().manual_seed(0)
    args: list[torch.Tensor] = [torch.randn(1, c, m, m, generator=gen)]
    args += [torch.randn(1, h * w, c, generator=gen) for h, w in spec.level_shapes]
    args += [torch.randn(b, n, c, generator=gen), torch.randn(b, n, c, generator=gen)]
    args += [torch.ones(b, n, h * w, dtype=torch.bool) for h, w in spec.level_shapes]
    args += [torch.ones(b, n, dtype=torch.bool)]
    batch = torch.export.Dim(BATCH, min=1, max=4096)
    queries = torch.export.Dim(QUERIES, min=1, max=4096)
    dyn = {0: batch, 1: queries}
    memory_shapes = tuple(None for _ in spec.level_shapes)
    rest = (*memory_shapes, dyn, dyn, *(dyn for _ in spec.level_shapes), dyn)
    graph = DecoderGraph(model.omg_decoder, spec, seg_decoder)
    export_graph(graph, tuple(a.to(dev) for a in args), path, spec.decoder_inputs, spec.decoder_outputs, (None, rest))


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple[Any, ...],
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with _quiet_exporter(), torch.no_grad():
        try:
            torch.onnx.export(
                module,
                args,
                str(tmp),
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=OPSET,
                dynamo=True,
                external_data=False,  # one self-contained file: simple to hash, copy and parse
                verbose=False,
            )
        except Exception as err:  # the exporter raises many types; report them as one
            tmp.unlink(missing_ok=True)
            raise EngineBuildError(f"ONNX export of {path.name} failed: {err}") from err
    os.replace(tmp, path)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints progress and the optimizer logs a line per skipped fold; keep it quiet."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            devnull = stack.enter_context(open(os.devnull, "w"))  # noqa: SIM115 - closed by the stack
            stack.enter_context(contextlib.redirect_stdout(devnull))
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# -- verification -------------------------------------------------------------------------------
@dataclass
class GraphReport:
    """What `verify_graph` found. `problems` is empty for a valid graph."""

    path: str
    opset: int
    ops: dict[str, int]
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    problems: list[str] = field(default_factory=list)


def verify_graph(model: str | Path | onnx.ModelProto, raise_on_error: bool = True) -> GraphReport:
    """onnx.checker, TensorRT 10 operator support (types and restrictions), and shapes that depend
    only on input shapes. Raises GraphCheckError listing every problem (unless told not to)."""
    import onnx
    from onnx import shape_inference

    path = str(model) if not isinstance(model, onnx.ModelProto) else "<in memory>"
    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    problems: list[str] = []
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        problems.append(f"onnx.checker: {err}")
    inferred = shape_inference.infer_shapes(proto, data_prop=True)
    graph = inferred.graph

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not trt_ops.MIN_OPSET <= opset <= trt_ops.MAX_OPSET:
        problems.append(f"opset {opset} is outside TensorRT 10's range {trt_ops.MIN_OPSET}…{trt_ops.MAX_OPSET}")

    types = _element_types(graph)
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    ops = collections.Counter(n.op_type for n in graph.node)
    for node in graph.node:
        problems += _node_problems(node, types, constants)

    problems += _value_dependent_shapes(graph, constants)
    inputs = {v.name: _dims(v) for v in graph.input if v.name not in constants}
    outputs = {v.name: _dims(v) for v in graph.output}
    input_symbols = {d for dims in inputs.values() for d in dims if isinstance(d, str)}
    for name, dims in outputs.items():
        for d in dims:
            if d == "?" or (isinstance(d, str) and d not in input_symbols):
                problems.append(f"output {name!r} has a dimension {d!r} that is not an input dimension")
    report = GraphReport(path, opset, dict(ops), inputs, outputs, problems)
    if problems and raise_on_error:
        raise GraphCheckError(f"{path} failed validation:\n  " + "\n  ".join(problems))
    return report


def _node_problems(node: onnx.NodeProto, types: dict[str, str], constants: set[str]) -> list[str]:
    import onnx

    where = f"{node.op_type} node {node.name!r}"
    if node.domain not in ("", "ai.onnx"):
        return [f"{where} is in the custom domain {node.domain!r}"]
    if node.op_type in trt_ops.DATA_DEPENDENT_OPS:
        return [f"{where} has a data-dependent output shape or control flow"]
    allowed = trt_ops.SUPPORTED_OPS.get(node.op_type)
    if allowed is None:
        return [f"{where}: {node.op_type} is not supported by TensorRT 10's ONNX parser"]
    problems = []
    index = trt_ops.DATA_INPUT.get(node.op_type, 0)
    if 0 <= index < len(node.input) and node.input[index]:
        dtype = types.get(node.input[index], "UNKNOWN")
        if dtype not in allowed:
            problems.append(f"{where}: TensorRT does not support {node.op_type} on {dtype}")
    for i in trt_ops.CONSTANT_INPUTS.get(node.op_type, ()):
        if i < len(node.input) and node.input[i] and node.input[i] not in constants:
            problems.append(f"{where}: input {i} must be a constant for TensorRT")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
    if node.op_type == "Resize":
        if attrs.get("mode", "nearest") not in trt_ops.RESIZE_MODES:
            problems.append(f"{where}: mode {attrs['mode']!r} is not supported by TensorRT")
        coord = attrs.get("coordinate_transformation_mode", "half_pixel")
        if coord not in trt_ops.RESIZE_COORDINATE_MODES:
            problems.append(f"{where}: coordinate_transformation_mode {coord!r} is not supported by TensorRT")
        if attrs.get("antialias", 0):
            problems.append(f"{where}: antialiasing is not supported by TensorRT")
    if node.op_type == "LayerNormalization" and any(o for o in node.output[1:]):
        problems.append(f"{where}: TensorRT supports only the first output of LayerNormalization")
    return problems


def _value_dependent_shapes(graph: onnx.GraphProto, constants: set[str]) -> list[str]:
    """Inputs that set a shape (Reshape's shape, Expand's shape, …) must not depend on tensor *values*:
    only on constants and on the shapes of the inputs (through Shape / Size)."""
    tainted = {v.name for v in graph.input if v.name not in constants}
    problems = []
    for node in graph.node:  # ONNX graphs are topologically sorted
        for i in trt_ops.SHAPE_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] in tainted:
                problems.append(
                    f"{node.op_type} node {node.name!r}: its output shape depends on tensor values (input {i})"
                )
        if node.op_type in ("Shape", "Size", "Constant"):
            continue
        if any(name in tainted for name in node.input):
            tainted.update(node.output)
    return problems


def _element_types(graph: onnx.GraphProto) -> dict[str, str]:
    from onnx import TensorProto

    types = {}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        types[v.name] = TensorProto.DataType.Name(v.type.tensor_type.elem_type)
    for t in graph.initializer:
        types[t.name] = TensorProto.DataType.Name(t.data_type)
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = TensorProto.DataType.Name(a.t.data_type)
    return types


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    if not value.type.tensor_type.HasField("shape"):
        return ["?"]
    return [
        d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
        for d in value.type.tensor_type.shape.dim
    ]


# -- files --------------------------------------------------------------------------------------
def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
