"""Object location (ours): object tokens carry where their object is, `[SEG]` states say where
theirs is, and a mask keeps the component at that place."""

import numpy as np
import torch

from omg_llava_ros.model.config import get_config
from omg_llava_ros.model.object_location import (
    DROPPED_LOGIT,
    ObjectLocation,
    keep_component_nearest,
    mask_centroids,
    region_constraints,
)
from omg_llava_ros.model.omg_decoder import OmgDecoder

GRID = 32


def square_logits(boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """(h, w) logits: +4 inside the (x0, y0, x1, y1) boxes (exclusive ends), -4 elsewhere."""
    logits = torch.full((GRID, GRID), -4.0)
    for x0, y0, x1, y1 in boxes:
        logits[y0:y1, x0:x1] = 4.0
    return logits


def test_a_mask_on_two_objects_keeps_the_one_at_the_point():
    both = square_logits([(2, 2, 8, 8), (20, 18, 28, 26)])
    kept = keep_component_nearest(torch.stack([both, both]), torch.tensor([[0.15, 0.15], [0.75, 0.70]]))
    assert (kept[0, 2:8, 2:8] == 4).all() and (kept[0, 18:26, 20:28] == DROPPED_LOGIT).all()
    assert (kept[1, 18:26, 20:28] == 4).all() and (kept[1, 2:8, 2:8] == DROPPED_LOGIT).all()
    # Nothing else moves: the background keeps its logits.
    assert (kept[:, 12, 12] == -4).all()


def test_the_nearest_component_wins_even_when_the_point_is_on_neither():
    both = square_logits([(2, 2, 8, 8), (20, 2, 28, 8)])
    kept = keep_component_nearest(both[None], torch.tensor([[0.55, 0.9]]))[0]  # nearer the right one
    assert (kept[2:8, 20:28] == 4).all() and (kept[2:8, 2:8] == DROPPED_LOGIT).all()


def test_masks_of_one_component_or_none_are_left_alone():
    one = square_logits([(2, 2, 8, 8)])
    none = torch.full((GRID, GRID), -3.0)
    kept = keep_component_nearest(torch.stack([one, none]), torch.tensor([[0.9, 0.9], [0.1, 0.1]]))
    assert torch.equal(kept, torch.stack([one, none]))


def test_mask_centroids_are_in_unit_coordinates_and_the_centre_when_empty():
    logits = torch.stack([square_logits([(4, 8, 12, 16)]), torch.full((GRID, GRID), -1.0)])
    from_logits = mask_centroids(logits)
    assert torch.allclose(from_logits[0], torch.tensor([8 / GRID, 12 / GRID]))
    assert torch.equal(from_logits[1], torch.tensor([0.5, 0.5]))  # empty: the centre


def test_the_location_term_starts_at_zero_and_then_tells_places_apart():
    config = get_config("tiny")
    decoder = OmgDecoder(config.decoder, config.image_encoder.dims)
    c = decoder.config.hidden_dim
    location = ObjectLocation(c, 16)
    places = torch.tensor([[0.2, 0.3], [0.8, 0.3], [0.2, 0.3]])
    assert torch.equal(location.encode(places, decoder.pos_linear, 3 / 256), torch.zeros(3, c))
    with torch.no_grad():
        location.gate.fill_(1.0)
    term = location.encode(places, decoder.pos_linear, 3 / 256)
    assert torch.allclose(term[0], term[2]) and not torch.allclose(term[0], term[1], atol=1e-3)
    assert location.point(torch.randn(5, 16), torch.randn(3, 16), torch.rand(3, 2)).shape == (5, 3)


def test_the_direction_term_tells_two_objects_alike_apart_by_place():
    location = ObjectLocation(4, 8)
    seg, objects = torch.randn(1, 8), torch.randn(1, 8).expand(2, 8)  # two objects, the same state
    centroids = torch.tensor([[0.5, 0.2], [0.5, 0.8]])  # one high, one low
    scores = location.point(seg, objects, centroids)
    assert torch.allclose(scores[0, 0], scores[0, 1])  # untrained: no preference
    with torch.no_grad():
        location.direction.bias.copy_(torch.tensor([0.0, -3.0]))  # "topmost": smaller y scores higher
    scores = location.point(seg, objects, centroids)
    assert scores[0, 0] > scores[0, 1] + 3


def test_the_location_loss_points_each_seg_at_the_object_token_of_its_target():
    from types import SimpleNamespace

    from omg_llava_ros.training.trainer import location_loss

    hidden_size = 8
    location = ObjectLocation(4, hidden_size)
    model = SimpleNamespace(object_location=location)
    left, right = square_logits([(2, 2, 10, 10)]), square_logits([(20, 2, 28, 10)])
    centroids = torch.tensor([[0.19, 0.19], [0.75, 0.19]])
    vb = SimpleNamespace(object_masks=[torch.stack([left, right])], prior=SimpleNamespace(object_centroids=[centroids]))
    target = np.zeros((GRID * 4, GRID * 4), dtype=bool)
    target[8:40, 80:112] = True  # the right square at 4× the mask resolution
    nothing = np.zeros_like(target)  # matches no object token: no pointer loss
    seq = SimpleNamespace(seg_positions=[3, 4], object_positions=[0, 1], target_masks=[target, nothing], image_index=0)
    hidden = torch.randn(1, 5, hidden_size, requires_grad=True)
    loss = location_loss(model, vb, [seq], hidden)
    scores = location.point(hidden[0, [3]], hidden[0, [0, 1]], centroids)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(scores, torch.tensor([1])))
    loss.backward()
    assert location.seg_query.weight.grad is not None and hidden.grad[0, 4].abs().sum() == 0
    # A model without the head has no location loss.
    assert location_loss(SimpleNamespace(object_location=None), vb, [seq], hidden) == 0


def test_region_constraints_let_a_query_attend_exactly_its_region_at_every_level():
    from omg_llava_ros.model.omg_decoder import attention_blocked

    region = square_logits([(4, 4, 12, 12)]) >= 0
    constraints = region_constraints(region[None], [(8, 8), (16, 16)])
    assert [a.shape for a in constraints.allowed] == [(1, 1, 64), (1, 1, 256)]
    assert int(constraints.allowed[0].sum()) == 4 and int(constraints.allowed[1].sum()) == 16
    # Whatever the query's own mask says, it may look only inside the region.
    own = torch.full((1, 1, GRID, GRID), 5.0)
    blocked = attention_blocked(own, (16, 16), constraints, 1)
    assert torch.equal(~blocked[0, 0], constraints.allowed[1][0, 0])
