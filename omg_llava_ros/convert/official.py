"""The released OMG-LLaVA files → an `OmgLlava.from_pretrained` directory.

Sources (official_checkpoint_keys.md; OMG_LLAVA_REFERENCE.md §3):
- `omg_seg_convl.pth`: `{"state_dict": {panoptic_head.*}}` — the OMG decoder (ours: `omg_decoder.*`,
  same names after the prefix).
- open_clip `convnext_large_d_320` (`laion2b_s29b_b131k_ft_soup`): `visual.trunk.stem.*`,
  `visual.trunk.stages.*` → `image_encoder.stem.*`, `image_encoder.stages.*`; the rest of CLIP
  (text tower, trunk head, projection head) is not used.
- `convnext_large_d_320_CocoPanopticOVDataset.pth`: a bare [classes, synonyms, 768] tensor →
  the `omg_decoder.class_embed` buffer.
- `omg_llava_7b_finetune_8gpus.pth` (flat dict): `projector.model.*` → `visual_projector.*`,
  `projector_text2vision.*` → `text_projector.*`; `llm.base_model.model.*` (peft): the fine-tuned
  `tok_embeddings`, the LM head `output.base_layer` and LoRA pairs on wqkv/wo/w1/w3/w2/output.
  `finetuned_refseg.pth` / `finetuned_gcg.pth` add the [SEG] decoder copy
  `visual_encoder.panoptic_head.{transformer_decoder_llm,mask_embed_llm}.*`. The pretrain
  checkpoint (`llm.model.tok_embeddings.weight`, `llm.output.weight`, no LoRA) is accepted too.
- `internlm2-chat-7b/`: config.json, the base weights, tokenizer.model + tokenizer_config.json.

Every expected tensor must be present with its shape and every present one must be used; the only
tolerance is for tiny extras (≤ 64 elements, logged) and for the parts of the CLIP file that are not
the image trunk.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omg_llava_ros.convert.coco_classes import COCO_PANOPTIC_NAMES, COCO_PANOPTIC_THINGS
from omg_llava_ros.convert.files import (
    ConversionError,
    ShardedSafetensorsWriter,
    StreamingSafetensorsWriter,
    TensorSpec,
    drop_tiny_extras,
    format_keys,
    load_any_state_dict,
    load_pth,
    load_tensor,
    state_dict_from,
)
from omg_llava_ros.convert.internlm2 import (
    LAYER_LINEARS,
    LAYER_NORMS,
    QKV,
    WQKV,
    BaseCheckpoint,
    InternLM2Config,
    split_wqkv,
)
from omg_llava_ros.convert.lora import (
    OFFICIAL_LORA_ALPHA,
    OFFICIAL_LORA_RANK,
    AdapterConfig,
    LoraPair,
    adapter_key,
    merge_lora,
)
from omg_llava_ros.model.config import OmgLlavaConfig, get_config

log = logging.getLogger(__name__)

# Source names, as the error messages call them (= the CLI options).
OMG_SEG, LLAVA, LLM, CLIP, CLASS_EMBEDS, DECODER_COPY = (
    "--omg-seg",
    "--llava",
    "--llm",
    "--clip",
    "--class-embeds",
    "--decoder-copy",
)

# (our prefix, official prefix) per source.
OMG_SEG_PREFIXES = (("omg_decoder.", "panoptic_head."),)
CLIP_PREFIXES = (
    ("image_encoder.stem.", "visual.trunk.stem."),
    ("image_encoder.stages.", "visual.trunk.stages."),
)
PROJECTOR_PREFIXES = (
    ("visual_projector.", "projector.model."),
    ("text_projector.", "projector_text2vision."),
)
DECODER_COPY_PREFIXES = (
    ("omg_decoder.transformer_decoder_llm.", "visual_encoder.panoptic_head.transformer_decoder_llm."),
    ("omg_decoder.mask_embed_llm.", "visual_encoder.panoptic_head.mask_embed_llm."),
)
COPY_OFFICIAL_PREFIXES = tuple(theirs for _, theirs in DECODER_COPY_PREFIXES)
CLASS_EMBED_KEY = "omg_decoder.class_embed"

# Parts of the open_clip CLIP checkpoint that OMG-LLaVA does not use (text tower, heads).
CLIP_UNUSED_PREFIXES = (
    "visual.trunk.head.",
    "visual.trunk.norm_pre.",
    "visual.head.",
    "transformer.",
    "token_embedding.",
    "ln_final.",
)
CLIP_UNUSED_NAMES = frozenset({"positional_embedding", "text_projection", "logit_scale", "logit_bias", "attn_mask"})

PEFT = "llm.base_model.model."  # PeftModel → LoraModel → InternLM2ForCausalLM
PRETRAIN_EMBED, PRETRAIN_HEAD = "llm.model.tok_embeddings.weight", "llm.output.weight"
FINETUNE_EMBED, FINETUNE_HEAD = PEFT + "model.tok_embeddings.weight", PEFT + "output.base_layer.weight"
OLD_PEFT_HEAD = PEFT + "output.weight"  # peft < 0.7 did not wrap the base layer
LORA_TARGETS = (WQKV, "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


def lora_keys(module: str) -> tuple[str, str]:
    """Official names of a LoRA pair; `module` is an InternLM2 path such as `model.layers.0.attention.wqkv`."""
    return PEFT + module + ".lora_A.default.weight", PEFT + module + ".lora_B.default.weight"


@dataclass
class OfficialFiles:
    omg_seg: Path
    llava: Path
    llm: Path
    clip: Path
    class_embeds: Path
    decoder_copy: Path | None = None


@dataclass
class ConvertOptions:
    keep_lora: bool = False
    dtype: torch.dtype = torch.bfloat16
    lora_alpha: float = OFFICIAL_LORA_ALPHA
    max_shard_bytes: int = 2 * 10**9
    base_config: OmgLlavaConfig | str = "official-7b"


@dataclass
class _Problems:
    """Every problem of every source, reported together."""

    lines: list[str] = field(default_factory=list)

    def check(
        self,
        source: str,
        present: dict[str, torch.Tensor],
        expected: dict[str, tuple[int, ...]],
        ignorable=lambda key: False,
    ) -> None:
        missing = [k for k in expected if k not in present]
        unexpected = {k: v for k, v in present.items() if k not in expected and not ignorable(k)}
        fatal = drop_tiny_extras(unexpected, source)
        wrong = [
            f"{k} {list(present[k].shape)} (expected {list(expected[k])})"
            for k in expected
            if k in present and tuple(present[k].shape) != tuple(expected[k])
        ]
        if missing:
            self.lines.append(f"{source}: {len(missing)} missing key(s): {format_keys(missing)}")
        if fatal:
            self.lines.append(f"{source}: {len(fatal)} unmapped key(s): {format_keys(fatal)}")
        if wrong:
            self.lines.append(f"{source}: {len(wrong)} shape mismatch(es): {format_keys(wrong)}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConversionError("the official checkpoints do not convert:\n  " + "\n  ".join(self.lines))


# -- key maps -------------------------------------------------------------------------------------
def vision_sources(our_shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, str]]:
    """Our non-LLM keys → {source: {official key: our key}} (the class embedding is handled apart)."""
    out: dict[str, dict[str, str]] = {OMG_SEG: {}, CLIP: {}, LLAVA: {}, DECODER_COPY: {}}

    def put(source: str, key: str, prefixes) -> bool:
        for ours, theirs in prefixes:
            if key.startswith(ours):
                out[source][theirs + key[len(ours) :]] = key
                return True
        return False

    for key in our_shapes:
        if key == CLASS_EMBED_KEY:
            continue
        done = (
            put(DECODER_COPY, key, DECODER_COPY_PREFIXES)
            or put(OMG_SEG, key, OMG_SEG_PREFIXES)
            or put(CLIP, key, CLIP_PREFIXES)
            or put(LLAVA, key, PROJECTOR_PREFIXES)
        )
        if not done:
            raise AssertionError(f"no official source for model key {key}")
    return out


def clip_unused(key: str) -> bool:
    return key in CLIP_UNUSED_NAMES or key.startswith(CLIP_UNUSED_PREFIXES)


def llava_llm_shapes(lm: InternLM2Config, rows: int, rank: int, pretrain: bool) -> dict[str, tuple[int, ...]]:
    """The LLM tensors of an OMG-LLaVA checkpoint (finetune: peft names, 339 − 15 at 7B)."""
    h = lm.hidden_size
    if pretrain:
        return {PRETRAIN_EMBED: (rows, h), PRETRAIN_HEAD: (rows, h)}
    shapes: dict[str, tuple[int, ...]] = {FINETUNE_EMBED: (rows, h), FINETUNE_HEAD: (rows, h)}
    base = lm.base_shapes()
    for n in range(lm.num_hidden_layers):
        for target in LORA_TARGETS:
            out_f, in_f = base[f"model.layers.{n}.{target}.weight"]
            a, b = lora_keys(f"model.layers.{n}.{target}")
            shapes[a], shapes[b] = (rank, in_f), (out_f, rank)
    a, b = lora_keys("output")
    shapes[a], shapes[b] = (rank, h), (rows, rank)
    return shapes


def llama_order(num_layers: int) -> list[str]:
    """The converted LLM's tensors in the order they are produced."""
    names = ["model.embed_tokens.weight"]
    for n in range(num_layers):
        p = f"model.layers.{n}."
        names += [p + m + ".weight" for m in (*QKV, *LAYER_LINEARS.values())]
        names += [p + m + ".weight" for m in LAYER_NORMS.values()]
    return names + ["model.norm.weight", "lm_head.weight"]


def build_config(
    base: OmgLlavaConfig | str, lm: InternLM2Config, rows: int, class_embeds: torch.Tensor, decoder_copy: bool
) -> OmgLlavaConfig:
    config = copy.deepcopy(get_config(base) if isinstance(base, str) else base)
    config.language_model = lm.language_model_config(rows)
    dec = config.decoder
    if class_embeds.ndim != 3:
        raise ConversionError(
            f"{CLASS_EMBEDS}: expected a [classes, synonyms, dim] tensor, got {list(class_embeds.shape)}"
        )
    if tuple(class_embeds.shape) != (dec.num_classes, dec.num_class_templates, dec.clip_dim):
        if len(dec.class_names) not in (0, class_embeds.shape[0]):
            dec.class_names = ()
        dec.num_classes, dec.num_class_templates, dec.clip_dim = class_embeds.shape
    if not dec.class_names and dec.num_classes == len(COCO_PANOPTIC_NAMES):
        dec.class_names, dec.num_thing_classes = COCO_PANOPTIC_NAMES, COCO_PANOPTIC_THINGS
    dec.llm_decoder_copy = decoder_copy
    return config


def _meta_shapes(config: OmgLlavaConfig) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(non-LLM, LLM) state-dict shapes of the model the config describes, built on the meta device."""
    from omg_llava_ros.model.language_model import build_language_model
    from omg_llava_ros.model.omg_llava import OmgLlava

    llm = build_language_model(config.language_model, device="meta")
    model = OmgLlava(config, llm=llm, device="meta")
    vision = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("llm.")}
    return vision, {k: tuple(v.shape) for k, v in llm.state_dict().items()}


def expected_official_shapes(
    config: OmgLlavaConfig, lm: InternLM2Config, rank: int = OFFICIAL_LORA_RANK, pretrain: bool = False
) -> dict[str, dict[str, tuple[int, ...]]]:
    """Every official file's tensors for a config, without allocating (tests compare it with the listing)."""
    vision, _ = _meta_shapes(config)
    sources = vision_sources(vision)
    out = {src: {theirs: vision[ours] for theirs, ours in m.items()} for src, m in sources.items()}
    out[LLAVA].update(llava_llm_shapes(lm, config.language_model.vocab_size, rank, pretrain))
    out[LLM] = lm.base_shapes()
    out[CLASS_EMBEDS] = {"": vision[CLASS_EMBED_KEY]}
    return out


# -- conversion -----------------------------------------------------------------------------------
class _Llava:
    """The OMG-LLaVA checkpoint (memory-mapped), its kind and LoRA facts."""

    def __init__(self, path: Path):
        self.path = path
        self.sd = state_dict_from(load_pth(path, LLAVA), path, LLAVA)
        if FINETUNE_HEAD not in self.sd and OLD_PEFT_HEAD in self.sd:
            self.sd[FINETUNE_HEAD] = self.sd.pop(OLD_PEFT_HEAD)
        if FINETUNE_EMBED in self.sd:
            self.pretrain = False
            self.embed_key, self.head_key = FINETUNE_EMBED, FINETUNE_HEAD
        elif PRETRAIN_EMBED in self.sd:
            self.pretrain = True
            self.embed_key, self.head_key = PRETRAIN_EMBED, PRETRAIN_HEAD
        else:
            raise ConversionError(
                f"{LLAVA}: {path} has neither {FINETUNE_EMBED} (finetune checkpoint) nor {PRETRAIN_EMBED} "
                "(pretrain checkpoint); is it an OMG-LLaVA checkpoint?"
            )
        self.rows = self.sd[self.embed_key].shape[0]
        a_key = lora_keys(f"model.layers.0.{WQKV}")[0]
        self.rank = 0 if self.pretrain else (self.sd[a_key].shape[0] if a_key in self.sd else OFFICIAL_LORA_RANK)
        self.has_decoder_copy = any(k.startswith(COPY_OFFICIAL_PREFIXES) for k in self.sd)

    def lora(self, module: str) -> LoraPair | None:
        if self.pretrain:
            return None
        a, b = lora_keys(module)
        return LoraPair(self.sd[a], self.sd[b])


def convert_official(files: OfficialFiles, out: str | Path, options: ConvertOptions | None = None) -> Path:
    """Convert and write `out`; returns it. Raises ConversionError listing every problem found."""
    options = options or ConvertOptions()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"--out: {out} exists and is not empty")

    lm = InternLM2Config.load(files.llm)
    base = BaseCheckpoint(files.llm)
    llava = _Llava(Path(files.llava))
    if options.keep_lora and llava.pretrain:
        raise ConversionError(f"--keep-lora: {files.llava} is a pretrain checkpoint and has no LoRA")
    scaling = options.lora_alpha / llava.rank if llava.rank else 0.0
    if llava.rank and llava.rank != OFFICIAL_LORA_RANK:
        log.warning(
            "LoRA rank %d (official: %d); scaling = %g / %d",
            llava.rank,
            OFFICIAL_LORA_RANK,
            options.lora_alpha,
            llava.rank,
        )

    copy_sd: dict[str, torch.Tensor] = {}
    if files.decoder_copy is not None:
        if llava.has_decoder_copy:
            raise ConversionError(f"{DECODER_COPY}: {files.llava} already holds a decoder copy; give only one")
        full = load_any_state_dict(files.decoder_copy, DECODER_COPY)
        copy_sd = {k: v for k, v in full.items() if k.startswith(COPY_OFFICIAL_PREFIXES)}
        log.info(
            "%s: using %d decoder-copy tensors, not the other %d", DECODER_COPY, len(copy_sd), len(full) - len(copy_sd)
        )
        if not copy_sd:
            raise ConversionError(f"{DECODER_COPY}: {files.decoder_copy} has no {COPY_OFFICIAL_PREFIXES[0]}* tensors")
    elif llava.has_decoder_copy:
        copy_sd = {k: llava.sd.pop(k) for k in list(llava.sd) if k.startswith(COPY_OFFICIAL_PREFIXES)}

    class_embeds = load_tensor(files.class_embeds, CLASS_EMBEDS)
    config = build_config(options.base_config, lm, llava.rows, class_embeds, decoder_copy=bool(copy_sd))
    vision_shapes, llm_shapes = _meta_shapes(config)
    sources = vision_sources(vision_shapes)
    omg_seg = load_any_state_dict(files.omg_seg, OMG_SEG)
    clip = load_any_state_dict(files.clip, CLIP)

    problems = _Problems()
    problems.check(OMG_SEG, omg_seg, {k: vision_shapes[v] for k, v in sources[OMG_SEG].items()})
    problems.check(CLIP, clip, {k: vision_shapes[v] for k, v in sources[CLIP].items()}, clip_unused)
    llava_expected = {k: vision_shapes[v] for k, v in sources[LLAVA].items()}
    llava_expected.update(llava_llm_shapes(lm, llava.rows, llava.rank, llava.pretrain))
    problems.check(LLAVA, llava.sd, llava_expected)
    if copy_sd:
        copy_source = DECODER_COPY if files.decoder_copy is not None else LLAVA
        problems.check(copy_source, copy_sd, {k: vision_shapes[v] for k, v in sources[DECODER_COPY].items()})
    base_tensors = {k: _ShapeOnly(base.shape(k)) for k in base.names()}
    problems.check(LLM, base_tensors, lm.base_shapes())
    if tuple(class_embeds.shape) != vision_shapes[CLASS_EMBED_KEY]:
        problems.lines.append(
            f"{CLASS_EMBEDS}: shape {list(class_embeds.shape)}, expected {vision_shapes[CLASS_EMBED_KEY]}"
        )
    else:
        norms = class_embeds.float().norm(dim=-1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            problems.lines.append(f"{CLASS_EMBEDS}: the embeddings are not L2-normalised (OMG-Seg requires it)")
    problems.raise_if_any()
    missing_llm = set(llm_shapes) ^ set(llama_order(lm.num_hidden_layers))
    if missing_llm:
        raise AssertionError(f"Llama layout and conversion order differ: {sorted(missing_llm)}")

    from omg_llava_ros.convert.tokenizer import omg_llava_tokenizer

    tokenizer = omg_llava_tokenizer(files.llm, llava.rows)

    out.mkdir(parents=True, exist_ok=True)
    _write_vision(out, sources, vision_shapes, omg_seg, clip, llava.sd, copy_sd, class_embeds)
    del omg_seg, clip
    _write_llm(out / "llm", config, lm, base, llava, options, scaling, llm_shapes)
    tokenizer.save_pretrained(out / "tokenizer")
    config.save(out / "config.json")
    record = {
        "name": config.name,
        "load": "OmgLlava.from_pretrained(path)",
        "converted_from": {k: str(v) for k, v in vars(files).items() if v is not None},
        "llm_dtype": str(options.dtype).replace("torch.", ""),
        "lora": "kept as a peft adapter in llm/" if options.keep_lora else ("merged" if llava.rank else "none"),
        "lora_rank": llava.rank,
        "lora_alpha": options.lora_alpha if llava.rank else None,
        "decoder_copy": bool(copy_sd),
    }
    (out / "README.txt").write_text(json.dumps(record, indent=2))
    log.info("wrote %s", out)
    return out


@dataclass(frozen=True)
class _ShapeOnly:
    """Stands in for a base tensor during the key check, so nothing is read."""

    shape: tuple[int, ...]

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _write_vision(out, sources, shapes, omg_seg, clip, llava_sd, copy_sd, class_embeds) -> None:
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for source, sd in ((OMG_SEG, omg_seg), (CLIP, clip), (LLAVA, llava_sd), (DECODER_COPY, copy_sd)):
        for theirs, ours in sources[source].items():
            # The vision side and the projectors stay float32, as in the official stack.
            state[ours] = sd[theirs].to(torch.float32).contiguous()
    state[CLASS_EMBED_KEY] = class_embeds.to(torch.float32).contiguous()
    if set(state) != set(shapes):
        raise AssertionError(f"vision keys differ: {sorted(set(state) ^ set(shapes))}")
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


def _llm_tensors(
    lm: InternLM2Config, base: BaseCheckpoint, llava: _Llava, dtype: torch.dtype, scaling: float, merge: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """The Llama-layout tensors in `llama_order`, LoRA merged or not."""
    yield "model.embed_tokens.weight", llava.sd[llava.embed_key].to(dtype)
    for n in range(lm.num_hidden_layers):
        src, dst = f"model.layers.{n}.", f"model.layers.{n}."
        lora = llava.lora(src + WQKV) if merge else None
        qkv = merge_lora(base.get(src + WQKV + ".weight"), lora, scaling, dtype)
        for name, part in zip(QKV, split_wqkv(qkv, lm), strict=True):
            yield dst + name + ".weight", part.contiguous()
        del qkv
        for theirs, ours in LAYER_LINEARS.items():
            lora = llava.lora(src + theirs) if merge else None
            yield dst + ours + ".weight", merge_lora(base.get(src + theirs + ".weight"), lora, scaling, dtype)
        for theirs, ours in LAYER_NORMS.items():
            yield dst + ours + ".weight", base.get(src + theirs + ".weight").to(dtype)
        log.info("LLM layer %d/%d converted", n + 1, lm.num_hidden_layers)
    yield "model.norm.weight", base.get("model.norm.weight").to(dtype)
    head_lora = llava.lora("output") if merge else None
    yield "lm_head.weight", merge_lora(llava.sd[llava.head_key], head_lora, scaling, dtype)


def _adapter_tensors(lm: InternLM2Config, llava: _Llava, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The LoRA pairs renamed onto the Llama modules; wqkv's B split like the weight, A shared."""
    for n in range(lm.num_hidden_layers):
        src, dst = f"model.layers.{n}.", f"model.layers.{n}."
        pair = llava.lora(src + WQKV)
        for name, b in zip(QKV, split_wqkv(pair.b, lm), strict=True):
            yield adapter_key(dst + name, "A"), pair.a.to(dtype)
            yield adapter_key(dst + name, "B"), b.to(dtype).contiguous()
        for theirs, ours in LAYER_LINEARS.items():
            pair = llava.lora(src + theirs)
            yield adapter_key(dst + ours, "A"), pair.a.to(dtype)
            yield adapter_key(dst + ours, "B"), pair.b.to(dtype)
    pair = llava.lora("output")
    yield adapter_key("lm_head", "A"), pair.a.to(dtype)
    yield adapter_key("lm_head", "B"), pair.b.to(dtype)


def _adapter_specs(lm: InternLM2Config, rows: int, rank: int, dtype: torch.dtype) -> list[TensorSpec]:
    shapes = {
        "self_attn.q_proj": (lm.num_attention_heads * lm.head_dim, lm.hidden_size),
        "self_attn.k_proj": (lm.num_key_value_heads * lm.head_dim, lm.hidden_size),
        "self_attn.v_proj": (lm.num_key_value_heads * lm.head_dim, lm.hidden_size),
        "self_attn.o_proj": (lm.hidden_size, lm.num_attention_heads * lm.head_dim),
        "mlp.gate_proj": (lm.intermediate_size, lm.hidden_size),
        "mlp.up_proj": (lm.intermediate_size, lm.hidden_size),
        "mlp.down_proj": (lm.hidden_size, lm.intermediate_size),
    }
    specs = []
    for n in range(lm.num_hidden_layers):
        for module in (*QKV, *LAYER_LINEARS.values()):
            out_f, in_f = shapes[module]
            path = f"model.layers.{n}.{module}"
            specs.append(TensorSpec(adapter_key(path, "A"), (rank, in_f), dtype))
            specs.append(TensorSpec(adapter_key(path, "B"), (out_f, rank), dtype))
    specs.append(TensorSpec(adapter_key("lm_head", "A"), (rank, lm.hidden_size), dtype))
    specs.append(TensorSpec(adapter_key("lm_head", "B"), (rows, rank), dtype))
    return specs


def _write_llm(
    directory: Path,
    config: OmgLlavaConfig,
    lm: InternLM2Config,
    base: BaseCheckpoint,
    llava: _Llava,
    options: ConvertOptions,
    scaling: float,
    llm_shapes: dict[str, tuple[int, ...]],
) -> None:
    dtype = options.dtype
    specs = [TensorSpec(name, llm_shapes[name], dtype) for name in llama_order(lm.num_hidden_layers)]
    writer = ShardedSafetensorsWriter(directory, specs, options.max_shard_bytes)
    with torch.no_grad():
        for name, tensor in _llm_tensors(lm, base, llava, dtype, scaling, merge=not options.keep_lora):
            writer.write(name, tensor)
    writer.close()
    hf_config = config.language_model.to_hf_config()
    hf_config.dtype = dtype
    hf_config.architectures = ["LlamaForCausalLM"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in lm.raw:
            setattr(hf_config, key, lm.raw[key])
    hf_config.save_pretrained(directory)
    if options.keep_lora:
        # Beside the base weights, so transformers (with peft installed) loads both from llm/.
        adapter = StreamingSafetensorsWriter(
            directory / "adapter_model.safetensors", _adapter_specs(lm, llava.rows, llava.rank, dtype)
        )
        with torch.no_grad():
            for name, tensor in _adapter_tensors(lm, llava, dtype):
                adapter.write(name, tensor)
        adapter.close()
        targets = [m.split(".")[-1] for m in (*QKV, *LAYER_LINEARS.values())] + ["lm_head"]
        AdapterConfig(r=llava.rank, lora_alpha=options.lora_alpha, target_modules=targets).save(directory)
