"""The LLM side's losses: answer cross-entropy, `[SEG]` masks (with deep supervision), the
location pointer's choice of object token and its anchor, and the tried object-alignment losses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from omg_llava_ros.model.omg_decoder import DecoderMemory
from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.training.losses import (
    mask_loss,
    resize_masks,
)
from omg_llava_ros.training.model_inputs import select_memory
from omg_llava_ros.training.sequences import Sequence_, VisualBatch


def answer_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sample", groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of (B, L, V) logits on (B, L) labels (-100 outside the answers), averaged over
    all answer tokens ("token") or per answer, then over answers ("sample"). `groups` (B, L) numbers
    the answers within a row (several turns per row); without it each row is one answer."""
    if reduction == "token":
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    if reduction != "sample":
        raise ValueError(f"text_loss must be 'sample' or 'token', not {reduction!r}")
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    valid = labels != -100
    if groups is None:
        groups = torch.zeros_like(labels)
    width = int(groups.max()) + 1 if valid.any() else 1
    key = (torch.arange(len(labels))[:, None] * width + groups.clamp(min=0))[valid]
    sums = per_token.new_zeros(len(labels) * width).index_add(0, key, per_token[valid])
    counts = per_token.new_zeros(len(labels) * width).index_add(0, key, torch.ones_like(per_token[valid]))
    has = counts > 0
    return (sums[has] / counts[has]).mean()


def seg_loss(model: OmgLlava, memory: DecoderMemory, seqs: list[Sequence_], hidden: torch.Tensor):
    """BCE + Dice over all decoder predictions for every `[SEG]` of `seqs` (rows of `hidden`), their
    images' decoder memory `memory`."""
    states, index, targets = [], [], []
    for b, s in enumerate(seqs):
        for pos, mask in zip(s.seg_positions, s.target_masks, strict=True):
            states.append(hidden[b, pos])
            index.append(s.image_index)
            targets.append(mask)
    if not states:
        return hidden.new_zeros(()), None
    q, pos = model.text_projector(torch.stack(states))
    size = tuple(memory.mask_features.shape[-2:])
    # One decoder pass per image, its [SEG] queries as a batch over that image's memory (batch 1,
    # broadcast): the memory's keys and values are projected once per image, not once per [SEG].
    # A query decodes alone either way (batch rows do not attend to each other).
    index_t = torch.tensor(index)
    order, per_image = [], []
    for image in sorted(set(index)):
        rows = torch.nonzero(index_t == image).flatten()
        order.append(rows)
        per_image.append(
            model.omg_decoder.decode(
                q[rows, None], pos[rows, None], select_memory(memory, slice(image, image + 1))
            ).mask_logits
        )
    mask_logits = [torch.cat(layer) for layer in zip(*per_image, strict=True)]  # rows in `order`
    gt = resize_masks(np.stack(targets), size).flatten(1)[torch.cat(order)]
    return mask_loss(mask_logits, gt) / len(mask_logits), (q, pos)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, h, w) and (m, h, w) bool masks → (n, m) IoU (0 where both are empty)."""
    inter = (a[:, None] & b[None]).flatten(2).sum(-1).float()
    union = (a[:, None] | b[None]).flatten(2).sum(-1).float()
    return inter / union.clamp(min=1)


def best_tokens(masks: torch.Tensor, wanted: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, h, w) bool token masks, m ground-truth masks → (m,) the token overlapping each most and
    (m,) whether that overlap is IoU ≥ 0.5."""
    targets = resize_masks(np.stack(wanted), tuple(masks.shape[-2:])) > 0.5
    best_iou, best = pairwise_iou(targets, masks).max(-1)
    return best, best_iou >= 0.5


def location_loss(
    model: OmgLlava, vb: VisualBatch, seqs: list[Sequence_], hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of each `[SEG]` state's pointer over its image's object tokens (`object_location`),
    towards the token whose mask overlaps the target most (IoU ≥ 0.5; other `[SEG]`s are skipped),
    and, with relations, of its anchor attention towards a form-5 expression's anchor token; zeros
    for a model without the head or a batch without such a `[SEG]`."""
    zero = hidden.new_zeros((), dtype=torch.float32)
    head = model.object_location
    if head is None:
        return zero, zero
    total, count, anchor_total, anchor_count = zero, 0, zero, 0
    for b, s in enumerate(seqs):
        masks = vb.object_masks[s.image_index] >= 0  # (n, h, w) the object tokens' masks
        if not s.seg_positions or len(masks) == 0:
            continue
        best, keep = best_tokens(masks, s.target_masks)
        if not keep.any():
            continue
        centroids = vb.prior.object_centroids[s.image_index]
        areas = vb.prior.object_areas[s.image_index] if vb.prior.object_areas is not None else None
        seg, objects = hidden[b, s.seg_positions], hidden[b, s.object_positions]
        phrase = torch.stack([hidden[b, first:last].mean(0) for first, last in s.phrase_spans])
        scores = head.point(seg, objects, centroids, areas, phrase)
        total = total + F.cross_entropy(scores.float()[keep], best[keep], reduction="sum")
        count += int(keep.sum())
        named = [i for i, m in enumerate(s.anchor_masks) if m is not None]
        if head.relations and named:
            anchor, found = best_tokens(masks, [s.anchor_masks[i] for i in named])
            if found.any():
                logits = head.anchor_scores(phrase[named], objects).float()[found]
                anchor_total = anchor_total + F.cross_entropy(logits, anchor[found], reduction="sum")
                anchor_count += int(found.sum())
    return total / max(count, 1), anchor_total / max(anchor_count, 1)


@torch.no_grad()
def object_attribute_labels(object_masks: torch.Tensor, rendered) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, h, w) mask logits of an image's object tokens and its ground truth → (n,) shape and (n,)
    colour indices (toyworld order) of the object each token covers (mask IoU > 0.5), else -100."""
    from omg_llava_ros.toyworld import COLORS, SHAPES

    pred = object_masks.float() >= 0
    gt = resize_masks(np.stack([o.mask for o in rendered.objects]), tuple(pred.shape[-2:])) >= 0.5
    best, which = pairwise_iou(pred, gt).max(1)  # a scene has at least one object
    shapes = torch.tensor([SHAPES.index(o.shape) for o in rendered.objects], dtype=torch.long)[which]
    colours = torch.tensor([list(COLORS).index(o.color) for o in rendered.objects], dtype=torch.long)[which]
    shapes[best <= 0.5] = -100
    colours[best <= 0.5] = -100
    return shapes, colours


def word_alignment_loss(model: OmgLlava, states: torch.Tensor, labels: torch.Tensor, words: list[str]) -> torch.Tensor:
    """Cross-entropy of (N, H) residual states on (N,) labels (-100: none), the logits being the cosine
    similarities (× 10) with the input embeddings of `words` (one token each)."""
    ids = [model.tokenizer.encode(" " + w, add_special_tokens=False) for w in words]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"every word must be one token: {dict(zip(words, ids, strict=True))}")
    table = model.llm.get_input_embeddings().weight[torch.tensor([i[0] for i in ids])]
    logits = 10 * F.normalize(states.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T
    if not (labels != -100).any():
        return logits.sum() * 0
    return F.cross_entropy(logits, labels, ignore_index=-100)


class AttributeHead(torch.nn.Module):
    """Training-only: shape (5) and colour (6) logits of an LLM residual state at an object token."""

    def __init__(self, hidden: int):
        super().__init__()
        self.shape = torch.nn.Linear(hidden, 5)
        self.colour = torch.nn.Linear(hidden, 6)


def object_alignment_loss(
    model: OmgLlava,
    vb: VisualBatch,
    seqs: list[Sequence_],
    chunks,
    batch,
    early: torch.Tensor,
    head: AttributeHead | None = None,
) -> torch.Tensor:
    """The object tokens of every row, read from the residual stream `early` (B, L, H), classified
    by shape and by colour (averaged): by `head`, or without one by their cosine similarity with
    the input embeddings of the shape and colour words. Each scene counts once per row it prefixes."""
    from omg_llava_ros.toyworld import COLORS, SHAPES

    states, shapes, colours = [], [], []
    for b, (seq, (scene, rows)) in enumerate(zip(seqs, chunks, strict=True)):
        shape, colour = object_attribute_labels(vb.object_masks[scene], batch[rows[0]].rendered)
        states.append(early[b, seq.object_positions])
        shapes.append(shape)
        colours.append(colour)
    states = torch.cat(states)
    if head is not None:
        shape, colour = torch.cat(shapes), torch.cat(colours)
        if not (shape != -100).any():
            return states.sum() * 0
        return 0.5 * (
            F.cross_entropy(head.shape(states.float()), shape, ignore_index=-100)
            + F.cross_entropy(head.colour(states.float()), colour, ignore_index=-100)
        )
    return 0.5 * (
        word_alignment_loss(model, states, torch.cat(shapes), list(SHAPES))
        + word_alignment_loss(model, states, torch.cat(colours), list(COLORS))
    )
