"""Where referring fails, per form: perception, the location pointer, or the `[SEG]` mask.

    python -m omg_llava_ros.training.referring_probe [--model DIR] [--samples 100] [--seed 0] [--renderer pil]

For each form (1-6 of toyworld.md) it asks `samples` referring questions whose targets that form
names (as `eval`'s `referring_forms`) and sorts every answer whose first `[SEG]` mask has IoU < 0.5
with the target into one of:

- `perception`: no object token's panoptic mask covers the target (IoU ≥ 0.5): the LLM never had
  the right object to choose;
- `pointer`: some object token covers it, but the location pointer chose a token whose mask does
  not (the LLM's choice of object);
- `mask`: the pointer chose the target's token, and still the decoded `[SEG]` mask missed it;
- `no_seg`: the answer has no `[SEG]`.

Prints one JSON object: per form, the samples, the failures and their shares by cause, and the
cIoU. Needs a model with the location pointer (the embedded default).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

import numpy as np
import torch

from omg_llava_ros.loading import add_model_argument, cli_model
from omg_llava_ros.metrics import IouAccumulator
from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.toyworld.conversations import REFERRING_TEMPLATES
from omg_llava_ros.training.evaluate import EVAL_SEED_OFFSET, FORMS, form_sample, iou


def _masks(logits: torch.Tensor, state: Any) -> np.ndarray:
    """Decoder-grid mask logits (N, h, w) -> (N, H, W) bool masks at the input image size."""
    return (state.letterbox.logits_to_image(logits.float()) > 0).cpu().numpy()


def probe(model: OmgLlava, samples: int, seed: int, size: int = 256, renderer: str = "ours") -> dict:
    if model.object_location is None:
        raise ValueError("the probe needs a model with the location pointer (OmgLlavaConfig.locate_objects)")
    rng = np.random.default_rng(EVAL_SEED_OFFSET + seed + 3)
    seen: dict[str, Any] = {}
    original = model._seg_points

    def recording(gen, ids, state):  # what the pointer chose, and every object token's mask
        located = original(gen, ids, state)
        seen["tokens"] = _masks(state.prior.object_masks[0], state)
        seen["pointed"] = _masks(located[1], state) if located is not None else None
        return located

    model._seg_points = recording
    report: dict[str, Any] = {}
    try:
        for form in FORMS:
            causes: Counter[str] = Counter()
            acc = IouAccumulator()
            for _ in range(samples):
                rendered, target, expression = form_sample(rng, form, size, renderer)
                template = REFERRING_TEMPLATES[int(rng.integers(len(REFERRING_TEMPLATES)))]
                seen.clear()
                res = model.chat(rendered.image, template.format(ref=expression))
                gt = rendered.objects[target].mask
                pred = res.segments[0].mask if res.segments else np.zeros_like(gt)
                acc.add_masks(pred, gt)
                if iou(pred, gt) >= 0.5:
                    continue
                if not res.segments or seen.get("pointed") is None:
                    causes["no_seg"] += 1
                elif not any(iou(m, gt) >= 0.5 for m in seen["tokens"]):
                    causes["perception"] += 1
                elif iou(seen["pointed"][0], gt) < 0.5:
                    causes["pointer"] += 1
                else:
                    causes["mask"] += 1
            failures = sum(causes.values())
            report[str(form)] = {
                "samples": samples,
                "ciou": acc.ciou,
                "failures": failures,
                "causes": {k: causes[k] for k in ("perception", "pointer", "mask", "no_seg")},
            }
    finally:
        del model._seg_points  # the class method again
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="referring_probe", description=__doc__.splitlines()[0])
    add_model_argument(parser)
    parser.add_argument("--samples", type=int, default=100, help="questions per form")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--renderer", choices=("ours", "pil"), default="ours")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = cli_model(args.model)
    print(json.dumps(probe(model, args.samples, args.seed, renderer=args.renderer)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
