"""Stage 6 (ours): the location pointer fitted alone, on states recorded from the frozen model.

The pointer (`model.object_location`) reads the LLM's last-layer states of the `[SEG]` token and of
the object tokens and changes nothing the LLM computes. So with everything else frozen, those states
can be recorded once per question and the pointer fitted on them for many passes: minutes on a
2-core CPU, and every text answer of the model stays exactly as it was. The states are recorded
teacher-forced on the answer the model gives to a referring question (`<p> {ref} </p> [SEG].`, its
phrase echoed), so they are those that inference reads.

Why a stage of its own: the pointer chose the wrong object token for nearly every failure on forms 5
and 6 ("the star left of the red circle", "the largest object"; `training.referring_probe`), while
its inputs carry what it needs. Stage 4 with the relation head and spatial questions (1200, then
1000 more steps of the whole LLM side) still left 15 of 24 form-5 failures in 100 on the pointer.

Questions: for every form (toyworld.md 1-6) a scene offers, one target of that form and one of its
expressions, so the rare forms weigh as much as the common ones and forms 1-3 keep their share;
`pil_share` of the scenes are drawn by the Pillow renderer.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from omg_llava_ros.model.chat_template import Turn, first_user_text
from omg_llava_ros.model.language_model import phrase_spans
from omg_llava_ros.model.object_location import RELATION_KINDS, ObjectLocation, mask_areas
from omg_llava_ros.model.omg_llava import IMAGE_PLACEHOLDER, OmgLlava
from omg_llava_ros.toyworld.conversations import REFERRING_TEMPLATES, SEG_TOKEN
from omg_llava_ros.toyworld.referring import enumerate_expressions
from omg_llava_ros.toyworld.scene import SHAPES

log = logging.getLogger(__name__)

NO_TOKEN = -1  # no object token covers the object (IoU < 0.5), or the expression names no anchor


@dataclass
class PointerRecord:
    """The pointer's inputs for one question, and what it should choose.

    seg: (H,) the `[SEG]` state; phrase: (H,) the mean state of its phrase's tokens; objects:
    (n, H) the object tokens' states; centroids: (n, 2) in [0, 1]; areas: (n,) mask areas as
    fractions of the grid (0: stuff); target / anchor: the object token covering the target / a
    form-5 anchor (IoU ≥ 0.5), else NO_TOKEN; form: 1-6. For the explicit relation choice
    (`training.relation_choice_fit`): relation, the index of the phrase's relation in
    `RELATION_KINDS` (0: none); shape, the target's shape in `toyworld.SHAPES`; object_shapes: (n,)
    the shape of the object each token covers (IoU ≥ 0.5), else NO_TOKEN."""

    seg: torch.Tensor
    phrase: torch.Tensor
    objects: torch.Tensor
    centroids: torch.Tensor
    areas: torch.Tensor
    target: int
    anchor: int
    form: int
    relation: int = 0
    shape: int = NO_TOKEN
    object_shapes: torch.Tensor | None = None


def covered_shapes(token_masks: torch.Tensor, rendered) -> torch.Tensor:
    """(n,) for each of the (n, h, w) bool token masks the `SHAPES` index of the object it overlaps
    most if IoU ≥ 0.5, else NO_TOKEN."""
    from omg_llava_ros.training.instruction_losses import pairwise_iou
    from omg_llava_ros.training.losses import resize_masks

    if not rendered.objects:
        return torch.full((len(token_masks),), NO_TOKEN)
    truth = resize_masks(np.stack([o.mask for o in rendered.objects]), tuple(token_masks.shape[-2:])) > 0.5
    best_iou, best = pairwise_iou(truth, token_masks).max(0)  # (n,) over the objects
    shapes = torch.tensor([SHAPES.index(o.shape) for o in rendered.objects])
    return torch.where(best_iou >= 0.5, shapes[best], torch.full_like(best, NO_TOKEN))


def covering_token(token_masks: torch.Tensor, mask: np.ndarray) -> int:
    """The token whose (n, h, w) bool mask overlaps `mask` (image size) most, if IoU ≥ 0.5."""
    from omg_llava_ros.training.instruction_losses import best_tokens

    best, keep = best_tokens(token_masks, [mask])
    return int(best[0]) if bool(keep[0]) else NO_TOKEN


@torch.no_grad()
def record_scene(
    model: OmgLlava, rendered, rng: np.random.Generator, per_form: dict[int, int] | None = None
) -> list[PointerRecord]:
    """For each form `rendered` offers, `per_form[form]` (default 1) distinct (target, expression)
    pairs of it drawn uniformly, each asked with a uniform command template."""
    state = model.set_image(rendered.image, perception=True)
    centroids = state.prior.object_centroids[0]
    if len(centroids) == 0:
        return []
    logits = state.prior.object_masks[0]
    index = state.prior.object_indices[0]
    things = state.perception.class_logits[0, index, :-1].argmax(-1) < model.config.decoder.num_thing_classes
    areas = mask_areas(logits.float(), things)
    token_masks = logits >= 0
    object_shapes = covered_shapes(token_masks, rendered)
    named = [(t, e) for t in range(len(rendered.objects)) for e in enumerate_expressions(rendered, t)]
    wanted = {int(form): int(count) for form, count in (per_form or {}).items()}  # TOML keys are strings
    records = []
    for form in sorted({e.form for _, e in named}):
        pool = [(t, e) for t, e in named if e.form == form]
        count = min(len(pool), wanted.get(form, 1))
        for pick in rng.choice(len(pool), size=count, replace=False):
            target, expression = pool[int(pick)]
            found = _record_question(model, state, rendered, target, expression, rng, token_masks, areas)
            for r in found:
                r.relation = relation_kind(expression.text) if expression.form == 5 else 0
                r.shape = SHAPES.index(rendered.objects[target].shape)
                r.object_shapes = object_shapes
            records += found
    return records


def relation_kind(text: str) -> int:
    """The `RELATION_KINDS` index of the relation a form-5 expression asks (0: none)."""
    return next((i for i, kind in enumerate(RELATION_KINDS) if i and f" {kind} " in f" {text} "), 0)


def _record_question(
    model: OmgLlava, state, rendered, target: int, expression, rng, token_masks: torch.Tensor, areas: torch.Tensor
) -> list[PointerRecord]:
    """The record of one referring question (none if the teacher-forced answer has no `[SEG]`)."""
    centroids = state.prior.object_centroids[0]
    question = REFERRING_TEMPLATES[int(rng.integers(len(REFERRING_TEMPLATES)))].format(ref=expression.text)
    turns = [Turn(user=first_user_text(question), assistant=f"<p> {expression.text} </p> {SEG_TOKEN}.")]
    ids = model.conversation_ids(turns)
    hidden = model.llm.base_model(inputs_embeds=model._embed_conversation(ids, turns, state)[None])
    hidden = hidden.last_hidden_state[0]
    image_at = ids.index(IMAGE_PLACEHOLDER)
    end = image_at + len(state.visual_tokens)  # the object tokens end the visual tokens
    text = ids[image_at + 1 :]
    if model.tokens.seg not in text:
        return []
    seg_at = text.index(model.tokens.seg)
    ((first, last),) = phrase_spans(text, [seg_at], (model.tokens.phrase_start, model.tokens.phrase_end))
    anchor = NO_TOKEN
    if expression.anchor is not None:
        anchor = covering_token(token_masks, rendered.objects[expression.anchor].mask)
    return [
        PointerRecord(
            seg=hidden[end + seg_at].float().clone(),
            phrase=hidden[end + first : end + last].float().mean(0),
            objects=hidden[end - len(centroids) : end].float().clone(),
            centroids=centroids.float().clone(),
            areas=areas.float().clone(),
            target=covering_token(token_masks, rendered.objects[target].mask),
            anchor=anchor,
            form=expression.form,
        )
    ]


def record(
    model: OmgLlava,
    rng: np.random.Generator,
    count: int,
    pil_share: float = 0.0,
    per_form: dict[int, int] | None = None,
) -> list[PointerRecord]:
    """At least `count` records from fresh scenes (see the module docstring)."""
    from omg_llava_ros.training.evaluate import _scene

    records: list[PointerRecord] = []
    t0, said = time.monotonic(), 0
    while len(records) < count:
        rendered = _scene(rng, 256, "pil" if rng.random() < pil_share else "ours")
        records += record_scene(model, rendered, rng, per_form)
        if len(records) - said >= 1000:
            said = len(records)
            log.info("pointer records: %d of %d (%.1f min)", said, count, (time.monotonic() - t0) / 60)
    return records


def save_records(records: list[PointerRecord], path: Path) -> None:
    """All records in one safetensors file: the per-object tensors concatenated, with offsets."""
    from safetensors.torch import save_file

    counts = torch.tensor([len(r.objects) for r in records])
    save_file(
        {
            "seg": torch.stack([r.seg for r in records]),
            "phrase": torch.stack([r.phrase for r in records]),
            "objects": torch.cat([r.objects for r in records]),
            "centroids": torch.cat([r.centroids for r in records]),
            "areas": torch.cat([r.areas for r in records]),
            "counts": counts,
            "labels": torch.tensor([[r.target, r.anchor, r.form, r.relation, r.shape] for r in records]),
            "object_shapes": torch.cat([_object_shapes(r) for r in records]),
        },
        str(path),
    )


def _object_shapes(r: PointerRecord) -> torch.Tensor:
    unknown = torch.full((len(r.objects),), NO_TOKEN)
    return unknown if r.object_shapes is None else r.object_shapes


def load_records(path: Path) -> list[PointerRecord]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    bounds = [0, *torch.cumsum(t["counts"], 0).tolist()]
    shapes = t.get("object_shapes")  # absent from files recorded before the relation choice
    return [
        PointerRecord(
            t["seg"][i],
            t["phrase"][i],
            t["objects"][a:b],
            t["centroids"][a:b],
            t["areas"][a:b],
            *t["labels"][i].tolist(),
            object_shapes=None if shapes is None else shapes[a:b],
        )
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]


def _scores(head: ObjectLocation, r: PointerRecord) -> torch.Tensor:
    if not head.relations:
        return head.point(r.seg[None], r.objects, r.centroids)
    return head.point(r.seg[None], r.objects, r.centroids, r.areas, r.phrase[None])


def pointer_loss(head: ObjectLocation, batch: list[PointerRecord], anchor_weight: float) -> torch.Tensor:
    """Mean cross-entropy of the pointer towards each record's target token, plus `anchor_weight`
    times the anchor attention's towards a named anchor."""
    total = torch.zeros(())
    for r in batch:
        scores = _scores(head, r)
        total = total + F.cross_entropy(scores, torch.tensor([r.target]))
        if head.relations and r.anchor != NO_TOKEN:
            anchor = head.anchor_scores(r.phrase[None], r.objects)
            total = total + anchor_weight * F.cross_entropy(anchor, torch.tensor([r.anchor]))
    return total / len(batch)


@torch.no_grad()
def pointer_accuracy(head: ObjectLocation, records: list[PointerRecord]) -> dict[int, float]:
    """Per form, the share of records whose target token the pointer chooses (a target no token
    covers counts as a miss: the pointer could not have found it)."""
    hits: dict[int, list[int]] = {}
    for r in records:
        scores = _scores(head, r)[0]
        hits.setdefault(r.form, []).append(int(r.target != NO_TOKEN and int(scores.argmax()) == r.target))
    return {form: float(np.mean(v)) for form, v in sorted(hits.items())}


def fit(
    head: ObjectLocation,
    records: list[PointerRecord],
    steps: int,
    lr: float,
    batch: int = 64,
    anchor_weight: float = 0.5,
    seed: int = 0,
) -> list[float]:
    """Fit every parameter of `head` but its gate (which changes the object tokens the LLM reads,
    and so the recorded states) with AdamW and a cosine schedule; returns the loss every 100 steps."""
    usable = [r for r in records if r.target != NO_TOKEN]
    if not usable:
        raise ValueError("no record has a target token to fit the pointer on")
    params = [p for name, p in head.named_parameters() if name != "gate"]
    head.gate.requires_grad_(False)
    head.train()
    losses = fit_parameters(params, lambda b: pointer_loss(head, b, anchor_weight), usable, steps, lr, batch, seed, 6)
    head.eval()
    head.requires_grad_(False)
    return losses


def fit_parameters(
    params: list[torch.nn.Parameter],
    loss_of: Callable[[list[PointerRecord]], torch.Tensor],
    records: list[PointerRecord],
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    stage: int,
) -> list[float]:
    """AdamW (no weight decay) on `params` alone, the rate on a cosine from `lr`, each step on
    `batch` records drawn with replacement (random stream from `seed`); returns the loss every 100
    steps and leaves `params` without gradients."""
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        picked = rng.integers(len(records), size=batch)
        loss = loss_of([records[i] for i in picked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            losses.append(float(loss.detach()))
        if step % 500 == 0:
            log.info("stage %d: step %d of %d, loss %.4f", stage, step, steps, float(loss.detach()))
    for p in params:
        p.requires_grad_(False)
    return losses


RECORDS_PER_FILE = 2000  # recorded in files of this many, so an interrupted stage keeps its work


def recorded(model: OmgLlava, cfg, folder: Path, stage: int, count: int) -> list[PointerRecord]:
    """At least `count` records under `folder`: each file of `RECORDS_PER_FILE` reloaded if there,
    else recorded (random stream from `cfg.seed`, `stage` and the file's number; scenes and forms
    as `cfg.stage6_pil_share` and `cfg.stage6_per_form`) and saved, so an interrupted stage keeps
    what it recorded."""
    t0 = time.monotonic()
    records: list[PointerRecord] = []
    for part in range(-(-count // RECORDS_PER_FILE)):
        path = folder / f"records_{part:03d}.safetensors"
        if not path.is_file():
            rng = np.random.default_rng([cfg.seed, stage, part])
            fresh = record(model, rng, RECORDS_PER_FILE, cfg.stage6_pil_share, cfg.stage6_per_form)
            save_records(fresh, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
        records += load_records(path)
        log.info("stage %d: %d records (%.1f min)", stage, len(records), (time.monotonic() - t0) / 60)
    return records


def frozen_stage_folder(model: OmgLlava, out: Path, stage: int) -> Path:
    """OUT/stage{stage}, made; the model frozen in eval mode, as the records are taken from it."""
    folder = out / f"stage{stage}"
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.requires_grad_(False)
    return folder


def finish_stage(model: OmgLlava, folder: Path, stage: int, steps: int, report: dict) -> None:
    """Save the fitted model under `folder` and mark the stage done with `report`; progress.json
    makes a later `train` of this run start from these weights (`trainer.train`)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.tmp")
    (folder / "model.tmp").replace(folder / "model.safetensors")
    progress = {"stage": stage, "step": steps, "spent": report["minutes"] * 60}
    (folder / "progress.json").write_text(json.dumps(progress))
    (folder / "DONE").write_text(json.dumps(report))


def run_stage(model: OmgLlava, cfg, out: Path) -> None:
    """Stage 6 of `trainer.train`: record (or reload) `cfg.stage6_records` questions' pointer
    inputs under OUT/stage6, fit the pointer on them, save the model there and mark it done."""
    head = model.object_location
    if head is None or not head.relations:
        raise ValueError("stage 6 fits a pointer with relations: set point_relations on a model with locate_objects")
    t0 = time.monotonic()
    folder = frozen_stage_folder(model, out, 6)
    records = recorded(model, cfg, folder, 6, cfg.stage6_records)
    before = pointer_accuracy(head, records[:2000])
    losses = fit(head, records, cfg.stage6_steps, cfg.stage6_lr, cfg.stage6_batch, cfg.stage6_anchor_weight, cfg.seed)
    after = pointer_accuracy(head, records[:2000])
    minutes = (time.monotonic() - t0) / 60
    log.info("stage 6: pointer accuracy per form on its first records %s -> %s", before, after)
    report = {"steps": cfg.stage6_steps, "minutes": minutes, "losses": losses, "before": before, "after": after}
    finish_stage(model, folder, 6, cfg.stage6_steps, report)
