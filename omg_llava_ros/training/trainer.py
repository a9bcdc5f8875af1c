"""Staged training of the embedded OMG-LLaVA on the tabletop world (the paper's recipe at CPU scale).

Stage 0  perception: encoder + OMG decoder for panoptic segmentation (30 colour-shape classes +
         `table`) and interactive segmentation from point, box and mask prompts; then frozen.
Stage 1  projector pretraining (LLM frozen): caption cross-entropy + 10 · MSE query reconstruction
         P_t(P_v(q)) ≈ q on the foreground object queries.
Stage 2  instruction tuning of projectors + LLM (trained fully: ours starts from scratch): answer
         cross-entropy + BCE/Dice on every `[SEG]` mask with deep supervision over the decoder
         layers, and the same `[SEG]` queries on moved frames (follow mode). The questions about one
         scene can share one LLM row (`max_text_tokens`), each question masked from the others.
Stage 3  (ours) stage 2 again, briefly, weighted to counting and existence.
Stage 4  (ours) stage 3 again, briefly, its existence "no" questions mostly about a colour that is
         on the table with a shape that is not, or a colour and a shape on different objects.
Stage 5  (ours) the mask refiner (`mask_refiner`) alone, everything else frozen: the decoder's
         panoptic and visual-prompt masks, refined, against the full-resolution ground truth. It
         depends on the perception module only, so it can run any time after stage 0.
Stage 6  (ours) the location pointer alone, fitted on states recorded from the frozen model
         (`pointer_fit`).
Stage 7  (ours) the pointer's explicit relation choice: three small heads it reads relations and
         shapes with, fitted alone on recorded states (`relation_choice_fit`).
Each stage (`stages.STAGES`) runs a fixed number of steps, checkpoints every few minutes and
resumes from its last checkpoint; `train()` picks up where an interrupted run stopped. The parts:
`config` (TrainConfig), `schedule` (learning rates, budgets), `checkpoints` (saving, loading, the
model to start from), `model_inputs` and `sequences` (what the LLM is fed), the losses
(`losses`, `instruction_losses`) and one module a stage's step (`perception_stage`,
`instruction_stage`, `refiner_stage`, `pointer_fit`, `relation_choice_fit`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import numpy as np
import torch

from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.training.checkpoints import build_model, load_progress, load_weights, save_checkpoint
from omg_llava_ros.training.config import TrainConfig, uses_bf16
from omg_llava_ros.training.perception_stage import PERCEPTION_PREFIXES
from omg_llava_ros.training.schedule import (
    BUDGET_SHARES,
    FIRST_FIT,
    PACE_FROM,
    REFIT_EVERY,
    Clock,
    budgeted_steps,
    stage_lr,
)
from omg_llava_ros.training.stages import STAGES

log = logging.getLogger(__name__)


def run_stage(model: OmgLlava, cfg: TrainConfig, out: Path, stage: int, start: dict | None) -> None:
    """Run (or resume, from `start`: its progress.json) `STAGES[stage]` to its configured steps or
    minutes, checkpointing to OUT/stage{stage}."""
    spec = STAGES[stage]
    if spec.runner is not None:
        spec.runner(model, cfg, out)
        return
    minutes, total, lr = (getattr(cfg, f"stage{stage}_{name}") for name in ("minutes", "steps", "lr"))
    budgeted = cfg.budget_minutes is not None
    if budgeted:
        minutes = cfg.budget_minutes * BUDGET_SHARES[stage]
    model.requires_grad_(False)
    params = spec.parameters(model)
    for p in params:
        p.requires_grad_(True)
    aux = spec.auxiliary(model, cfg) if spec.auxiliary is not None else None  # saved with the checkpoints
    if aux is not None:
        params = params + list(aux.parameters())
    spec.modes(model)
    decay = spec.weight_decay
    # The location gate and head start from nothing beside a trained LLM: they learn 10× faster.
    location = {id(p) for p in model.object_location.parameters()} if model.object_location is not None else set()
    fast = [p for p in params if id(p) in location]
    slow = [p for p in params if id(p) not in location]
    groups = [
        {"params": [p for p in slow if p.ndim > 1], "weight_decay": decay},
        {"params": [p for p in slow if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if fast:  # only in the stages that train the LLM side
        groups.append({"params": fast, "weight_decay": 0.0, "lr_scale": 10.0})
    opt = torch.optim.AdamW(groups, lr=lr)
    step, spent = 0, 0.0
    ckpt = out / f"stage{stage}"
    if start and start["stage"] == stage:
        step, spent = start["step"], start["spent"]
        total = start.get("total", total)
        if aux is not None and (ckpt / "aux.safetensors").is_file():
            from safetensors.torch import load_file

            aux.load_state_dict(load_file(ckpt / "aux.safetensors"))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        log.info("stage %d: resuming at step %d (%.1f min spent)", stage, step, spent / 60)
    clock = Clock(minutes, spent)
    rng = np.random.default_rng([cfg.seed, stage, step])
    last_save = time.monotonic()
    history: list[dict[str, float]] = []
    began = step  # this process's first step of the stage (resumed runs measure their own pace)
    paced_from = None  # (step, spent) where a budgeted stage starts measuring its pace
    while step < total and not clock.done():
        for group in opt.param_groups:
            group["lr"] = stage_lr(cfg, stage, step, total) * group.get("lr_scale", 1.0)
        stats = spec.step(model, rng, cfg, aux)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if torch.isfinite(norm):
            opt.step()
        else:
            # One non-finite gradient would turn every weight into NaN (it happened once, in stage 5).
            log.warning("stage %d step %d: non-finite gradient norm, step skipped", stage, step)
            stats = {**stats, "skipped": 1.0}
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append(stats)
        if budgeted and step == began + PACE_FROM:
            paced_from = (step, clock.spent)
        if budgeted and paced_from is not None and (step - paced_from[0]) % REFIT_EVERY == FIRST_FIT:
            pace = (clock.spent - paced_from[1]) / (step - paced_from[0])
            # Never past the configured steps: a refit may shorten but not lengthen beyond them.
            total = budgeted_steps(step, clock.spent, pace, minutes, getattr(cfg, f"stage{stage}_steps"))
            log.info("stage %d: %.2f s a step, %d steps fit its %.1f min", stage, pace, total, minutes)
        if step % 25 == 0:
            recent = history[-25:]
            mean = {k: round(float(np.mean([h.get(k, 0.0) for h in recent])), 4) for k in set().union(*recent)}
            log.info("stage %d step %d %.1f min %s", stage, step, clock.spent / 60, mean)
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps({"stage": stage, "step": step, "minutes": clock.spent / 60, **mean}) + "\n")
        if time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
            save_checkpoint(ckpt, model, opt, stage, step, clock.spent, aux, total if budgeted else None)
            last_save = time.monotonic()
    save_checkpoint(ckpt, model, opt, stage, step, clock.spent, aux, total if budgeted else None)
    (ckpt / "DONE").write_text(json.dumps({"steps": step, "minutes": clock.spent / 60}))
    log.info("stage %d done: %d steps in %.1f min", stage, step, clock.spent / 60)
    model.eval()
    model.requires_grad_(False)


def _jsonable(value):
    return asdict(value) if is_dataclass(value) else list(value)


def train(cfg: TrainConfig) -> OmgLlava:
    """Run (or resume) the stages in `cfg.stages`; returns the trained model."""
    torch.set_num_threads(cfg.threads)
    log.info("bf16 autocast: %s", "on" if uses_bf16(cfg) else "off (fp32)")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.__dict__, indent=2, default=_jsonable))
    model = build_model(cfg, out)
    t0 = time.monotonic()
    # Find the most advanced checkpoint to resume from.
    resume = None
    for stage in sorted(cfg.stages, reverse=True):
        p = load_progress(out / f"stage{stage}")
        if p is not None:
            resume = p
            break
    if resume is not None and resume["stage"] > 0:
        load_weights(model, out / f"stage{resume['stage']}")
    elif resume is not None or cfg.perception_from:
        # Stage 0 trains only the perception module: take just that from its checkpoint (the
        # LLM side may have changed shape since, e.g. another pixel-shuffle ratio).
        from safetensors.torch import load_file

        folder = out / "stage0" if resume is not None else Path(cfg.perception_from)
        state = load_file(folder / "model.safetensors")
        vision = {k: v for k, v in state.items() if k.startswith(PERCEPTION_PREFIXES)}
        missing = [k for k in model.state_dict() if k.startswith(PERCEPTION_PREFIXES) and k not in vision]
        if missing:
            raise ValueError(f"{folder} lacks perception weights, e.g. {missing[:3]}")
        model.load_state_dict(vision, strict=False)
    for stage in cfg.stages:
        if (out / f"stage{stage}" / "DONE").exists():
            continue
        if cfg.budget_minutes is not None and BUDGET_SHARES[stage] == 0:
            log.info("stage %d: no share of the %.0f-minute budget, skipped", stage, cfg.budget_minutes)
            continue
        start = resume if resume is not None and resume["stage"] == stage else None
        run_stage(model, cfg, out, stage, start)
        resume = None
    log.info("training finished in %.1f min this run", (time.monotonic() - t0) / 60)
    return model
