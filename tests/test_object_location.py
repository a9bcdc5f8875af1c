"""Object location (ours): object tokens carry where their object is, `[SEG]` states say where
theirs is, and a mask keeps the component at that place."""

import numpy as np
import pytest
import torch

from omg_llava_ros.model.config import get_config
from omg_llava_ros.model.object_location import (
    DROPPED_LOGIT,
    RELATION_FEATURES,
    ObjectLocation,
    keep_component_nearest,
    mask_areas,
    mask_centroids,
    region_constraints,
    relation_features,
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

    from omg_llava_ros.training.instruction_losses import location_loss

    hidden_size = 8
    location = ObjectLocation(4, hidden_size)
    model = SimpleNamespace(object_location=location)
    left, right = square_logits([(2, 2, 10, 10)]), square_logits([(20, 2, 28, 10)])
    centroids = torch.tensor([[0.19, 0.19], [0.75, 0.19]])
    prior = SimpleNamespace(object_centroids=[centroids], object_areas=None)
    vb = SimpleNamespace(object_masks=[torch.stack([left, right])], prior=prior)
    target = np.zeros((GRID * 4, GRID * 4), dtype=bool)
    target[8:40, 80:112] = True  # the right square at 4× the mask resolution
    nothing = np.zeros_like(target)  # matches no object token: no pointer loss
    seq = SimpleNamespace(
        seg_positions=[3, 4],
        object_positions=[0, 1],
        target_masks=[target, nothing],
        image_index=0,
        anchor_masks=[],
        phrase_spans=[(2, 3), (4, 5)],
    )
    hidden = torch.randn(1, 5, hidden_size, requires_grad=True)
    loss, anchor = location_loss(model, vb, [seq], hidden)
    scores = location.point(hidden[0, [3]], hidden[0, [0, 1]], centroids)
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(scores, torch.tensor([1])))
    assert anchor == 0  # no relations, no anchor
    loss.backward()
    assert location.seg_query.weight.grad is not None and hidden.grad[0, 4].abs().sum() == 0
    # A model without the head has no location loss.
    assert location_loss(SimpleNamespace(object_location=None), vb, [seq], hidden) == (0, 0)


def test_the_anchor_loss_points_a_relation_at_its_anchor_token():
    from types import SimpleNamespace

    from omg_llava_ros.training.instruction_losses import location_loss

    location = ObjectLocation(4, 8, relations=True)
    left, right = square_logits([(2, 2, 10, 10)]), square_logits([(20, 2, 28, 10)])
    masks = torch.stack([left, right])
    centroids = mask_centroids(masks)
    prior = SimpleNamespace(object_centroids=[centroids], object_areas=[mask_areas(masks, torch.ones(2, dtype=bool))])
    vb = SimpleNamespace(object_masks=[masks], prior=prior)
    big = lambda m: np.kron(m.numpy() >= 0, np.ones((4, 4), dtype=bool))  # noqa: E731 - 4x the mask grid
    # "the square right of the left square": target right, anchor left; a second [SEG] names no anchor.
    seq = SimpleNamespace(
        seg_positions=[3, 4],
        object_positions=[0, 1],
        target_masks=[big(right), big(left)],
        anchor_masks=[big(left), None],
        image_index=0,
        phrase_spans=[(2, 3), (4, 5)],  # the first [SEG]'s phrase at 2, the second has none
    )
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    loss, anchor = location_loss(SimpleNamespace(object_location=location), vb, [seq], hidden)
    expected = torch.nn.functional.cross_entropy(
        location.anchor_scores(hidden[0, [2]], hidden[0, [0, 1]]), torch.tensor([0])
    )
    assert torch.allclose(anchor, expected)
    anchor.backward()
    # The anchor is read from the phrase, not from the [SEG] state.
    assert location.anchor_query.weight.grad.abs().sum() > 0 and hidden.grad[0, 2].abs().sum() > 0
    assert hidden.grad[0, 3].abs().sum() == 0 and hidden.grad[0, 4].abs().sum() == 0


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


def _pointers(hidden: int = 16) -> tuple[ObjectLocation, ObjectLocation]:
    """A pointer without relations and one with them, sharing every weight the first has."""
    torch.manual_seed(0)
    plain = ObjectLocation(8, hidden)
    related = ObjectLocation(8, hidden, relations=True)
    related.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        plain.direction.weight.normal_()  # a trained direction term, the same in both
        related.direction.weight.copy_(plain.direction.weight)
    return plain, related


def test_relations_start_at_zero_so_a_converted_pointer_points_as_before():
    plain, related = _pointers()
    seg, objects = torch.randn(3, 16), torch.randn(5, 16)
    centroids, areas = torch.rand(5, 2), torch.tensor([0.02, 0.05, 0.01, 0.0, 0.03])
    assert torch.allclose(plain.point(seg, objects, centroids), related.point(seg, objects, centroids, areas))
    with pytest.raises(ValueError, match="areas"):
        related.point(seg, objects, centroids)


def test_relation_features_read_sides_distance_anchor_and_area_extremes():
    # Objects: 0 the anchor at the centre, 1 left of it, 2 right of it and farther, 3 below it, 4 stuff.
    centroids = torch.tensor([[0.5, 0.5], [0.3, 0.5], [0.9, 0.5], [0.5, 0.8], [0.5, 0.5]])
    areas = torch.tensor([0.02, 0.05, 0.01, 0.03, 0.0])  # 4 is stuff (the table): area 0, never an extreme
    anchor = torch.tensor([[1.0, 0, 0, 0, 0]])
    f = relation_features(anchor, centroids, areas)[0]  # (n, 6)
    side_x, side_y, distance, is_anchor, largest, smallest = f.unbind(-1)
    assert side_x[1] < -0.99 and side_x[2] > 0.99 and abs(side_x[3]) < 1e-6
    assert side_y[3] > 0.99 and abs(side_y[1]) < 1e-6  # y points down: 3 is below
    assert torch.allclose(distance[:4], torch.tensor([0.0, 2.0, 4.0, 3.0]), atol=1e-5)  # units of 0.1
    assert torch.equal(is_anchor, anchor[0])
    assert largest.argmax() == 1 and largest[1] == 1 and largest[4] == 0
    assert smallest.argmax() == 2 and smallest[2] == 1 and smallest[4] == 0
    assert len(RELATION_FEATURES) == f.shape[-1]


def test_trained_relation_weights_pick_the_nearest_object_on_the_named_side():
    # "the X left of the anchor": on the left side, nearest to the anchor, not the anchor itself.
    _, related = _pointers()
    centroids = torch.tensor([[0.5, 0.5], [0.35, 0.5], [0.1, 0.4], [0.6, 0.5]])  # anchor, near-left, far-left, right
    areas = torch.full((4,), 0.02)
    objects = torch.zeros(4, 16)
    objects[0] = 10.0  # the anchor attention finds object 0 through these states
    with torch.no_grad():
        for layer in (related.object_key, related.direction, related.anchor_key, related.anchor_query):
            layer.weight.zero_()
            layer.bias.zero_()
        related.anchor_key.weight.copy_(torch.eye(16))
        related.anchor_query.bias.fill_(1.0)
        # Weights of side_x, side_y, distance, is_anchor, largest, smallest: left, near, not the anchor.
        related.relation.bias.copy_(torch.tensor([-5.0, 0.0, -1.0, -20.0, 0.0, 0.0]))
    seg = torch.randn(1, 16)
    assert related.anchor_scores(seg, objects).softmax(-1)[0, 0] > 0.99
    assert int(related.point(seg, objects, centroids, areas).argmax()) == 1
    # The same weights with the "right of" sign pick the object right of the anchor.
    with torch.no_grad():
        related.relation.bias[0] = 5.0
    assert int(related.point(seg, objects, centroids, areas).argmax()) == 3


def test_mask_areas_are_grid_fractions_and_zero_for_stuff():
    logits = torch.stack([square_logits([(0, 0, 8, 8)]), square_logits([(0, 0, 16, 16)])])
    areas = mask_areas(logits, torch.tensor([True, False]))
    assert torch.allclose(areas, torch.tensor([64 / GRID**2, 0.0]))
