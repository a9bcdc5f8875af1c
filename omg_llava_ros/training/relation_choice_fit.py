"""Stage 7 (ours): the pointer's explicit relation choice, fitted on states recorded from the frozen model.

Why: refits of the whole pointer on v22's recorded relation questions plateaued at 0.93-0.95 of
targets found, whatever form its score took, and half of the misses were an object of the named
shape on the named side that was not the nearest (MODEL_CARD.md). The choice
(`ObjectLocation.choose_related`) applies toyworld.md's rule to what three linear heads read: which
relation the phrase asks, the target's shape, and each object token's shape. This stage fits only
those heads (cross-entropy each), on records like stage 6's (`pointer_fit.record`) that also carry
those labels. Every other weight stays as it was, so every text answer does, and the pointer's
scores for phrases that ask no relation too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from omg_llava_ros.model.object_location import ObjectLocation
from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.training.pointer_fit import (
    NO_TOKEN,
    PointerRecord,
    finish_stage,
    fit_parameters,
    frozen_stage_folder,
    pointer_accuracy,
    recorded,
)

log = logging.getLogger(__name__)

HEADS = ("relation_kind", "target_shape", "object_shape")


def choice_loss(head: ObjectLocation, batch: list[PointerRecord]) -> torch.Tensor:
    """Sum of the three heads' mean cross-entropies on `batch`: the relation every phrase asks (0:
    none), the target's shape for phrases that ask one, and the shape of every thing token that
    covers an object."""
    phrase = torch.stack([r.phrase for r in batch])
    loss = F.cross_entropy(head.relation_kind(phrase), torch.tensor([r.relation for r in batch]))
    related = [i for i, r in enumerate(batch) if r.relation > 0]
    if related:
        shapes = torch.tensor([batch[i].shape for i in related])
        loss = loss + F.cross_entropy(head.target_shape(phrase[related]), shapes)
    objects = torch.cat([r.objects for r in batch])
    labels = torch.cat([_object_labels(r) for r in batch])
    known = labels != NO_TOKEN
    if known.any():
        loss = loss + F.cross_entropy(head.object_shape(objects[known]), labels[known])
    return loss


def _object_labels(r: PointerRecord) -> torch.Tensor:
    """(n,) the shape each thing token covers, NO_TOKEN for stuff and tokens covering nothing."""
    if r.object_shapes is None:
        raise ValueError("a record without object shapes: record again with this version (pointer_fit.record)")
    return torch.where(r.areas > 0, r.object_shapes.long(), torch.full_like(r.object_shapes.long(), NO_TOKEN))


@torch.no_grad()
def head_accuracy(head: ObjectLocation, records: list[PointerRecord]) -> dict[str, float]:
    """Share right of each head on `records` (relation: every phrase; target shape: phrases that ask
    a relation; object shape: every thing token covering an object)."""
    phrase = torch.stack([r.phrase for r in records])
    relations = torch.tensor([r.relation for r in records])
    out = {"relation_kind": float((head.relation_kind(phrase).argmax(-1) == relations).float().mean())}
    related = relations > 0
    if related.any():
        shapes = torch.tensor([r.shape for r in records])[related]
        out["target_shape"] = float((head.target_shape(phrase[related]).argmax(-1) == shapes).float().mean())
    labels = torch.cat([_object_labels(r) for r in records])
    known = labels != NO_TOKEN
    objects = torch.cat([r.objects for r in records])[known]
    out["object_shape"] = float((head.object_shape(objects).argmax(-1) == labels[known]).float().mean())
    return out


def fit_choice(
    head: ObjectLocation, records: list[PointerRecord], steps: int, lr: float, batch: int = 64, seed: int = 0
) -> list[float]:
    """Fit the three heads alone (AdamW, cosine schedule); returns the loss every 100 steps."""
    if not head.relation_shapes:
        raise ValueError("the pointer has no relation choice: set relation_shapes in the model config")
    params = [p for name, p in head.named_parameters() if name.split(".")[0] in HEADS]
    head.requires_grad_(False)
    return fit_parameters(params, lambda b: choice_loss(head, b), records, steps, lr, batch, seed, 7)


def run_stage(model: OmgLlava, cfg, out: Path) -> None:
    """Stage 7 of `trainer.train`: record (or reload) `cfg.stage7_records` questions under
    OUT/stage7, the last `cfg.stage7_held_out` of them held out; fit the heads on the rest, save
    the model there and mark it done with the heads' and the pointer's held-out accuracy."""
    head = model.object_location
    if head is None or not head.relation_shapes:
        raise ValueError("stage 7 fits the relation choice: set relation_shapes on a model with point_relations")
    t0 = time.monotonic()
    folder = frozen_stage_folder(model, out, 7)
    records = recorded(model, cfg, folder, 7, cfg.stage7_records)
    held_out, train = records[-cfg.stage7_held_out :], records[: -cfg.stage7_held_out]
    before = pointer_accuracy(head, held_out)
    losses = fit_choice(head, train, cfg.stage7_steps, cfg.stage7_lr, cfg.stage6_batch, cfg.seed)
    report = {
        "steps": cfg.stage7_steps,
        "losses": losses,
        "pointer_before": before,
        "pointer_after": pointer_accuracy(head, held_out),
        "heads": head_accuracy(head, held_out),
        "minutes": (time.monotonic() - t0) / 60,
    }
    log.info("stage 7: held out %s", {k: report[k] for k in ("pointer_before", "pointer_after", "heads")})
    finish_stage(model, folder, 7, cfg.stage7_steps, report)
