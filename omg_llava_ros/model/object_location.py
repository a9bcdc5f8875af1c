"""Where objects are, given to the LLM and taken back from it (ours; OMG-LLaVA has neither).

Why: the frozen decoder decodes a `[SEG]` query from its content alone — its mask is the query
against the mask features — so of two objects alike (two red squares) it finds either, or both,
whatever the LLM meant ("the topmost square"). And the LLM cannot tell them apart either: an
object-centric token is [query feature ; query position], and the position half of a panoptic query
is its learned embedding, not where its object lies.

In:  each object token's position half gains `gate ⊙ pos_linear(sine(centroid ± half))`, the
     decoder's own encoding of a point prompt at the centroid of the object's mask. A gate started at
     zero leaves a model exactly as it was, but on a trained LLM it hardly moves (0.008 after 300
     steps, the location then 1% of the token's position half): training starts it at 0.2.
Out: each `[SEG]` state points at one of the image's object tokens (a bilinear score between the
     `[SEG]` state and the LLM's last-layer states of the object tokens, plus a direction read from
     the `[SEG]` state against the objects' centroids, trained with cross-entropy towards the token
     whose mask is the target's; without the direction term the pointer stayed at chance between
     two objects alike after 650 steps, 0.53); the `[SEG]` mask keeps only its connected
     component nearest that object's centroid; a `[SEG]` mask that overlaps the object little (IoU
     under 0.5: it found the twin, or another object) is decoded again attending only inside the
     object's panoptic mask, as a mask prompt is, and one still mostly outside the object after that
     gives way to the object's own mask (`OmgLlava._masks_for_queries`). Regressing the centroid from the `[SEG]` state
     instead barely beat guessing the image centre after 400 steps (L1 0.17 against 0.20).
Follow mode keeping the component nearest the previous frame's mask was tried (follow
0.868 → 0.862 on 200 scenes): follow is left as it was.

Relations (`OmgLlavaConfig.point_relations`): the direction term picks extremes ("the leftmost
star"), but nothing in the score could say "the star left of the red circle" (nearest to another
object, on one side of it) or "the largest object": without relations the pointer chose the wrong
token for 26 of 27 failures of form 6 and 17 of 23 of form 5 (`training.referring_probe`). So the
pointer also finds an anchor (attention over the object tokens, trained towards the named anchor)
and weighs six geometric features of each object: its side of the anchor along x and y (a steep
tanh, as "left of" is strict), its distance to the anchor, how much it is the anchor itself, and how
near its area is to the largest and to the smallest thing's. The anchor is read from the mean state
of the phrase's tokens, not from the `[SEG]` state: fitted on the same recorded questions, the
`[SEG]` state found the named anchor for 0.72 of held-out relations, the phrase's mean for 0.98
(its last word's state 0.75). All six weights start at zero: a pointer given relations points
exactly as before until trained (`training.pointer_fit`).

Explicit relation choice (`OmgLlavaConfig.relation_shapes`): fitted on states recorded from v22, the
pointer above found the target of 0.93-0.95 of relation questions however its score was shaped (an
MLP gating the features, a relational score switched on by the phrase, attention over the phrase's
tokens), and half its misses picked an object of the named shape on the named side that was not the
nearest. So the rule of toyworld.md form 5 is applied as written, to what three small heads read:
which relation the phrase asks (none, left of, right of, above, below), the target's shape (both
from the phrase's mean state) and each object token's shape. Among the object tokens of that shape
strictly on that side of the anchor (the anchor attention's choice), the nearest to it wins; with no
relation asked, or no candidate, the scores above decide alone. Only in eval mode: in training
the rule would hide the learned score's errors from its loss.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from omg_llava_ros.model.omg_decoder import QueryConstraints
from omg_llava_ros.model.positional_encoding import coordinate_to_encoding
from omg_llava_ros.model.prompt_encoder import mask_allowed, point_query_position

# What a dropped component's logits become: well below zero, and below the refiner's floor so it
# leaves them alone.
DROPPED_LOGIT = -10.0
# Scales of the relation features, as fractions of the model input's side (centroids in [0, 1]):
# a 0.03 offset is nearly a full "side" vote, 0.1 of distance one unit; areas within 10% of the
# largest (smallest) score about 1/e or more.
SIDE_SCALE = 0.03
DISTANCE_SCALE = 0.1
AREA_SCALE = 0.1
RELATION_FEATURES = ("side_x", "side_y", "distance", "is_anchor", "largest", "smallest")
# What the relation head reads from a phrase: 0 = no relation, then the sides of toyworld.md form 5.
RELATION_KINDS = ("none", "left of", "right of", "above", "below")
# Added to the explicitly chosen object's score: above any difference the learned score makes.
CHOICE_BONUS = 1e4


class ObjectLocation(nn.Module):
    """gate: (C,) on the decoder's position encoding. point: `[SEG]` states (N, H), object-token
    states (n, H) of the same LLM pass and the objects' centroids (n, 2) → (N, n) scores.
    relation_shapes: how many shapes the explicit relation choice tells apart (0: no choice)."""

    def __init__(
        self,
        query_dim: int,
        hidden_size: int,
        gate_init: float = 0.0,
        relations: bool = False,
        relation_shapes: int = 0,
    ):
        super().__init__()
        self.gate = nn.Parameter(torch.full((query_dim,), gate_init))
        self.seg_query = nn.Linear(hidden_size, hidden_size)
        self.object_key = nn.Linear(hidden_size, hidden_size)
        # Two objects alike differ only in place: "the topmost" is a direction, and a score linear in
        # the centroid picks the extreme one. Zero: no preference until trained.
        self.direction = nn.Linear(hidden_size, 2)
        nn.init.zeros_(self.direction.weight)
        nn.init.zeros_(self.direction.bias)
        self.relations = relations
        if relations:
            self.anchor_query = nn.Linear(hidden_size, hidden_size)
            self.anchor_key = nn.Linear(hidden_size, hidden_size)
            self.relation = nn.Linear(hidden_size, len(RELATION_FEATURES))
            nn.init.zeros_(self.relation.weight)
            nn.init.zeros_(self.relation.bias)
        # The explicit relation choice's heads (see the module docstring); none when 0.
        self.relation_shapes = relation_shapes if relations else 0
        if self.relation_shapes:
            self.relation_kind = nn.Linear(hidden_size, len(RELATION_KINDS))
            self.target_shape = nn.Linear(hidden_size, relation_shapes)
            self.object_shape = nn.Linear(hidden_size, relation_shapes)
            # Untrained, it reads "no relation" from every phrase: the pointer points as before.
            nn.init.zeros_(self.relation_kind.weight)
            with torch.no_grad():
                self.relation_kind.bias.copy_(torch.tensor([1.0] + [0.0] * (len(RELATION_KINDS) - 1)))

    def encode(self, centroids: torch.Tensor, pos_linear: nn.Linear, half: float) -> torch.Tensor:
        """(n, 2) centroids in [0, 1] → (n, C) gated location terms: the point-prompt encoding with
        its ±half box, `half` as a fraction of the model input's side."""
        coords = point_query_position(centroids.to(pos_linear.weight.dtype), 1.0, half)
        encoding = pos_linear(coordinate_to_encoding(coords, pos_linear.out_features // 2))
        return self.gate * encoding

    def point(
        self,
        seg_hidden: torch.Tensor,
        object_hidden: torch.Tensor,
        centroids: torch.Tensor,
        areas: torch.Tensor | None = None,
        phrase_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, n) scores: what the `[SEG]` state asks of each object token's state, plus a direction it
        reads from its phrase ("the topmost square") against each object's centroid (n, 2) in [0, 1];
        with relations also the weighted `relation_features` (`areas`: (n,) mask areas as fractions
        of the grid, 0 for stuff), the anchor found from `phrase_hidden` (N, H), each `[SEG]`'s
        phrase's mean state (None: the `[SEG]` state stands in)."""
        seg = seg_hidden.to(self.gate.dtype)
        k = self.object_key(object_hidden.to(self.gate.dtype))
        content = self.seg_query(seg) @ k.T / k.shape[-1] ** 0.5
        scores = content + self.direction(seg) @ (2 * centroids.to(seg.dtype) - 1).T
        if not self.relations:
            return scores
        if areas is None:
            raise ValueError("a pointer with relations needs the objects' areas")
        phrase = seg if phrase_hidden is None else phrase_hidden.to(seg.dtype)
        anchor_logits = self.anchor_scores(phrase, object_hidden)
        features = relation_features(anchor_logits.softmax(-1), centroids, areas)
        scores = scores + (self.relation(seg)[:, None, :] * features).sum(-1)
        if not self.relation_shapes or self.training:
            return scores  # the rule has no gradient: training fits the learned score alone
        chosen = self.choose_related(phrase, object_hidden, centroids, areas, anchor_logits.argmax(-1))
        return scores + CHOICE_BONUS * chosen

    def choose_related(
        self,
        phrase_hidden: torch.Tensor,
        object_hidden: torch.Tensor,
        centroids: torch.Tensor,
        areas: torch.Tensor,
        anchors: torch.Tensor,
    ) -> torch.Tensor:
        """(N, n) one-hot rows: for each phrase that asks a relation, the object token of the
        phrase's shape strictly on that side of its anchor (`anchors`: (N,) token indices) and
        nearest to it; zero rows where no relation is asked or no token qualifies."""
        phrase = phrase_hidden.to(self.gate.dtype)
        kinds = self.relation_kind(phrase).argmax(-1)  # (N,)
        shapes = self.target_shape(phrase).argmax(-1)  # (N,)
        object_shapes = self.object_shape(object_hidden.to(self.gate.dtype)).argmax(-1)  # (n,)
        c = centroids.to(phrase.dtype)
        delta = c[None] - c[anchors][:, None]  # (N, n, 2) offsets from each row's anchor
        # left of: x below the anchor's; right of: above; above: y below; below: y above.
        side = torch.stack([-delta[..., 0], delta[..., 0], -delta[..., 1], delta[..., 1]], dim=-1) > 0
        on_side = side.gather(-1, (kinds.clamp(min=1) - 1)[:, None, None].expand(-1, c.shape[0], 1))[..., 0]
        candidate = on_side & (object_shapes[None] == shapes[:, None]) & (areas > 0)[None] & (kinds > 0)[:, None]
        candidate &= torch.arange(c.shape[0], device=c.device)[None] != anchors[:, None]
        distance = torch.where(candidate, delta.norm(dim=-1), torch.full_like(delta[..., 0], float("inf")))
        chosen = F.one_hot(distance.argmin(-1), c.shape[0]).to(phrase.dtype)
        return chosen * candidate.any(-1, keepdim=True)

    def anchor_scores(self, phrase_hidden: torch.Tensor, object_hidden: torch.Tensor) -> torch.Tensor:
        """(N, n) logits of which object token each phrase's anchor is ("the star left of *the red
        circle*") from the phrase's (N, H) mean state; trained towards the named anchor, meaningless
        for other forms."""
        k = self.anchor_key(object_hidden.to(self.gate.dtype))
        return self.anchor_query(phrase_hidden.to(self.gate.dtype)) @ k.T / k.shape[-1] ** 0.5


def relation_features(anchor: torch.Tensor, centroids: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
    """(N, n) anchor weights (rows sum to 1), (n, 2) centroids in [0, 1], (n,) areas (0: stuff) →
    (N, n, 6) features in `RELATION_FEATURES` order: side of the (soft) anchor along x and y
    (tanh, > 0 right of / below it), distance to it, the anchor weight itself, and the nearness of
    the object's log area to the largest and to the smallest thing's (1 for that thing, 0 for
    stuff)."""
    c = centroids.to(anchor.dtype)
    delta = c[None] - (anchor @ c)[:, None]  # (N, n, 2) offsets from the anchor
    side = torch.tanh(delta / SIDE_SCALE)
    distance = delta.norm(dim=-1, keepdim=True) / DISTANCE_SCALE
    thing = areas > 0
    log_area = torch.log(areas.to(anchor.dtype).clamp(min=1e-6))
    if thing.any():
        largest = torch.exp((log_area - log_area[thing].max()).clamp(max=0) / AREA_SCALE)
        smallest = torch.exp((log_area[thing].min() - log_area).clamp(max=0) / AREA_SCALE)
    else:
        largest = smallest = torch.zeros_like(log_area)
    size = torch.stack([largest, smallest], dim=-1) * thing[:, None]
    size = size[None].expand(len(anchor), -1, -1)
    return torch.cat([side, distance, anchor[..., None], size], dim=-1)


def mask_centroids(mask_logits: torch.Tensor) -> torch.Tensor:
    """(n, h, w) logits → (n, 2) (x, y) in [0, 1] of each mask (sigmoid ≥ 0.5); the image centre for
    an empty mask."""
    n, h, w = mask_logits.shape
    masks = (mask_logits >= 0).float()
    area = masks.flatten(1).sum(1)
    xs = (torch.arange(w, dtype=torch.float32, device=masks.device) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float32, device=masks.device) + 0.5) / h
    cx = (masks.sum(1) * xs).sum(1) / area.clamp(min=1)
    cy = (masks.sum(2) * ys).sum(1) / area.clamp(min=1)
    out = torch.stack([cx, cy], dim=-1)
    return torch.where(area[:, None] > 0, out, torch.full_like(out, 0.5))


def mask_areas(mask_logits: torch.Tensor, things: torch.Tensor) -> torch.Tensor:
    """(n, h, w) logits, (n,) bool thing flags → (n,) fraction of the grid each mask covers (sigmoid
    ≥ 0.5); 0 for stuff, which is never "the largest object"."""
    area = (mask_logits >= 0).flatten(1).float().mean(1)
    return torch.where(things.to(area.device), area, torch.zeros_like(area))


def keep_component_nearest(logits: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(N, h, w) mask logits, (N, 2) points (x, y) in [0, 1] → the logits with every connected
    component of the mask (logit ≥ 0, 8-connected) but the one nearest its point pushed down to
    DROPPED_LOGIT. Masks of one component or none come back unchanged."""
    import cv2

    out = logits.clone()
    n, h, w = logits.shape
    binary = (logits >= 0).cpu().numpy().astype(np.uint8)
    for i in range(n):
        count, labels = cv2.connectedComponents(binary[i], connectivity=8)
        if count <= 2:  # background + at most one component
            continue
        ys, xs = np.nonzero(labels)
        px, py = float(points[i, 0]) * w - 0.5, float(points[i, 1]) * h - 0.5
        nearest = labels[ys, xs][int(np.argmin((xs - px) ** 2 + (ys - py) ** 2))]
        drop = torch.from_numpy((labels != nearest) & (labels > 0)).to(logits.device)
        out[i] = torch.where(drop, out.new_tensor(DROPPED_LOGIT), out[i])
    return out


def region_constraints(regions: torch.Tensor, level_shapes: list[tuple[int, int]]) -> QueryConstraints:
    """(N, h, w) bool regions → constraints that let each query attend exactly its region at every
    level, as a mask prompt's (`mask_allowed`)."""
    masks = regions.cpu().numpy()
    allowed = [
        torch.stack([mask_allowed(m, shape) for m in masks])[:, None].to(regions.device) for shape in level_shapes
    ]
    use_prediction = torch.zeros(len(regions), 1, dtype=torch.bool, device=regions.device)
    return QueryConstraints(allowed, use_prediction)
