"""The pointer's explicit relation choice (stage 7): toyworld.md's form-5 rule on what three heads read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omg_llava_ros import OmgLlava
from omg_llava_ros.model.object_location import RELATION_KINDS, ObjectLocation
from omg_llava_ros.training import config, pointer_fit, relation_choice_fit, trainer

HIDDEN, SHAPES = 12, 3


def _reading_head() -> ObjectLocation:
    """A head whose heads read one-hot states: relation from dims 0-4, shapes from dims 5-7 (phrase
    and object alike); the anchor attention reads dim 8 of the phrase against dim 8 of the objects."""
    head = ObjectLocation(4, HIDDEN, relations=True, relation_shapes=SHAPES)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.relation_kind.weight[:, :5] = torch.eye(5)
        head.target_shape.weight[:, 5:8] = torch.eye(SHAPES)
        head.object_shape.weight[:, 5:8] = torch.eye(SHAPES)
        head.anchor_query.weight[8, 8] = 10.0
        head.anchor_key.weight[8, 8] = 10.0
    return head


def _phrase(relation: str, shape: int) -> torch.Tensor:
    v = torch.zeros(HIDDEN)
    v[RELATION_KINDS.index(relation)] = 1.0
    v[5 + shape] = 1.0
    v[8] = 1.0
    return v


def _objects(shapes: list[int], anchor: int) -> torch.Tensor:
    states = torch.zeros(len(shapes), HIDDEN)
    states[torch.arange(len(shapes)), 5 + torch.tensor(shapes)] = 1.0
    states[anchor, 8] = 1.0
    return states


# The anchor (index 0) in the middle; shape 0 left near (1) and left far (2), shape 1 left nearer
# still (3), shape 0 on the right a little above (4) and far below (5).
CENTROIDS = torch.tensor([[0.5, 0.5], [0.3, 0.5], [0.1, 0.45], [0.45, 0.5], [0.62, 0.48], [0.5, 0.95]])
SHAPE_OF = [2, 0, 0, 1, 0, 0]
AREAS = torch.full((6,), 0.02)


@pytest.mark.parametrize(
    ("relation", "shape", "expected"),
    [
        ("left of", 0, 1),
        ("left of", 1, 3),
        ("right of", 0, 4),
        ("below", 0, 5),
        ("above", 0, 4),
        ("above", 1, None),
        ("none", 0, None),
    ],
)
def test_the_nearest_object_of_the_named_shape_strictly_on_the_named_side_is_chosen(relation, shape, expected):
    head = _reading_head()
    phrase = _phrase(relation, shape)[None]
    chosen = head.choose_related(phrase, _objects(SHAPE_OF, 0), CENTROIDS, AREAS, torch.tensor([0]))
    if expected is None:
        assert not chosen.any()  # no relation asked, or nothing of that shape above the anchor
    else:
        assert chosen[0].tolist() == [float(i == expected) for i in range(6)]
    # And the pointer's scores follow it in eval mode, whatever its learned scores say; in training
    # they are the learned scores alone.
    args = (torch.randn(1, HIDDEN), _objects(SHAPE_OF, 0), CENTROIDS, AREAS, phrase)
    learned = head.point(*args)
    scores = head.eval().point(*args)
    if expected is not None:
        assert int(scores.argmax()) == expected
    assert torch.allclose(scores - learned, 1e4 * chosen, atol=1e-2)


def test_stuff_and_the_anchor_itself_are_never_chosen():
    head = _reading_head()
    shapes = [0, 0, 0]  # the anchor is of the target's shape too
    centroids = torch.tensor([[0.5, 0.5], [0.49, 0.5], [0.2, 0.5]])
    areas = torch.tensor([0.02, 0.0, 0.02])  # token 1 is stuff (the table)
    chosen = head.choose_related(_phrase("left of", 0)[None], _objects(shapes, 0), centroids, areas, torch.tensor([0]))
    assert chosen[0].tolist() == [0.0, 0.0, 1.0]


def test_an_untrained_choice_reads_no_relation_so_the_pointer_points_as_before():
    torch.manual_seed(0)
    plain = ObjectLocation(4, HIDDEN, relations=True)
    torch.manual_seed(0)
    choosing = ObjectLocation(4, HIDDEN, relations=True, relation_shapes=SHAPES)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_()
        for name, p in plain.named_parameters():
            dict(choosing.named_parameters())[name].copy_(p)
    args = (torch.randn(3, HIDDEN), torch.randn(6, HIDDEN), CENTROIDS, AREAS, torch.randn(3, HIDDEN))
    assert torch.equal(plain.eval().point(*args), choosing.eval().point(*args))


def _record(rng: np.random.Generator) -> pointer_fit.PointerRecord:
    """A synthetic record whose labels are linear in its states (relation and target shape in the
    phrase, shapes in the object tokens), with noise."""
    n = 5
    relation, shape = int(rng.integers(len(RELATION_KINDS))), int(rng.integers(SHAPES))
    shapes = torch.from_numpy(rng.integers(SHAPES, size=n))
    phrase = _phrase(RELATION_KINDS[relation], shape) + 0.3 * torch.from_numpy(rng.normal(size=HIDDEN)).float()
    objects = _objects(shapes.tolist(), 0) + 0.3 * torch.from_numpy(rng.normal(size=(n, HIDDEN))).float()
    areas = torch.tensor([0.02, 0.02, 0.02, 0.02, 0.0])
    return pointer_fit.PointerRecord(
        torch.zeros(HIDDEN), phrase, objects, CENTROIDS[:n], areas, 1, 0, 5 if relation else 1,
        relation=relation, shape=shape, object_shapes=shapes,
    )  # fmt: skip


def test_fitting_learns_the_three_heads_and_nothing_else():
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    head = ObjectLocation(4, HIDDEN, relations=True, relation_shapes=SHAPES)
    train, held_out = [_record(rng) for _ in range(600)], [_record(rng) for _ in range(200)]
    others = {k: v.clone() for k, v in head.state_dict().items() if k.split(".")[0] not in relation_choice_fit.HEADS}
    before = relation_choice_fit.head_accuracy(head, held_out)
    losses = relation_choice_fit.fit_choice(head, train, steps=200, lr=3e-2, batch=32)
    after = relation_choice_fit.head_accuracy(head, held_out)
    assert losses[-1] < losses[0]
    assert before["relation_kind"] < 0.5 and min(after.values()) > 0.95, (before, after)
    for k, v in others.items():
        assert torch.equal(head.state_dict()[k], v), k


def test_records_without_object_shapes_are_refused():
    head = ObjectLocation(4, HIDDEN, relations=True, relation_shapes=SHAPES)
    record = _record(np.random.default_rng(0))
    record.object_shapes = None
    with pytest.raises(ValueError, match="object shapes"):
        relation_choice_fit.fit_choice(head, [record], steps=1, lr=1e-3)


def test_recorded_labels_name_the_relation_the_target_shape_and_each_token_shape():
    from omg_llava_ros.toyworld.scene import SHAPES as WORLD_SHAPES
    from tests.test_pointer_fit import _scene_with_forms

    model = OmgLlava.from_pretrained()
    rendered = _scene_with_forms(4, {1, 5})
    records = pointer_fit.record_scene(model, rendered, np.random.default_rng(0), {5: 50})
    assert {r.form for r in records} >= {1, 5}
    for r in records:
        assert (r.relation > 0) == (r.form == 5)
        overlaps = [_iou_with_token(model, rendered, r.target, o) for o in rendered.objects]
        assert WORLD_SHAPES[r.shape] == rendered.objects[int(np.argmax(overlaps))].shape
        things = r.areas > 0
        assert (r.object_shapes[things] >= 0).all()  # a plain scene: every thing token covers an object
    assert pointer_fit.relation_kind("the star left of the red circle") == RELATION_KINDS.index("left of")
    assert pointer_fit.relation_kind("the leftmost star") == 0


def _iou_with_token(model, rendered, token: int, obj) -> float:
    from omg_llava_ros.training.instruction_losses import pairwise_iou
    from omg_llava_ros.training.losses import resize_masks

    state = model.set_image(rendered.image, perception=True)
    mask = state.prior.object_masks[0][token : token + 1] >= 0
    truth = resize_masks(obj.mask[None], tuple(mask.shape[-2:])) > 0.5
    return float(pairwise_iou(truth, mask)[0, 0])


def test_stage7_records_fits_saves_and_changes_only_the_choice(tmp_path, monkeypatch):
    monkeypatch.setattr(pointer_fit, "RECORDS_PER_FILE", 6)
    cfg = config.TrainConfig(
        out_dir=str(tmp_path),
        init_from="embedded",
        stages=(7,),
        relation_shapes=5,
        stage7_records=12,
        stage7_held_out=4,
        stage7_steps=10,
        stage6_batch=4,
        threads=1,
    )
    shipped = OmgLlava.from_pretrained()
    model = trainer.train(cfg)
    report = json.loads((tmp_path / "stage7" / "DONE").read_text())
    assert report["steps"] == 10 and set(report["heads"]) <= set(relation_choice_fit.HEADS)
    before = shipped.state_dict()
    for name, value in model.state_dict().items():
        if name.split(".")[1] in relation_choice_fit.HEADS:
            continue
        assert torch.equal(value, before[name]), name
    monkeypatch.setattr(pointer_fit, "record", lambda *a, **k: pytest.fail("recorded again"))
    again = trainer.train(cfg)
    assert torch.equal(again.object_location.relation_kind.weight, model.object_location.relation_kind.weight)
