"""`omg-llava-ros bench --training`: what a perception (stage-0) training step costs on this machine.

Times `perception_stage.stage0_step` (forward, losses, backward) on the same fresh batches two ways, one
after the other within each repeat so that both meet the same machine load: the visual prompts
decoded in their images' panoptic pass (`joint`, what `train` does) and a prompt a batch row over a
copy of its image's memory (`separate`, inference's layout and stage 0 before 2026-11-29). Both give
the same losses and gradients (tests/test_training.py); the ratio is the figure. The optimiser step
is left out: it is the same for both and small.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

VARIANTS = ("joint", "separate")


def bench_training(
    config: str = "embedded",
    batch: int | None = None,
    prompts_per_image: int | None = None,
    repeats: int = 4,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Median seconds of a stage-0 step per variant and their ratio (separate / joint).

    `config` is a preset with the tabletop classes (random weights: speed does not depend on their
    values); `batch` and `prompts_per_image` default to the recipe's (`TrainConfig`)."""
    import torch

    from omg_llava_ros import OmgLlava
    from omg_llava_ros.training import data, perception_stage
    from omg_llava_ros.training.config import TrainConfig, uses_bf16

    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be ≥ 1 and warmup ≥ 0")
    cfg = TrainConfig()
    batch = batch or cfg.stage0_batch
    prompts_per_image = prompts_per_image or cfg.prompts_per_image
    model = OmgLlava.from_config(config, seed=seed)
    d = model.config.decoder
    semantic = perception_stage.SemanticHead(d.hidden_dim, d.num_classes) if cfg.semantic_weight > 0 else None
    params = perception_stage.perception_parameters(model) + (list(semantic.parameters()) if semantic else [])
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    model.train()
    rng = np.random.default_rng(seed)
    size = model.config.image_encoder.image_size
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(warmup + repeats):
        step_batch = data.perception_batch(rng, batch, size, d.class_names, prompts_per_image)
        for variant in VARIANTS:
            start = time.perf_counter()
            perception_stage.stage0_step(model, step_batch, cfg, semantic, joint_prompts=variant == "joint")
            elapsed = time.perf_counter() - start
            for p in params:
                p.grad = None
            if i >= warmup:
                seconds[variant].append(elapsed)
    median = {v: statistics.median(s) for v, s in seconds.items()}
    return {
        "config": config,
        "batch": batch,
        "prompts_per_image": prompts_per_image,
        "image_size": size,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "bf16": uses_bf16(cfg),
        "stage0_step_s": median,
        "joint_speedup": median["separate"] / median["joint"],
    }


def format_training_report(r: dict[str, Any]) -> str:
    s = r["stage0_step_s"]
    return (
        f"stage-0 training step ({r['config']}, batch {r['batch']} at {r['image_size']}², "
        f"{r['prompts_per_image']} prompts an image, {r['threads']} thread(s), "
        f"{'bf16' if r['bf16'] else 'fp32'}, median of {r['repeats']}): prompts in the panoptic pass "
        f"{s['joint']:.3f} s, a prompt a batch row {s['separate']:.3f} s — {r['joint_speedup']:.2f}× faster"
    )
