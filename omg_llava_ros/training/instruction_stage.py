"""Stages 1-4: projector pretraining (query reconstruction and captions), then instruction tuning
of projectors and LLM on every task of the world, with follow-mode frames.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.training import data
from omg_llava_ros.training.config import TrainConfig, autocast, scalars
from omg_llava_ros.training.instruction_losses import (
    AttributeHead,
    answer_loss,
    location_loss,
    object_alignment_loss,
    seg_loss,
)
from omg_llava_ros.training.sequences import build_sequence, encode_batch, perceive_batch, plan_conversations, run_llm


def llm_side_parameters(model: OmgLlava, with_llm: bool) -> list[torch.nn.Parameter]:
    params = list(model.visual_projector.parameters()) + list(model.text_projector.parameters())
    if model.object_location is not None:
        params += list(model.object_location.parameters())
    if with_llm:
        params += list(model.llm.parameters())
    return params


def stage1_step(model: OmgLlava, rng, cfg: TrainConfig) -> dict[str, float]:
    batch = data.conversation_batch(rng, cfg.stage1_batch, 256, tasks=("caption",))
    vb = perceive_batch(model, [c.image for c in batch])
    with autocast(cfg):
        seqs = [build_sequence(model, vb, i, c.sample) for i, c in enumerate(batch)]
        hidden, labels, _ = run_llm(model, seqs)
        logits = model.llm.get_output_embeddings()(hidden).float()
        ce = answer_loss(logits, labels, "token")  # captions only: their tokens weigh alike
        queries = torch.cat(vb.prior.object_tokens)
        recon = model.text_projector.model(model.visual_projector.object_tokens(queries))
        reg = 10 * F.mse_loss(recon.float(), queries.float())
        loss = ce + reg
    loss.backward()
    return scalars(loss=loss, ce=ce, reg=reg)


def moved_copy(rng, rendered, steps: int):
    """The same scene after `steps` frames of motion, with masks for every object."""
    from omg_llava_ros.toyworld import render, step_scene

    scene = rendered.scene
    n = len(scene.objects)
    velocity = rng.uniform(-4, 4, (n, 2))
    spin = rng.uniform(-10, 10, n)
    for _ in range(steps):
        scene = step_scene(rng, scene, velocity, spin)
    return render(scene, size=rendered.size, rng=rng)


def stage2_step(
    model: OmgLlava,
    rng,
    cfg: TrainConfig,
    task_weights: dict | None = None,
    negatives: data.ExistenceNegatives | None = None,
    align_weight: float = 0.0,
    attributes: AttributeHead | None = None,
    duplicate_share: float = 0.0,
) -> dict[str, float]:
    batch = data.conversation_batch(
        rng,
        cfg.stage2_batch,
        256,
        per_scene=cfg.conversations_per_scene,
        weights=task_weights,
        negatives=negatives or data.ExistenceNegatives(),
        duplicate_share=duplicate_share,
    )
    images, scene_of = data.scene_index(batch)
    vb = perceive_batch(model, images)
    # Follow mode: referring samples also get a moved frame; their [SEG] query must find the object there.
    follow = [
        (i, moved_copy(rng, c.rendered, int(rng.integers(1, 10))))
        for i, c in enumerate(batch)
        if c.sample.task == "referring_segmentation" and rng.random() < 0.5
    ]
    chunks = plan_conversations(model, batch, scene_of, cfg)
    with autocast(cfg):
        seqs = [build_sequence(model, vb, scene, [batch[i].sample for i in rows]) for scene, rows in chunks]
        if align_weight > 0:
            hidden, labels, groups, early = run_llm(model, seqs, layer=cfg.align_layer)
        else:
            hidden, labels, groups = run_llm(model, seqs)
        logits = model.llm.get_output_embeddings()(hidden).float()
        ce = answer_loss(logits, labels, cfg.text_loss, groups)
        loss_seg, _ = seg_loss(model, vb.memory, seqs, hidden)
        loss_location, loss_anchor = location_loss(model, vb, seqs, hidden)
        loss_align = hidden.new_zeros((), dtype=torch.float32)
        if align_weight > 0:
            loss_align = object_alignment_loss(model, vb, seqs, chunks, batch, early, attributes)
        loss_follow = hidden.new_zeros(())
        where = {i: (row, k) for row, (_, rows) in enumerate(chunks) for k, i in enumerate(rows)}
        fseqs, frows, fimages = [], [], []
        for i, moved in follow:
            row, k = where[i]
            seq = seqs[row]
            positions = [p for p, a in zip(seq.seg_positions, seq.seg_answer, strict=True) if a == k]
            if len(positions) != 1:
                continue
            obj = batch[i].sample.object_ids[0]
            fseqs.append(
                replace(seq, seg_positions=positions, image_index=len(fimages), target_masks=[moved.objects[obj].mask])
            )
            frows.append(row)
            fimages.append(moved.image)
        if fseqs:
            loss_follow, _ = seg_loss(model, encode_batch(model, fimages), fseqs, hidden[torch.tensor(frows)])
        loss = (
            ce
            + loss_seg
            + 0.5 * loss_follow
            + align_weight * loss_align
            + cfg.location_weight * (loss_location + cfg.anchor_weight * loss_anchor)
        )
    loss.backward()
    return scalars(
        loss=loss, ce=ce, seg=loss_seg, follow=loss_follow, align=loss_align, location=loss_location, anchor=loss_anchor
    )
