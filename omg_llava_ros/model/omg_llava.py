"""OmgLlava: the network as one nn.Module, its loading and saving, and the model math of chat, follow and perceive.

The parts (encoder, OMG decoder, projectors, LLM, and ours where the config switches them on) and
the model math over them: the image pass into an `ImageState`, the perception prior and object tokens,
the conversation's LLM input, generation, and `[SEG]` / follow queries → masks, and panoptic
inference. It holds no per-image state: `predictor.OmgLlavaPredictor` keeps the image cache and
strings these steps into `chat`, `follow` and `perceive` (segment-anything's `SamPredictor` over
`Sam`). `model.chat(...)` and the others are conveniences through the model's one predictor.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from omg_llava_ros.model.chat_template import IMAGE_TOKEN, Turn, render_conversation
from omg_llava_ros.model.config import OmgLlavaConfig, get_config
from omg_llava_ros.model.image_encoder import ImageEncoder
from omg_llava_ros.model.language_model import (
    DEFAULT_CORPUS,
    Generation,
    LogitsProcessor,
    SpecialTokenIds,
    add_special_tokens,
    build_language_model,
    greedy_generate,
    special_token_ids,
    train_tokenizer,
)
from omg_llava_ros.model.mask_refiner import ImageGuide, MaskRefiner, RefinerCompute
from omg_llava_ros.model.object_location import (
    ObjectLocation,
    keep_component_nearest,
    mask_areas,
    mask_centroids,
    region_constraints,
)
from omg_llava_ros.model.omg_decoder import DecoderMemory, DecoderOutput, OmgDecoder
from omg_llava_ros.model.perception_prior import (
    PIECE_MIN_CELLS,
    PerceptionPrior,
    perception_prior,
    separate_pieces,
)
from omg_llava_ros.model.pixel_shuffle import pixel_shuffle
from omg_llava_ros.model.predictor import OmgLlavaPredictor
from omg_llava_ros.model.preprocessing import ImagePreprocessor, Letterbox
from omg_llava_ros.model.projectors import TextProjector, VisualProjector
from omg_llava_ros.model.prompt_encoder import PromptEncoder
from omg_llava_ros.model.prompt_snapping import snap_prompts
from omg_llava_ros.model.results import ChatResult, Conversation, Prompt, Segment
from omg_llava_ros.model.vision_backend import TorchVision, VisionBackend, load_vision_backend

# The public API: the result types are defined in `results` and importable from here as well.
__all__ = ["ChatResult", "Conversation", "OmgLlava", "Prompt", "Segment"]

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = -200  # xtuner's IMAGE_TOKEN_INDEX
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "weights" / "embedded"
CONFIG_FILE = "config.json"
VISION_WEIGHTS = "model.safetensors"


# -- per-image state ----------------------------------------------------------------------------
@dataclass
class ImageState:
    """Everything computed once per image (`OmgLlava.encode_image`); the perception fields are filled
    on first need (`OmgLlava._perceive_state`). A predictor keeps the last one."""

    key: str
    letterbox: Letterbox
    last_stage: torch.Tensor
    memory: DecoderMemory
    perception: DecoderOutput | None = None
    prior: PerceptionPrior | None = None
    visual_tokens: torch.Tensor | None = None
    refiner_features: ImageGuide | None = None  # the image's refiner features, where the model has a refiner


# -- the model ----------------------------------------------------------------------------------
class ModelFileError(ValueError):
    """A file of a model directory cannot be used; the message names the file and why."""


@contextlib.contextmanager
def _reading(path: Path, problem: str) -> Iterator[None]:
    """Re-raise anything that reading `path` raises as a ModelFileError naming the file."""
    try:
        yield
    except (FileNotFoundError, ImportError):
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 400 else detail[:397] + "..."
        raise ModelFileError(f"{path}: {problem}: {type(exc).__name__}: {detail}") from exc


class OmgLlava(nn.Module):
    """OMG-LLaVA: `OmgLlava.from_pretrained(path)` or `.from_config(name)`; then `chat`, `follow`,
    `perceive` on images (through `self.predictor`, see `OmgLlavaPredictor`).

    The methods with a leading underscore are the steps the predictor strings together, and the
    seams the bench's stage probe times; they are not user API."""

    def __init__(self, config: OmgLlavaConfig, tokenizer=None, llm: nn.Module | None = None, device="cpu"):
        super().__init__()
        self.config = config
        with torch.device(device):
            self.image_encoder = ImageEncoder(config.image_encoder)
            self.omg_decoder = OmgDecoder(config.decoder, config.image_encoder.dims)
            self.visual_projector = VisualProjector(config)
            self.text_projector = TextProjector(config)
            channels = config.mask_refiner_channels
            # Its initialisation draws from a forked random stream: every other module starts as
            # it would without a refiner.
            with torch.random.fork_rng(devices=[]):
                self.mask_refiner = MaskRefiner(channels) if channels else None
                self.object_location = (
                    ObjectLocation(
                        config.query_token_dim // 2,
                        config.language_model.hidden_size,
                        relations=config.point_relations,
                        relation_shapes=config.relation_shapes,
                    )
                    if config.locate_objects
                    else None
                )
        self.llm = llm if llm is not None else build_language_model(config.language_model, device=device)
        self.tokenizer = tokenizer
        self.tokens: SpecialTokenIds | None = special_token_ids(tokenizer) if tokenizer is not None else None
        enc = config.image_encoder
        self.preprocess = ImagePreprocessor(enc.image_size, enc.image_mean, enc.image_std)
        self.prompt_encoder = PromptEncoder(self.omg_decoder, enc.image_size, config.point_box_half_size)
        # Created on first use (`predictor`). Not an nn.Module, so it is no child of this one: the
        # state dict, `.to()` and the saved files are the network's alone.
        self._predictor: OmgLlavaPredictor | None = None
        # The vision engines (encoder + pixel decoder, and the transformer decoder) sit behind one
        # interface; omg_llava_ros.engines swaps in ONNX Runtime or TensorRT implementations.
        self.vision: VisionBackend = TorchVision(self)
        self.eval()
        self.requires_grad_(False)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        name: str | OmgLlavaConfig = "tiny",
        device="cpu",
        seed: int | None = 0,
        backend: str = "torch",
        **backend_options: Any,
    ) -> OmgLlava:
        """A model with random weights. "official-7b" has the released shapes; on device="meta" it
        allocates nothing (and has no tokenizer: the InternLM2 one comes with converted weights).
        `backend`, `backend_options`: where the vision parts run, as for `from_pretrained`."""
        config = get_config(name) if isinstance(name, str) else name
        if seed is not None and str(device) != "meta":
            torch.manual_seed(seed)
        tokenizer = None
        if config.language_model.vocab_size <= 0:
            tokenizer = train_tokenizer(DEFAULT_CORPUS)
            config.language_model.vocab_size = add_special_tokens(tokenizer)
        model = cls(config, tokenizer=tokenizer, device=device)
        if str(device) != "meta":
            model._init_class_embed()
        if backend != "torch":
            model.vision = load_vision_backend(backend, model, backend_options or None)
        return model

    def _init_class_embed(self) -> None:
        emb = torch.randn_like(self.omg_decoder.class_embed)
        self.omg_decoder.class_embed.copy_(torch.nn.functional.normalize(emb, dim=-1))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device="cpu",
        llm_dtype: torch.dtype | None = None,
        backend: str = "torch",
        **backend_options: Any,
    ):
        """Load a saved model directory; no argument loads the embedded default shipped in the package.
        `backend`: where the vision parts run, "torch" | "onnxruntime" | "tensorrt" | "auto" | "triton";
        `backend_options` go to it (e.g. `url="host:8000"` for "triton", `cache_dir=...` for the engines)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = Path(path) if path is not None else EMBEDDED_DIR
        if not (directory / CONFIG_FILE).is_file():
            if path is None:
                raise FileNotFoundError(
                    f"the embedded default model is not in this installation ({directory}); "
                    "build it with `omg-llava-ros train` or pass a model directory"
                )
            raise FileNotFoundError(f"{directory} is not an OMG-LLaVA model directory (no {CONFIG_FILE})")
        with _reading(directory / CONFIG_FILE, "not a usable model config"):
            config = OmgLlavaConfig.load(directory / CONFIG_FILE)
        if (directory / "llm" / "adapter_config.json").is_file():
            import importlib.util

            # transformers would silently load the base LLM without the adapter.
            if importlib.util.find_spec("peft") is None:
                raise ImportError(f"{directory / 'llm'} holds a LoRA adapter; install peft to load it")
        with _reading(directory / "tokenizer", "not a usable tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer", trust_remote_code=False)
        dtype = llm_dtype or (torch.float32 if str(device) == "cpu" else torch.bfloat16)
        with _reading(directory / "llm", "not a usable LLM (config.json + safetensors)"):
            llm = AutoModelForCausalLM.from_pretrained(
                directory / "llm", trust_remote_code=False, dtype=dtype, device_map=None
            ).to(device)
        with _reading(directory / CONFIG_FILE, "does not build a model with this LLM and tokenizer"):
            model = cls(config, tokenizer=tokenizer, llm=llm, device="meta")
        # The vision side computes in float32 whatever the stored precision (save_pretrained's dtype).
        with _reading(directory / VISION_WEIGHTS, "not a readable safetensors file (truncated or corrupt?)"):
            state = {
                k: v.float() if v.is_floating_point() else v
                for k, v in load_file(directory / VISION_WEIGHTS, device=str(device)).items()
            }
        with _reading(directory / VISION_WEIGHTS, f"does not match {directory / CONFIG_FILE}"):
            missing, unexpected = _load_vision_state(model, state)
        if missing or unexpected:
            raise ValueError(f"{directory / VISION_WEIGHTS}: missing keys {missing}, unexpected keys {unexpected}")
        model.eval().requires_grad_(False)
        if backend != "torch":
            model.vision = load_vision_backend(backend, model, backend_options or None)
        return model

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write config, weights (safetensors) and tokenizer to `path`. `dtype`: store the floating
        tensors in it (float16 halves the files; loading computes in float32 on the CPU again),
        None: as they are in memory."""
        from safetensors.torch import save_file

        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_FILE)
        vision = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("llm.")}
        save_file(_stored(vision, dtype), directory / VISION_WEIGHTS, metadata={"format": "pt"})
        llm_state = None if dtype is None else _stored(self.llm.state_dict(), dtype)
        self.llm.save_pretrained(directory / "llm", safe_serialization=True, state_dict=llm_state)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory / "tokenizer")
        (directory / "README.txt").write_text(
            json.dumps({"name": self.config.name, "load": "OmgLlava.from_pretrained(path)"}, indent=2)
        )

    @property
    def device(self) -> torch.device:
        return self.omg_decoder.query_feat.weight.device

    # -- the user API, through the model's predictor --------------------------------------------
    @property
    def predictor(self) -> OmgLlavaPredictor:
        """This model's predictor, made on first use; `chat`, `follow`, `perceive` and `set_image`
        below go through it, so they share one image cache."""
        if self._predictor is None:
            self._predictor = OmgLlavaPredictor(self)
        return self._predictor

    def set_image(self, image: np.ndarray, perception: bool = True) -> ImageState:
        """Same as `OmgLlavaPredictor(model).set_image`, on the model's one predictor (`predictor`)."""
        return self.predictor.set_image(image, perception)

    def chat(
        self,
        image: np.ndarray,
        text: str,
        prompts: Sequence[Prompt] | None = None,
        history: Conversation | None = None,
        max_new_tokens: int | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> ChatResult:
        """Same as `OmgLlavaPredictor(model).chat`, on the model's one predictor (`predictor`)."""
        return self.predictor.chat(image, text, prompts, history, max_new_tokens, logits_processor)

    def follow(self, image: np.ndarray, segments: Sequence[Segment]) -> list[Segment]:
        """Same as `OmgLlavaPredictor(model).follow`, on the model's one predictor (`predictor`)."""
        return self.predictor.follow(image, segments)

    def perceive(self, image: np.ndarray) -> list[Segment]:
        """Same as `OmgLlavaPredictor(model).perceive`, on the model's one predictor (`predictor`)."""
        return self.predictor.perceive(image)

    # -- image pass -----------------------------------------------------------------------------
    @property
    def refiner_compute(self) -> RefinerCompute | None:
        """Where the mask refiner's convolutions run: the vision backend's `refiner` where it has one
        (ONNX Runtime on the CPU), else the module itself; None for a model without a refiner."""
        if self.mask_refiner is None:
            return None
        return getattr(self.vision, "refiner", None) or self.mask_refiner

    def encode_image(self, image: np.ndarray, key: str) -> ImageState:
        """The image work every call needs (preprocessing, encoder, pixel decoder, and the mask
        refiner's image features) for a `check_image`d image; `key` names it for a cache."""
        pixels, box = self.preprocess(image)
        last_stage, memory = self.vision.encode(pixels)
        state = ImageState(key, box, last_stage, memory)
        if self.mask_refiner is not None:
            state.refiner_features = ImageGuide(self.refiner_compute, pixels.to(self.device))
        return state

    def perception_prior(self, out: DecoderOutput, pos: torch.Tensor, side: int) -> PerceptionPrior:
        """The perception prior and object tokens of a panoptic decoder pass `out` (batched) on a
        side × side pixel-token grid, with this model's settings."""
        cfg = self.config
        prior = perception_prior(
            out.class_logits,
            out.mask_logits[-1],
            out.query,
            pos,
            cfg.image_encoder.image_size,
            (side, side),
            cfg.prior_smooth_ratio,
            cfg.perception_prior,
            cfg.object_token_grid,
            cfg.decoder.num_thing_classes,
        )
        if self.object_location is not None:
            prior.object_centroids = [mask_centroids(masks.float()) for masks in prior.object_masks]
        if self.object_location is not None and self.object_location.relations:
            things = [
                out.class_logits[b, index, :-1].argmax(-1) < cfg.decoder.num_thing_classes
                for b, index in enumerate(prior.object_indices)
            ]
            prior.object_areas = [
                mask_areas(masks.float(), thing) for masks, thing in zip(prior.object_masks, things, strict=True)
            ]
        return prior

    def object_queries(self, prior: PerceptionPrior, b: int) -> torch.Tensor:
        """(n, 2C) [feature ; position] of image b's object tokens; with `locate_objects` the position
        half gains where the object is (`object_location`)."""
        tokens = prior.object_tokens[b]
        if self.object_location is None:
            return tokens
        cfg = self.config
        half = cfg.point_box_half_size / cfg.image_encoder.image_size
        term = self.object_location.encode(prior.object_centroids[b], self.omg_decoder.pos_linear, half)
        c = cfg.decoder.hidden_dim
        return torch.cat([tokens[:, :c], tokens[:, c:] + term.to(tokens.dtype)], dim=-1)

    def _perceive_state(self, state: ImageState) -> None:
        dec = self.omg_decoder
        q, pos = dec.panoptic_queries()
        out = self.vision.decode(q, pos, state.memory, with_class=True)
        ratio = self.config.pixel_shuffle_ratio
        shuffled = pixel_shuffle(state.last_stage, ratio)
        prior = self.perception_prior(out, pos, state.last_stage.shape[-1] // ratio)
        proj = self.visual_projector
        pixel_tokens = proj.pixel_tokens(shuffled, prior.pixel_prior)[0]
        object_tokens = proj.object_tokens(self.object_queries(prior, 0))
        state.perception, state.prior = out, prior
        state.visual_tokens = proj.image_sequence(pixel_tokens, object_tokens)

    # -- conversation -----------------------------------------------------------------------------
    def conversation_ids(self, turns: list[Turn]) -> list[int]:
        """Token ids of the rendered conversation, with IMAGE_PLACEHOLDER where `<image>` was."""
        text = render_conversation(turns, self.config.system_prompt)
        chunks = text.split(IMAGE_TOKEN)
        if len(chunks) > 2:
            raise ValueError(f"only one {IMAGE_TOKEN} per conversation is supported")
        ids: list[int] = [self.tokens.bos] if self.tokens.bos is not None else []
        for i, chunk in enumerate(chunks):
            if i > 0:
                ids.append(IMAGE_PLACEHOLDER)
            ids.extend(self.tokenizer.encode(chunk, add_special_tokens=False))
        return ids

    def _embed_conversation(self, ids: list[int], turns: list[Turn], state: ImageState) -> torch.Tensor:
        """`conversation_ids(turns)` → the LLM input, the turns' visual prompts in their slots."""
        prompts = [p for t in turns for p in t.prompts]
        return self.embed_ids(torch.tensor(ids, device=self.device), state, self.prompt_embeddings(prompts, state))

    def generate(
        self,
        embeds: torch.Tensor,
        max_new_tokens: int | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> Generation:
        """Greedy answer to the (L, hidden) LLM input `embeds`, with the `[SEG]` and phrase states."""
        return greedy_generate(
            self.llm,
            embeds[None],
            self.tokens.stop_ids,
            self.tokens.seg,
            max_new_tokens or self.config.max_new_tokens,
            logits_processor,
            (self.tokens.phrase_start, self.tokens.phrase_end),
        )

    def embed_ids(
        self, ids: torch.Tensor, state: ImageState | None, prompt_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """(L,) ids → (L', hidden) LLM input: image placeholder expanded, prompt tokens replaced."""
        embed = self.llm.get_input_embeddings()
        is_prompt = (ids == self.tokens.region) | (ids == self.tokens.mark)
        is_image = ids == IMAGE_PLACEHOLDER
        safe = torch.where(is_prompt | is_image, torch.zeros_like(ids), ids)
        x = embed(safe)
        n_prompt = int(is_prompt.sum())
        if n_prompt:
            given = 0 if prompt_embeds is None else len(prompt_embeds)
            if given != n_prompt:
                raise ValueError(f"{n_prompt} prompt token(s) but {given} prompt(s)")
            x = x.clone()
            x[is_prompt] = prompt_embeds.to(x.dtype)
        where = torch.nonzero(is_image).flatten()
        if len(where) == 0:
            return x
        if state is None or state.visual_tokens is None:
            raise ValueError("the text has an image token but no image was encoded")
        i = int(where[0])
        return torch.cat([x[:i], state.visual_tokens.to(x.dtype), x[i + 1 :]], dim=0)

    def prompt_embeddings(self, prompts: Sequence[Prompt], state: ImageState) -> torch.Tensor | None:
        """Visual prompts → (N, hidden) `<region>` embeddings: decoder query → shared object MLP."""
        if not prompts:
            return None
        encoded = [p.to_model(state.letterbox) for p in prompts]
        if self.config.snap_prompts and state.prior is not None:
            encoded = snap_prompts(encoded, self.found_object_logits(state), self.config.image_encoder.image_size)
        pe = self.prompt_encoder
        q, pos = pe.queries(encoded)
        constraints = pe.constraints(encoded, state.memory.level_shapes)
        out = self.vision.decode(q, pos, state.memory, constraints)
        tokens = torch.cat([out.query, pos], dim=-1)[:, 0]
        return self.visual_projector.object_tokens(tokens)

    def found_object_logits(self, state: ImageState) -> torch.Tensor:
        """(n, h, w) mask logits of the things among the image's object tokens (the panoptic pass)."""
        index = state.prior.object_indices[0]
        labels = state.perception.class_logits[0, index, :-1].argmax(-1)
        return state.prior.object_masks[0][labels < self.config.decoder.num_thing_classes]

    # -- masks ----------------------------------------------------------------------------------
    def _seg_points(self, gen, ids: list[int], state: ImageState) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For each `[SEG]` the object token it points at (`object_location`): (N, 2) centroids in
        [0, 1] of the model input and (N, h, w) those objects' panoptic mask logits; None without
        the head, a `[SEG]` or an object token. `ids`: the prompt's ids, as `conversation_ids`."""
        if self.object_location is None or len(gen.seg_hidden) == 0 or gen.prompt_hidden is None:
            return None
        centroids = state.prior.object_centroids[0]
        if len(centroids) == 0 or IMAGE_PLACEHOLDER not in ids:
            return None
        # The object tokens are the last of the visual tokens that replace the image placeholder.
        end = ids.index(IMAGE_PLACEHOLDER) + len(state.visual_tokens)
        objects = gen.prompt_hidden[end - len(centroids) : end]
        areas = state.prior.object_areas[0] if state.prior.object_areas is not None else None
        pointed = self.object_location.point(gen.seg_hidden, objects, centroids, areas, gen.phrase_hidden)
        pointed = pointed.argmax(-1)
        return centroids[pointed], state.prior.object_masks[0][pointed]

    def _decode_segs(
        self,
        seg_hidden: torch.Tensor,
        state: ImageState,
        phrases: list[str | None],
        located: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[Segment]:
        if len(seg_hidden) == 0:
            return []
        dtype = self.text_projector.model[0].weight.dtype
        q, pos = self.text_projector(seg_hidden.to(dtype))
        queries = torch.stack([q, pos], dim=1)  # (N, 2, C)
        points, regions = located if located is not None else (None, None)
        segments = self._masks_for_queries(queries, state, points, regions)
        for seg, phrase in zip(segments, phrases + [None] * len(segments), strict=False):
            seg.phrase = phrase
        return segments

    def _logits_to_image(self, logits: torch.Tensor, state: ImageState) -> torch.Tensor:
        """Decoder mask logits (N, h, w) → (N, H, W) at the input size, refined first where the model
        has a mask refiner."""
        if self.mask_refiner is not None and len(logits):
            logits = self.mask_refiner(logits, state.refiner_features, self.refiner_compute)
        return state.letterbox.logits_to_image(logits)

    def _masks_for_queries(
        self,
        queries: torch.Tensor,
        state: ImageState,
        points: torch.Tensor | None = None,
        regions: torch.Tensor | None = None,
    ) -> list[Segment]:
        """(N, 2, C) independent single queries → Segments at the input size. With `points` (N, 2),
        (x, y) in [0, 1] of the model input, each mask keeps only its component nearest its point;
        with `regions` (N, h, w) mask logits of where each query's object is, a query whose mask
        is mostly elsewhere (IoU < 0.5 with its region) is decoded again attending only there (as a
        mask prompt does)."""
        # [SEG] and follow queries use the decoder copy of finetuned_refseg/gcg where the model has one
        # (the flag is passed only then, so backends without a copy keep their signature).
        extra = {"seg_decoder": True} if self.config.decoder.llm_decoder_copy else {}
        out = self.vision.decode(queries[:, None, 0], queries[:, None, 1], state.memory, **extra)
        logits = out.mask_logits[-1][:, 0]
        if points is not None:
            logits = keep_component_nearest(logits, points)
        if regions is not None:
            inside = regions >= 0
            # Mostly elsewhere (IoU < 0.5 with the object the pointer chose): the query found another
            # object, a piece of it, or the chosen one merged with a neighbour.
            missed = torch.nonzero(_mostly_outside(logits >= 0, inside)).flatten()
            if len(missed):
                constraints = region_constraints(inside[missed], state.memory.level_shapes)
                again = self.vision.decode(
                    queries[missed, None, 0], queries[missed, None, 1], state.memory, constraints, **extra
                ).mask_logits[-1][:, 0]
                again = keep_component_nearest(again, points[missed]) if points is not None else again
                # Still mostly outside (a query for a small circle inside a large one lights a part of
                # it): the chosen object's own panoptic mask.
                still = _mostly_outside(again >= 0, inside[missed])
                again = torch.where(still[:, None, None], regions[missed].to(again.dtype), again)
                logits = logits.clone()
                logits[missed] = again
        logits = self._logits_to_image(logits, state)
        if regions is not None:
            # The refiner can shrink a faint mask to a sliver of its object: judged at the output, a
            # mask still mostly outside the chosen object gives way to that object's own mask.
            chosen = self._logits_to_image(regions.to(logits.dtype), state)
            still = _mostly_outside(logits > 0, chosen > 0)
            logits = torch.where(still[:, None, None], chosen, logits)
        segments = []
        for i in range(len(queries)):
            segments.append(Segment(None, *_mask_and_score(logits[i]), query=queries[i].detach().cpu()))
        return segments

    def piece_min_area(self, shape: tuple[int, ...]) -> float:
        """PIECE_MIN_CELLS of the decoder's stride-4 mask grid, in pixels of an image of `shape`."""
        cell = max(shape[:2]) / (self.config.image_encoder.image_size // 4)
        return PIECE_MIN_CELLS * cell**2

    # -- panoptic segmentation --------------------------------------------------------------------
    def panoptic_segments(self, state: ImageState) -> list[Segment]:
        """Panoptic segmentation of an image's perception pass (Mask2Former inference), labelled
        segments at the input size; `state` from `_perceive_state`."""
        out = state.perception
        cfg = self.config.decoder
        probs = out.class_logits[0].softmax(-1)
        scores, labels = probs.max(-1)
        num_classes = probs.shape[-1] - 1
        keep = (labels != num_classes) & (scores > cfg.object_mask_threshold)
        idx = torch.nonzero(keep).flatten()
        if len(idx) == 0:
            return []
        logits = self._logits_to_image(out.mask_logits[-1][0, idx], state)
        masks = logits.sigmoid()
        winner = panoptic_winners(scores[idx, None, None] * masks, labels[idx] < cfg.num_thing_classes, masks >= 0.5)
        names = cfg.class_names
        pos = self.omg_decoder.query_embed.weight
        segments: list[Segment] = []
        stuff: dict[int, int] = {}
        for k, q in enumerate(idx.tolist()):
            label = int(labels[q])
            original = masks[k] >= 0.5
            mask = (winner == k) & original
            area, orig_area = int(mask.sum()), int(original.sum())
            if area == 0 or orig_area == 0 or area / orig_area < cfg.overlap_threshold:
                continue
            name = names[label] if label < len(names) else str(label)
            if label >= cfg.num_thing_classes and label in stuff:
                # Stuff classes merge into one segment per class.
                seg = segments[stuff[label]]
                seg.mask = seg.mask | mask.cpu().numpy()
                continue
            query = torch.stack([out.query[0, q], pos[q]]).detach().cpu()
            mask = mask.cpu().numpy()
            if label >= cfg.num_thing_classes:
                segments.append(Segment(None, mask, float(scores[q]), label=name, query=query))
                stuff[label] = len(segments) - 1
                continue
            # Two objects alike under one query come out as one segment each ("split" object tokens).
            pieces = [mask]
            if self.config.object_token_grid == "split":
                pieces = separate_pieces(mask, None, self.piece_min_area(mask.shape))
            for piece in pieces:
                segments.append(Segment(None, piece, float(scores[q]), label=name, query=query))
        return segments


def panoptic_winners(weighted: torch.Tensor, is_thing: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """(N, H, W) score-weighted mask probabilities, (N,) thing flags, (N, H, W) masks → (H, W) the
    segment each pixel goes to (Mask2Former: the argmax of the weighted probabilities).

    Ours: things claim their pixels before stuff does. Objects stand on the table, and at an
    object's edge the confident table query outbid it, so every object lost a 1-2 px ring
    (mean IoU 0.82 of the panoptic masks against 0.88 of the same queries' own masks).
    """
    thing_weighted = weighted.masked_fill(~is_thing[:, None, None], -1.0)
    claimed = (inside & is_thing[:, None, None]).any(0)
    return torch.where(claimed, thing_weighted.argmax(0), weighted.argmax(0))


def _mask_and_score(logits: torch.Tensor) -> tuple[np.ndarray, float]:
    """Mask = sigmoid > 0.5; score = mean probability inside it (0 for an empty mask)."""
    mask = logits > 0
    score = float(logits.sigmoid()[mask].mean()) if bool(mask.any()) else 0.0
    return mask.cpu().numpy(), score


def _stored(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """`state` with its floating tensors in `dtype`; tensors that share storage (tied weights) still
    share it, so safetensors keeps one copy."""
    if dtype is None:
        return state
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        key = (v.data_ptr(), tuple(v.shape), v.stride())
        if key not in cast:
            cast[key] = v.to(dtype).contiguous()
        out[k] = cast[key]
    return out


def _load_vision_state(model: OmgLlava, state: dict[str, Any]) -> tuple[list[str], list[str]]:
    expected = {k for k in model.state_dict() if not k.startswith("llm.")}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if not missing and not unexpected:
        model.load_state_dict(state, strict=False, assign=True)
    return missing, unexpected


def _mostly_outside(masks: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(N, h, w) bool masks and regions → (N,) whether each mask has IoU < 0.5 with its (non-empty)
    region."""
    overlap = (masks & regions).flatten(1).sum(1)
    union = (masks | regions).flatten(1).sum(1)
    return (2 * overlap < union) & regions.flatten(1).any(1)
