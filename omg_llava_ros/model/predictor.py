"""OmgLlavaPredictor: the per-image cache and the user calls chat, follow and perceive.

As segment-anything's `SamPredictor` over `Sam`: the `OmgLlava` module computes, the predictor holds
state. `set_image` runs the expensive image work once (encoder, pixel decoder, the panoptic
perception pass, the perception prior and the LLM's visual tokens) and keeps it for the last image;
prompt passes, `[SEG]` passes and later turns on the same image reuse it, and follow mode needs only
the encoder and pixel decoder. The predictor also turns the conversation into the model's input and
the model's output into `ChatResult` / `Segment`s.

Every step is a call through the model's attribute (`self.model.X`), so what replaces one on the
model instance (the bench's stage probe, the referring probe's recorder) is what runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from omg_llava_ros.model.chat_template import IMAGE_TOKEN, Turn, first_user_text
from omg_llava_ros.model.language_model import MARK_TOKEN, REGION_TOKEN, LogitsProcessor
from omg_llava_ros.model.perception_prior import piece_followed
from omg_llava_ros.model.preprocessing import check_image
from omg_llava_ros.model.results import ChatResult, Conversation, Prompt, Segment, phrases_for_segs

if TYPE_CHECKING:
    from omg_llava_ros.model.omg_llava import ImageState, OmgLlava


class OmgLlavaPredictor:
    """`OmgLlavaPredictor(model)`: chat, follow and perceive on images, the last image's work cached.

    `OmgLlava.chat` / `.follow` / `.perceive` / `.set_image` go through one predictor per model
    (`model.predictor`), so they share its cache; a predictor of your own has a cache of its own.
    """

    def __init__(self, model: OmgLlava):
        self.model = model
        self._state: ImageState | None = None

    # -- image pass -----------------------------------------------------------------------------
    @torch.no_grad()
    def set_image(self, image: np.ndarray, perception: bool = True) -> ImageState:
        """Run (or reuse) the expensive per-image work. The last image stays cached. `perception`:
        also the panoptic pass and the LLM's visual tokens (chat, perceive), else only the encoder and
        pixel decoder (follow); a later call that needs them adds them to the cached state."""
        image = check_image(image)
        key = _image_key(image)
        state = self._state
        if state is None or state.key != key:
            state = self.model.encode_image(image, key)
            self._state = state
        if perception and state.perception is None:
            self.model._perceive_state(state)
        return state

    def reset_image(self) -> None:
        """Forget the cached image: the next call does the image work again."""
        self._state = None

    # -- chat -----------------------------------------------------------------------------------
    @torch.no_grad()
    def chat(
        self,
        image: np.ndarray,
        text: str,
        prompts: Sequence[Prompt] | None = None,
        history: Conversation | None = None,
        max_new_tokens: int | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> ChatResult:
        """Answer `text` about `image`. `prompts` fill the `<region>` / `<mark>` tokens of `text`, in order."""
        model = self.model
        if model.tokenizer is None or model.tokens is None:
            raise RuntimeError("this model has no tokenizer; load converted weights with from_pretrained()")
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        prompts = list(prompts or [])
        n_slots = text.count(REGION_TOKEN) + text.count(MARK_TOKEN)
        if n_slots != len(prompts):
            raise ValueError(
                f"the text has {n_slots} {REGION_TOKEN}/{MARK_TOKEN} token(s) but {len(prompts)} prompt(s) were given"
            )
        if IMAGE_TOKEN in text and history is not None and history.turns:
            raise ValueError(f"{IMAGE_TOKEN} may only appear in the first turn")
        state = self.set_image(image, perception=True)
        past = list(history.turns) if history is not None else []
        user = first_user_text(text) if not past else text
        turns = past + [Turn(user=user, prompts=prompts)]

        ids = model.conversation_ids(turns)
        gen = model.generate(model._embed_conversation(ids, turns, state), max_new_tokens, logits_processor)
        answer = model.tokenizer.decode(gen.token_ids, skip_special_tokens=False)
        turns[-1] = Turn(user=user, assistant=answer, prompts=prompts)
        located = model._seg_points(gen, ids, state)
        segments = model._decode_segs(gen.seg_hidden, state, phrases_for_segs(answer), located)
        return ChatResult(answer, segments, Conversation(turns))

    # -- follow and perceive --------------------------------------------------------------------
    @torch.no_grad()
    def follow(self, image: np.ndarray, segments: Sequence[Segment]) -> list[Segment]:
        """The same objects on a new frame: only the encoder, pixel decoder and the cached queries."""
        tracked = [s for s in segments if s.query is not None]
        if len(tracked) != len(segments):
            raise ValueError("every segment to follow needs its decoder query (segments from chat/perceive)")
        state = self.set_image(image, perception=False)
        if not segments:
            return []
        model = self.model
        queries = torch.stack([s.query for s in segments]).to(model.device)
        found = model._masks_for_queries(queries, state)
        split = model.config.object_token_grid == "split"
        for new, old in zip(found, segments, strict=True):
            new.phrase, new.label = old.phrase, old.label
            if split and old.mask.shape == new.mask.shape:
                new.mask = piece_followed(new.mask, old.mask, model.piece_min_area(new.mask.shape))
        return found

    @torch.no_grad()
    def perceive(self, image: np.ndarray) -> list[Segment]:
        """Panoptic segmentation by the frozen perception module alone (Mask2Former inference)."""
        return self.model.panoptic_segments(self.set_image(image, perception=True))


def _image_key(image: np.ndarray) -> str:
    h = hashlib.blake2b(image.tobytes(), digest_size=16)
    h.update(str(image.shape).encode())
    return h.hexdigest()
