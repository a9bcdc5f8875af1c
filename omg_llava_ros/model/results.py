"""What goes into `chat` and comes out of chat, follow and perceive: visual prompts, segments, answers.

Plain data with no model in it, so that callers (the pipeline, the node's messages, evaluation) can
hold and pass results without touching the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from omg_llava_ros.model.chat_template import Turn
from omg_llava_ros.model.language_model import PHRASE_END, PHRASE_START, SEG_TOKEN
from omg_llava_ros.model.preprocessing import Letterbox
from omg_llava_ros.model.prompt_encoder import EncodedPrompt

_TAG_RE = re.compile(r"<p>(.*?)</p>|\[SEG\]", re.DOTALL)


@dataclass(frozen=True)
class Prompt:
    """A visual prompt in input-image pixels: `Prompt.point(x, y)`, `.box(x0, y0, x1, y1)`, `.mask(m)`."""

    kind: str
    coords: tuple[float, ...] = ()
    mask_array: np.ndarray | None = field(default=None, compare=False)

    @classmethod
    def point(cls, x: float, y: float) -> Prompt:
        return cls("point", (float(x), float(y)))

    @classmethod
    def box(cls, x0: float, y0: float, x1: float, y1: float) -> Prompt:
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box must be (x0, y0, x1, y1) with x0 ≤ x1 and y0 ≤ y1, got {(x0, y0, x1, y1)}")
        return cls("box", (float(x0), float(y0), float(x1), float(y1)))

    @classmethod
    def mask(cls, mask: np.ndarray) -> Prompt:
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise ValueError(f"mask prompt must be H×W, got shape {mask.shape}")
        if not mask.any():
            raise ValueError("mask prompt is empty")
        return cls("mask", (), mask.astype(bool))

    def to_model(self, box: Letterbox) -> EncodedPrompt:
        if self.kind == "point":
            ((x, y),) = box.points_to_model([self.coords])
            return EncodedPrompt("point", point=(float(x), float(y)))
        if self.kind == "box":
            corners = box.points_to_model([self.coords[:2], self.coords[2:]])
            return EncodedPrompt("box", box=tuple(float(v) for v in corners.reshape(-1)))
        if self.kind == "mask":
            return EncodedPrompt("mask", mask=box.mask_to_model(self.mask_array))
        raise ValueError(f"unknown prompt kind {self.kind!r}")


@dataclass
class Segment:
    """One object. mask: bool H×W at the input size; query: (2, C) decoder query (content, position)
    that finds it again on a new frame (`follow`)."""

    phrase: str | None
    mask: np.ndarray
    score: float
    label: str | None = None
    query: torch.Tensor | None = field(default=None, repr=False)

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) pixel bounds, end exclusive; None for an empty mask."""
        ys, xs = np.nonzero(self.mask)
        if len(xs) == 0:
            return None
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass
class Conversation:
    """The history a later `chat` continues from."""

    turns: list[Turn] = field(default_factory=list)


@dataclass
class ChatResult:
    text: str
    segments: list[Segment]
    history: Conversation

    @property
    def clean_text(self) -> str:
        return clean_text(self.text)


def clean_text(text: str) -> str:
    """The answer without `<p>`, `</p>` and `[SEG]` tags and the spaces they leave."""
    text = text.replace(PHRASE_START, "").replace(PHRASE_END, "").replace(SEG_TOKEN, "")
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    return re.sub(r"\s{2,}", " ", text).strip()


def phrases_for_segs(text: str) -> list[str | None]:
    """The phrase of each `[SEG]` in order: the latest `<p> … </p>` not yet used, else None."""
    phrases: list[str | None] = []
    pending: str | None = None
    for m in _TAG_RE.finditer(text):
        if m.group(0) == SEG_TOKEN:
            phrases.append(pending)
            pending = None
        else:
            pending = m.group(1).strip()
    return phrases
