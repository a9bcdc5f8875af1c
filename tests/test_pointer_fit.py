"""Stage 6: the pointer's inputs recorded from the frozen model, fitted alone, nothing else changed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omg_llava_ros import OmgLlava
from omg_llava_ros.model.omg_llava import IMAGE_PLACEHOLDER
from omg_llava_ros.toyworld.conversations import REFERRING_TEMPLATES
from omg_llava_ros.toyworld.referring import enumerate_expressions
from omg_llava_ros.training import checkpoints, config, pointer_fit, trainer
from omg_llava_ros.training.evaluate import _scene


@pytest.fixture(scope="module")
def related(tmp_path_factory):
    """The shipped model as stage 6 starts from it: its pointer with relations."""
    out = tmp_path_factory.mktemp("stage6")
    cfg = config.TrainConfig(out_dir=str(out), init_from="embedded", point_relations=True)
    return checkpoints.build_model(cfg, out)


def _scene_with_forms(seed: int, forms: set[int]):
    rng = np.random.default_rng(seed)
    while True:
        rendered = _scene(rng, 256)
        offered = {e.form for t in range(len(rendered.objects)) for e in enumerate_expressions(rendered, t)}
        if forms <= offered:
            return rendered


def test_a_record_holds_the_states_the_pointer_reads_when_the_model_answers(related):
    rendered = _scene_with_forms(4, {1, 5})
    state = related.set_image(rendered.image, perception=True)
    target, expression = next(
        (t, e) for t in range(len(rendered.objects)) for e in enumerate_expressions(rendered, t) if e.form == 5
    )
    records = pointer_fit.record_scene(related, rendered, np.random.default_rng(0), {"5": 50})  # as TOML gives it
    assert {r.form for r in records} >= {1, 5}
    fives = [r for r in records if r.form == 5]
    assert len(fives) == sum(
        e.form == 5 for t in range(len(rendered.objects)) for e in enumerate_expressions(rendered, t)
    )
    for r in records:
        assert len(r.objects) == len(r.centroids) == len(r.areas) == len(state.prior.object_centroids[0])
        assert r.target != pointer_fit.NO_TOKEN  # the trained decoder finds every object of a plain scene
    assert all(r.anchor != pointer_fit.NO_TOKEN for r in fives)

    # What inference reads: the `[SEG]` state of the generated answer, which echoes the phrase.
    rng = np.random.default_rng(7)
    token_masks = state.prior.object_masks[0] >= 0
    mine = pointer_fit._record_question(
        related, state, rendered, target, expression, rng, token_masks, state.prior.object_areas[0]
    )[0]
    question = REFERRING_TEMPLATES[int(np.random.default_rng(7).integers(len(REFERRING_TEMPLATES)))]
    seen = {}
    original = related._seg_points

    def spy(gen, ids, st):
        end = ids.index(IMAGE_PLACEHOLDER) + len(st.visual_tokens)
        seen["seg"], seen["objects"] = gen.seg_hidden, gen.prompt_hidden[end - len(mine.objects) : end]
        return original(gen, ids, st)

    related._seg_points = spy
    try:
        reply = related.chat(rendered.image, question.format(ref=expression.text))
    finally:
        del related._seg_points
    assert expression.text in reply.text and len(seen["seg"]) == 1
    assert torch.allclose(mine.seg, seen["seg"][0].float(), atol=1e-3)
    assert torch.allclose(mine.objects, seen["objects"].float(), atol=1e-3)


def test_records_round_trip_through_safetensors(related, tmp_path):
    records = pointer_fit.record_scene(related, _scene_with_forms(5, {5}), np.random.default_rng(1), {5: 3})
    path = tmp_path / "records.safetensors"
    pointer_fit.save_records(records, path)
    back = pointer_fit.load_records(path)
    assert len(back) == len(records)
    for a, b in zip(records, back, strict=True):
        assert (a.target, a.anchor, a.form) == (b.target, b.anchor, b.form)
        for name in ("seg", "objects", "centroids", "areas"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    assert b"pickle" not in path.read_bytes()[:200]


def _synthetic(rng: np.random.Generator, count: int, hidden: int) -> list[pointer_fit.PointerRecord]:
    """Questions only the relation features answer: the object nearest the anchor on its right, the
    anchor named in the phrase state by a direction that matches its token's state; the `[SEG]`
    state the same for every question ("the one right of ...")."""
    out = []
    seg = torch.from_numpy(np.random.default_rng(99).normal(size=hidden)).float()
    for _ in range(count):
        n = 5
        objects = torch.from_numpy(rng.normal(size=(n, hidden))).float()
        centroids = torch.from_numpy(rng.uniform(0.05, 0.95, size=(n, 2))).float()
        anchor = int(rng.integers(n))
        right = [i for i in range(n) if centroids[i, 0] > centroids[anchor, 0] + 0.02]
        if not right:
            continue
        target = min(right, key=lambda i: float((centroids[i] - centroids[anchor]).norm()))
        phrase = objects[anchor] + 0.1 * torch.from_numpy(rng.normal(size=hidden)).float()
        areas = torch.from_numpy(rng.uniform(0.01, 0.05, size=n)).float()
        out.append(pointer_fit.PointerRecord(seg, phrase, objects, centroids, areas, target, anchor, 5))
    return out


def test_fitting_learns_a_relation_and_leaves_the_gate_alone():
    from omg_llava_ros.model.object_location import ObjectLocation

    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    head = ObjectLocation(8, 16, gate_init=0.2, relations=True)
    train, held_out = _synthetic(rng, 1500, 16), _synthetic(rng, 200, 16)
    before = pointer_fit.pointer_accuracy(head, held_out)[5]
    gate = head.gate.detach().clone()
    losses = pointer_fit.fit(head, train, steps=300, lr=1e-2, batch=32, anchor_weight=1.0)
    after = pointer_fit.pointer_accuracy(head, held_out)[5]
    assert losses[-1] < losses[0]
    assert before < 0.5 and after > 0.8, (before, after)
    assert torch.equal(head.gate, gate) and not any(p.requires_grad for p in head.parameters())


def test_fitting_refuses_records_with_no_target():
    from omg_llava_ros.model.object_location import ObjectLocation

    head = ObjectLocation(8, 16, relations=True)
    record = _synthetic(np.random.default_rng(0), 20, 16)[0]
    record.target = pointer_fit.NO_TOKEN
    with pytest.raises(ValueError, match="no record"):
        pointer_fit.fit(head, [record], steps=1, lr=1e-3)


def test_stage6_records_fits_saves_and_then_is_done(tmp_path, monkeypatch):
    monkeypatch.setattr(pointer_fit, "RECORDS_PER_FILE", 6)
    cfg = config.TrainConfig(
        out_dir=str(tmp_path),
        init_from="embedded",
        stages=(6,),
        stage6_records=12,
        stage6_steps=20,
        stage6_batch=4,
        threads=1,
    )
    shipped = OmgLlava.from_pretrained()
    model = trainer.train(cfg)
    folder = tmp_path / "stage6"
    assert sorted(p.name for p in folder.glob("records_*.safetensors")) == [
        "records_000.safetensors",
        "records_001.safetensors",
    ]
    report = json.loads((folder / "DONE").read_text())
    assert report["steps"] == 20 and set(report["after"]) <= {str(f) for f in range(1, 7)}
    # Only the pointer moved: every other weight is the shipped model's, so every text answer is too.
    before = shipped.state_dict()
    for name, value in model.state_dict().items():
        if name.startswith("object_location.") and name != "object_location.gate":
            continue
        assert torch.equal(value, before[name]), name
    assert not torch.equal(
        model.object_location.relation.weight, torch.zeros_like(model.object_location.relation.weight)
    )
    # A second run finds the stage done and starts from its weights: nothing is recorded again.
    monkeypatch.setattr(pointer_fit, "record", lambda *a, **k: pytest.fail("recorded again"))
    again = trainer.train(cfg)
    assert torch.equal(again.object_location.relation.weight, model.object_location.relation.weight)
