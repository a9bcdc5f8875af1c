"""The InternLM2 chat template, as xtuner's `internlm2_chat` applies it in OMG-LLaVA.

    <s><|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>
    \\n<|im_start|>user\\n{question 2}<|im_end|>\\n<|im_start|>assistant\\n

No system prompt by default; `<image>` only in the first user turn; `<|im_end|>` ends every answer
and is the stop word; turns are separated by a newline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SEP = "\n"


@dataclass
class Turn:
    """One exchange. `prompts` are the visual prompts of this turn's `<region>`/`<mark>` tokens."""

    user: str
    assistant: str | None = None
    prompts: list = field(default_factory=list)


def user_block(text: str) -> str:
    return f"{IM_START}user\n{text}{IM_END}\n{IM_START}assistant\n"


def render_conversation(turns: list[Turn], system: str = "") -> str:
    """The prompt text without BOS; ends after `assistant\\n` when the last turn has no answer."""
    parts = []
    if system:
        parts.append(f"{IM_START}system\n{system}{IM_END}\n")
    for i, turn in enumerate(turns):
        if i > 0:
            parts.append(SEP)
        parts.append(user_block(turn.user))
        if turn.assistant is not None:
            parts.append(turn.assistant + IM_END)
    return "".join(parts)


def first_user_text(question: str) -> str:
    """The first turn carries the image: `<image>\\n` + question (unless the caller placed `<image>`)."""
    return question if IMAGE_TOKEN in question else f"{IMAGE_TOKEN}\n{question}"
