"""Helpers shared by test modules (so that no test module imports another)."""

from __future__ import annotations

import math

import torch

ANSWER = "<p> the red cup </p> [SEG] and <p> the plate </p> [SEG]."


def force_answer(tokenizer, answer: str):
    """Logits processor that makes the random model generate exactly `answer`."""
    target = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def force(generated, logits):
        out = torch.full_like(logits, -1e9)
        out[target[min(len(generated), len(target) - 1)]] = 0
        return out

    return force


class CountingModel:
    """The real tiny model, counting chat (LLM) and follow (vision-only) calls."""

    def __init__(self, model, fail_chat: bool = False, fail_follow: bool = False) -> None:
        self.model, self.fail_chat, self.fail_follow = model, fail_chat, fail_follow
        self.chats: list[str] = []
        self.follows = 0

    def chat(self, image, text, **kwargs):
        self.chats.append(text)
        if self.fail_chat:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.model.chat(image, text, **kwargs)

    def follow(self, image, segments):
        self.follows += 1
        if self.fail_follow:
            raise RuntimeError("engine lost (simulated)")
        return self.model.follow(image, segments)


# Closed-form area / (pi R^2): square 2R^2, triangle 3*sqrt(3)/4 R^2, star 5 r R sin 36deg with
# r = 0.45 R, cross (arm width = span / 3, outer corners on the circumcircle) 2R^2.
AREA_RATIOS = {
    "circle": 1.0,
    "square": 2 / math.pi,
    "triangle": 3 * math.sqrt(3) / 4 / math.pi,
    "star": 5 * 0.45 * math.sin(math.radians(36)) / math.pi,
    "cross": 2 / math.pi,
}
