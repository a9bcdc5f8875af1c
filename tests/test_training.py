"""The training losses and the stage-0 loop: matching, set loss, the dense auxiliary loss, resume."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omg_llava_ros.training import (
    checkpoints,
    config,
    data,
    instruction_losses,
    instruction_stage,
    losses,
    model_inputs,
    perception_stage,
    schedule,
    sequences,
    stages,
    trainer,
)
from omg_llava_ros.training.losses import hungarian_match, set_criterion


def _square_masks(n: int, side: int = 8) -> torch.Tensor:
    """n disjoint horizontal bands on a side×side grid, flattened: (n, side²)."""
    masks = torch.zeros(n, side, side)
    for i in range(n):
        masks[i, i * side // n : (i + 1) * side // n] = 1
    return masks.flatten(1)


def test_hungarian_match_recovers_a_permutation():
    gt = _square_masks(3)
    labels = torch.tensor([4, 1, 7])
    perm = torch.tensor([2, 0, 1, 3, 4])  # query q predicts target perm[q] (queries 3, 4: nothing)
    mask_logits = torch.full((5, gt.shape[1]), -8.0)
    class_logits = torch.zeros(5, 11)
    for q in range(3):
        mask_logits[q] = gt[perm[q]] * 16 - 8
        class_logits[q, labels[perm[q]]] = 6
    qi, ti = hungarian_match(class_logits, mask_logits, labels, gt)
    assert sorted(qi.tolist()) == [0, 1, 2]
    assert all(int(t) == int(perm[q]) for q, t in zip(qi, ti, strict=True))


def test_set_criterion_prefers_the_right_classes():
    gt = _square_masks(2)
    labels = torch.tensor([3, 5])
    masks = torch.full((1, 4, 8, 8), -8.0)
    masks[0, 0] = (gt[0] * 16 - 8).view(8, 8)
    masks[0, 1] = (gt[1] * 16 - 8).view(8, 8)
    right = torch.zeros(1, 4, 7)
    right[0, 0, 3] = right[0, 1, 5] = 8
    right[0, 2:, 6] = 8  # unmatched queries: background
    wrong = right.clone()
    wrong[0, 0, 3], wrong[0, 0, 4] = 0, 8  # query 0 names the wrong class
    targets = [(labels, gt)]
    assert set_criterion([right], [masks], targets) < set_criterion([wrong], [masks], targets) - 1


def test_semantic_targets_are_per_pixel_class_distributions():
    gt = _square_masks(2, side=4)
    targets = [(torch.tensor([2, 0]), gt * 0.5), (torch.tensor([1]), gt[:1])]
    out = perception_stage.semantic_targets(targets, num_classes=3)
    assert out.shape == (2, 3, 16)
    covered = gt[0] > 0
    assert torch.allclose(out[0, 2, covered], torch.ones(int(covered.sum())))  # normalised, whatever the mass
    assert torch.allclose(out[0, 0, ~covered], torch.ones(int((~covered).sum())))
    assert torch.allclose(out[1, 1, covered], torch.ones(int(covered.sum())))
    assert torch.all(out[1, :, ~covered] == 0)  # nothing covers these pixels: no target


def test_semantic_loss_weights_objects_above_the_table():
    targets = torch.zeros(1, 3, 4)
    targets[0, 2] = 1  # all table (last class) ...
    targets[0, :, 0] = torch.tensor([1.0, 0.0, 0.0])  # ... except one object pixel of class 0
    good = torch.zeros(1, 3, 2, 2)
    good[0, 2] = 5
    good[0, :, 0, 0] = torch.tensor([5.0, 0.0, 0.0])
    all_table = torch.zeros(1, 3, 2, 2)
    all_table[0, 2] = 5
    loss_good = perception_stage.semantic_loss(good, targets)
    loss_table = perception_stage.semantic_loss(all_table, targets)
    assert loss_good < 0.05
    # The one object pixel outweighs the three table pixels: calling it table costs most of the loss.
    assert loss_table > 2 * perception_stage.semantic_loss(all_table, targets, background_weight=1.0)


def test_prompts_decoded_beside_the_panoptic_queries_match_each_decoded_alone():
    """Stage 0's one joint pass (`decode_with_prompts`) must give what inference gets: the panoptic
    queries of each image on their own, and each prompt alone over its image's memory."""
    from omg_llava_ros import OmgLlava

    model = OmgLlava.from_pretrained()  # trained: the predicted masks restrict the attention
    dec = model.omg_decoder
    rng = np.random.default_rng(11)
    batch = data.perception_batch(rng, 3, 256, dec.config.class_names, prompts_per_image=2)
    batch.prompts = batch.prompts[1:]  # images with 1 and 2 prompts: unused slots in the joint pass
    with torch.no_grad():
        memory = dec.encode_memory(model.image_encoder(model_inputs.pixels_of(model, batch.images)))
        joint, prompt_masks = perception_stage.decode_with_prompts(model, memory, batch.prompts, class_per_layer=True)
        # Inference's layout: the panoptic queries alone, each prompt a batch row over its image's memory.
        alone, single = perception_stage.decode_with_prompts(
            model, memory, batch.prompts, joint=False, class_per_layer=True
        )
    assert len(joint.mask_logits) == len(alone.mask_logits) == len(prompt_masks) == len(single)
    for a, b in zip(joint.mask_logits + prompt_masks, alone.mask_logits + single, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(joint.class_logits_per_layer, alone.class_logits_per_layer, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # The prompts are decoded, not copied from the panoptic masks: each finds its own object.
    for k, p in enumerate(batch.prompts):
        found = prompt_masks[-1][k, 0] > 0
        gt = torch.as_tensor(p.mask[2::4, 2::4])
        assert (found & gt).sum() / (found | gt).sum() > 0.5


def test_a_stage0_step_with_joint_prompts_gives_the_gradients_of_separate_ones(perception_setup):
    cfg, model = perception_setup
    batch = data.perception_batch(np.random.default_rng(5), 2, 256, model.config.decoder.class_names, 2)
    params = perception_stage.perception_parameters(model)
    grads = []
    for joint in (True, False):
        for p in params:
            p.requires_grad_(True)
        stats = perception_stage.stage0_step(model, batch, cfg, joint_prompts=joint)
        grads.append((stats, [None if p.grad is None else p.grad.clone() for p in params]))
        for p in params:
            p.grad = None
            p.requires_grad_(False)
    (joint_stats, joint_grads), (separate_stats, separate_grads) = grads
    assert joint_stats["prompt"] > 0
    for key in ("loss", "set", "prompt"):
        assert joint_stats[key] == pytest.approx(separate_stats[key], rel=1e-4)
    assert sum(g is not None for g in joint_grads) > len(params) // 2
    for a, b in zip(joint_grads, separate_grads, strict=True):
        assert (a is None) == (b is None)  # parameters no loss reaches (the [SEG] decoder copy) stay so
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_stage0_steps_lower_the_loss_on_a_fixed_batch(perception_setup):
    cfg, model = perception_setup
    rng = np.random.default_rng(3)
    batch = data.perception_batch(rng, 2, 256, model.config.decoder.class_names, prompts_per_image=1)
    d = model.config.decoder
    semantic = perception_stage.SemanticHead(d.hidden_dim, d.num_classes)
    params = perception_stage.perception_parameters(model) + list(semantic.parameters())
    for p in params:
        p.requires_grad_(True)  # the model is built frozen; run_stage unfreezes what a stage trains
    opt = torch.optim.AdamW(params, lr=3e-4)
    model.train()
    losses = []
    for _ in range(6):
        stats = perception_stage.stage0_step(model, batch, cfg, semantic)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(stats)
    model.eval()
    assert set(losses[0]) == {"loss", "set", "prompt", "semantic"}
    assert losses[-1]["loss"] < 0.8 * losses[0]["loss"]
    assert losses[-1]["semantic"] < losses[0]["semantic"]


def test_stage0_resumes_from_its_checkpoint(tmp_path):
    cfg = config.TrainConfig(out_dir=str(tmp_path), stage0_steps=2, stage0_batch=1, stages=(0,), bf16=False, threads=1)
    trainer.train(cfg)
    done = json.loads((tmp_path / "stage0" / "DONE").read_text())
    assert done["steps"] == 2
    assert (tmp_path / "stage0" / "aux.safetensors").is_file()
    first = (tmp_path / "stage0" / "model.safetensors").read_bytes()
    # More steps on the same directory: picks up at step 2, does 1 more, keeps the old tokenizer.
    (tmp_path / "stage0" / "DONE").unlink()
    trainer.train(config.TrainConfig(**{**cfg.__dict__, "stage0_steps": 3}))
    assert json.loads((tmp_path / "stage0" / "progress.json").read_text())["step"] == 3
    assert (tmp_path / "stage0" / "model.safetensors").read_bytes() != first


def test_a_budgeted_run_fits_each_stage_to_its_share_of_the_minutes(tmp_path, monkeypatch):
    """`train --minutes`: a stage measures its pace and runs as many steps as its share allows; the
    count is kept for resumption, and a stage with no share is skipped. Time is simulated (2 s a step)."""
    now = [0.0]

    def step(model, batch, cfg, semantic=None):
        now[0] += 2.0
        return {"loss": 0.0}

    clock = SimpleNamespace(monotonic=lambda: now[0])
    monkeypatch.setattr(trainer, "time", clock)
    monkeypatch.setattr(schedule, "time", clock)
    monkeypatch.setattr(stages, "stage0_step", step)
    monkeypatch.setattr(data, "perception_batch", lambda *args: None)  # no scenes needed
    share = schedule.BUDGET_SHARES[0]
    cfg = config.TrainConfig(
        out_dir=str(tmp_path), stage0_batch=1, stages=(0, 3), bf16=False, threads=1, budget_minutes=80 / 60 / share
    )
    trainer.train(cfg)
    assert json.loads((tmp_path / "stage0" / "DONE").read_text())["steps"] == 40  # 80 s at 2 s a step
    assert json.loads((tmp_path / "stage0" / "progress.json").read_text())["total"] == 40
    assert not (tmp_path / "stage3").exists() and schedule.BUDGET_SHARES[3] == 0
    # A stage that speeds up after its first steps (3 s a step, then 1 s) refits its count as it
    # goes, and so uses its time rather than the first estimate's share of it.
    now[0], seconds = 0.0, iter([3.0] * 30 + [1.0] * 1000)

    def uneven(model, batch, cfg, semantic=None):
        now[0] += next(seconds)
        return {"loss": 0.0}

    monkeypatch.setattr(stages, "stage0_step", uneven)
    cfg = config.TrainConfig(
        **{**cfg.__dict__, "out_dir": str(tmp_path / "uneven"), "budget_minutes": 400 / 60 / share}
    )
    trainer.train(cfg)
    done = json.loads((tmp_path / "uneven" / "stage0" / "DONE").read_text())
    assert 0.9 * 400 <= done["minutes"] * 60 <= 400 and done["steps"] > 300  # one early fit: 133 steps
    # Never more than the configured steps, never fewer than already run.
    assert schedule.budgeted_steps(25, 50.0, 2.0, 100 / 60, most=30) == 30
    assert schedule.budgeted_steps(25, 60.0, 2.0, 0.5, most=1000) == 25
    assert schedule.stage_lr(cfg, 0, 399, total=400) == pytest.approx(0.05 * cfg.stage0_lr, rel=0.05)


def test_bf16_autocast_only_where_the_cpu_has_native_bf16_unless_told(monkeypatch):
    def enabled(cfg: config.TrainConfig) -> bool:
        with config.autocast(cfg):
            return torch.is_autocast_enabled("cpu")

    for native in (False, True):
        monkeypatch.setattr(config, "cpu_has_native_bf16", lambda native=native: native)
        assert enabled(config.TrainConfig()) is native  # default: decided by the CPU
        assert enabled(config.TrainConfig(bf16=True)) is True
        assert enabled(config.TrainConfig(bf16=False)) is False


def test_stage0_restarts_its_cosine_schedule_at_each_restart():
    cfg = config.TrainConfig(stage0_steps=1000, stage0_lr=3e-4, stage0_restarts=((800, 5e-5), (600, 1e-4)))
    first = [schedule.stage_lr(cfg, 0, s) for s in range(600)]
    second = [schedule.stage_lr(cfg, 0, s) for s in range(600, 800)]
    third = [schedule.stage_lr(cfg, 0, s) for s in range(800, 1000)]
    # Restarts are taken in step order whatever order they are given in, each from its own peak.
    assert max(first) == pytest.approx(3e-4, rel=0.02)
    assert max(second) == pytest.approx(1e-4, rel=0.05)
    assert max(third) == pytest.approx(5e-5, rel=0.05)
    # Each cycle warms up, then decays to 5% of its own peak by its end.
    for cycle, peak in ((first, 3e-4), (second, 1e-4), (third, 5e-5)):
        assert cycle[0] < max(cycle)
        assert cycle[-1] == pytest.approx(0.05 * peak, rel=0.1)
    assert all(a >= b for a, b in zip(second[50:-1], second[51:], strict=True))
    # Restarts at or past the end (e.g. a short `--stage0-steps`) are dropped; other stages have one cycle.
    short = config.TrainConfig(stage0_steps=300, stage0_restarts=((600, 1e-4),))
    assert schedule.stage_lr(short, 0, 299) == pytest.approx(schedule.cosine_lr(299, 300, short.stage0_lr))
    assert schedule.stage_lr(cfg, 2, 700) == pytest.approx(schedule.cosine_lr(700, cfg.stage2_steps, cfg.stage2_lr))
    none = config.TrainConfig(stage0_steps=500, stage0_restarts=())
    assert schedule.stage_lr(none, 0, 400) == pytest.approx(schedule.cosine_lr(400, 500, none.stage0_lr))


def test_conversations_share_scenes_and_each_scene_is_perceived_once():
    batch = data.conversation_batch(np.random.default_rng(3), 6, 64, per_scene=4)
    images, scene_of = data.scene_index(batch)
    assert scene_of == [0, 0, 0, 0, 1, 1]
    assert len(images) == 2
    for c, i in zip(batch, scene_of, strict=True):
        assert c.image is images[i]
        # Each conversation is about its own scene: its target masks are masks of that scene.
        for mask in c.sample.target_masks:
            assert any(np.array_equal(mask, o.mask) for o in c.rendered.objects)
    assert batch[0].rendered is batch[3].rendered and batch[3].rendered is not batch[4].rendered


def test_conversation_batch_follows_the_task_weights():
    rng = np.random.default_rng(4)
    only = data.conversation_batch(rng, 8, 64, weights={"existence": 1.0, "counting": 0.0})
    assert {c.sample.task for c in only} == {"existence"}
    # The stage-3 mix: counting and existence are most of the questions, every other task still comes.
    mix = config.TrainConfig().stage3_task_weights
    assert set(mix) == set(data.TASK_WEIGHTS)
    assert (mix["counting"] + mix["existence"]) / sum(mix.values()) > 0.5
    assert min(mix.values()) > 0


def test_training_existence_questions_are_balanced_correct_and_often_confusable():
    rng = np.random.default_rng(5)
    batch = data.conversation_batch(rng, 300, 64, weights={"existence": 1.0})
    answers, confusable = [], 0
    for c in batch:
        _, _, _, color, shape = c.sample.question.rstrip("?").split()
        on_table = any((o.color, o.shape) == (color, shape) for o in c.rendered.objects)
        # The answer is the world's: yes exactly when such an object is on the table.
        assert c.sample.answer == ("yes." if on_table else "no.")
        answers.append(on_table)
        confusable += (color, shape) in data.confusable_pairs(c.rendered)
    assert 0.4 < np.mean(answers) < 0.6
    # Uniformly drawn absent pairs are rarely confusable; about half of the negatives here are.
    assert confusable > 0.15 * len(batch)


def test_confusable_pairs_mix_colours_and_shapes_of_different_objects():
    batch = data.conversation_batch(np.random.default_rng(6), 40, 64, weights={"existence": 1.0})
    for c in batch:
        present = {(o.color, o.shape) for o in c.rendered.objects}
        for color, shape in data.confusable_pairs(c.rendered):
            assert (color, shape) not in present
            assert any(o.color == color for o in c.rendered.objects)
            assert any(o.shape == shape for o in c.rendered.objects)


def test_stage4_existence_negatives_are_mostly_colour_only_or_confusable():
    """Stage 4's "no" questions: about 40% a colour on the table with a shape that is not, 40%
    confusable, the rest uniform; the answers stay the world's."""
    negatives = config.TrainConfig().stage4_existence
    rng = np.random.default_rng(7)
    batch = data.conversation_batch(rng, 400, 64, weights={"existence": 1.0}, negatives=negatives)
    kinds = {"colour_only": 0, "confusable": 0, "other": 0}
    for c in batch:
        _, _, _, color, shape = c.sample.question.rstrip("?").split()
        colors = {o.color for o in c.rendered.objects}
        shapes = {o.shape for o in c.rendered.objects}
        if c.sample.answer == "yes.":
            assert (color, shape) in {(o.color, o.shape) for o in c.rendered.objects}
            continue
        assert (color, shape) not in {(o.color, o.shape) for o in c.rendered.objects}
        if (color, shape) in data.colour_only_pairs(c.rendered):
            assert color in colors and shape not in shapes
            kinds["colour_only"] += 1
        elif (color, shape) in data.confusable_pairs(c.rendered):
            kinds["confusable"] += 1
        else:
            kinds["other"] += 1
    no = sum(kinds.values())
    assert 0.4 < no / len(batch) < 0.6
    assert kinds["colour_only"] > 0.3 * no and kinds["confusable"] > 0.25 * no
    # The default (stages 2-3) never asks for colour-only pairs on purpose: far fewer come uniformly.
    default = data.conversation_batch(np.random.default_rng(7), 400, 64, weights={"existence": 1.0})
    colour_only = sum(
        c.sample.answer == "no."
        and tuple(c.sample.question.rstrip("?").split()[3:]) in data.colour_only_pairs(c.rendered)
        for c in default
    )
    assert colour_only < kinds["colour_only"] / 2


def test_with_duplicate_makes_two_objects_alike_and_keeps_the_layout():
    from omg_llava_ros.toyworld import sample_scene

    rng = np.random.default_rng(11)
    for _ in range(20):
        scene = sample_scene(rng, num_objects=int(rng.integers(2, 6)))
        dup = data.with_duplicate(rng, scene)
        names = [(o.color, o.shape) for o in dup.objects]
        assert len(set(names)) < len(names)
        changed = [i for i, (a, b) in enumerate(zip(scene.objects, dup.objects, strict=True)) if a != b]
        assert len(changed) <= 1
        for a, b in zip(scene.objects, dup.objects, strict=True):
            assert (a.center, a.radius, a.size) == (b.center, b.radius, b.size)
        i = changed[0] if changed else None
        if i is not None and dup.objects[i].shape == "circle":
            assert dup.objects[i].rotation == 0.0


def test_positional_referring_names_its_target_uniquely_by_position():
    from omg_llava_ros.toyworld.referring import EXTREMES, all_unique_expressions, shortest_expression

    rng = np.random.default_rng(12)
    as_evaluated = 0
    for _ in range(60):
        rendered = data.random_scene(rng, 64, duplicate=True)
        s = data.sample_training_conversation(rng, rendered, "referring_position")
        assert s.task == "referring_segmentation"
        (t,) = s.object_ids
        assert np.array_equal(s.target_masks[0], rendered.objects[t].mask)
        ref = s.answer.removeprefix("<p> ").removesuffix(" </p> [SEG].")
        assert ref in s.question and ref in all_unique_expressions(rendered, t)
        if any(f" {e} " in f" {ref} " for e in EXTREMES):
            as_evaluated += ref == shortest_expression(rendered, t)
        else:  # no object of the scene has a positional name
            assert not any(
                any(e in x for e in EXTREMES)
                for k in range(len(rendered.objects))
                for x in all_unique_expressions(rendered, k)
            )
    assert as_evaluated >= 5  # some are the expressions evaluation asks (no shorter name)


def test_spatial_referring_draws_forms_4_to_6_evenly_and_names_the_anchor():
    from collections import Counter

    from omg_llava_ros.toyworld.referring import enumerate_expressions

    rng = np.random.default_rng(5)
    forms: Counter[int] = Counter()
    for _ in range(150):
        rendered = data.random_scene(rng, 64)
        s = data.sample_training_conversation(rng, rendered, "referring_spatial")
        (t,) = s.object_ids
        assert s.task == "referring_segmentation" and np.array_equal(s.target_masks[0], rendered.objects[t].mask)
        ref = s.answer.removeprefix("<p> ").removesuffix(" </p> [SEG].")
        named = {e.text: e for e in enumerate_expressions(rendered, t)}
        if not any(
            e.form in data.SPATIAL_FORMS
            for k in range(len(rendered.objects))
            for e in enumerate_expressions(rendered, k)
        ):
            continue  # toyworld's own sampler: nothing spatial to ask here
        e = named[ref]  # unique in the scene, and of a spatial form
        forms[e.form] += 1
        assert e.form in data.SPATIAL_FORMS and ref in s.question
        (anchor,) = s.anchor_masks
        if e.form == 5:  # the anchor's mask, by the expression's own anchor
            assert np.array_equal(anchor, rendered.objects[e.anchor].mask)
            assert ref.endswith(f"the {rendered.objects[e.anchor].color} {rendered.objects[e.anchor].shape}")
        else:
            assert anchor is None
    # The form comes first: each spatial form gets a fair share, though form 5 has the most expressions.
    assert set(forms) == set(data.SPATIAL_FORMS) and min(forms.values()) >= 0.2 * sum(forms.values())


def test_conversation_batch_duplicate_share_sets_how_many_scenes_have_two_alike():
    def alike(batch):
        scenes = {id(c.rendered): c.rendered for c in batch}.values()
        names = [[(o.color, o.shape) for o in r.objects] for r in scenes]
        return [len(set(n)) < len(n) for n in names if len(n) > 1]

    every = alike(data.conversation_batch(np.random.default_rng(13), 64, 64, per_scene=2, duplicate_share=1.0))
    assert all(every)
    natural = alike(data.conversation_batch(np.random.default_rng(13), 64, 64, per_scene=2))
    assert sum(natural) < len(natural) / 2


def test_evaluation_scenes_of_objects_alike_name_one_of_a_pair():
    from omg_llava_ros.toyworld.referring import shortest_expression
    from omg_llava_ros.training.evaluate import _alike_target

    rng = np.random.default_rng(14)
    for _ in range(20):
        rendered, t, twins = _alike_target(rng, 64)
        assert twins and t not in twins
        target = rendered.objects[t]
        for k in twins:
            assert (rendered.objects[k].color, rendered.objects[k].shape) == (target.color, target.shape)
        ref = shortest_expression(rendered, t)
        # Colour and shape never name one of two alike: the expression must use size or position.
        assert ref is not None and ref != f"the {target.color} {target.shape}"


def test_answer_loss_weighs_each_answer_equally():
    """A one-token answer counts as much as a long one with "sample", by its token count with "token"."""
    vocab = 5
    logits = torch.zeros(2, 6, vocab)
    labels = torch.full((2, 6), -100)
    labels[0, 1] = 2  # short answer, predicted badly (uniform logits)
    labels[1, :5] = 3  # long answer, predicted well
    logits[1, :5, 3] = 20.0
    short = torch.log(torch.tensor(float(vocab)))
    sample = instruction_losses.answer_loss(logits, labels, "sample")
    token = instruction_losses.answer_loss(logits, labels, "token")
    assert torch.isclose(sample, short / 2, atol=1e-4)
    assert torch.isclose(token, short / 6, atol=1e-4)
    # A row without answer tokens (all -100) is left out of the mean, not counted as zero.
    padded = torch.cat([labels, torch.full((1, 6), -100)])
    assert torch.isclose(instruction_losses.answer_loss(torch.cat([logits, torch.zeros(1, 6, vocab)]), padded), sample)
    with pytest.raises(ValueError, match="text_loss"):
        instruction_losses.answer_loss(logits, labels, "mean")


def test_answer_loss_with_several_answers_per_row_matches_one_answer_per_row():
    """Turns packed into one row (numbered by `groups`) weigh as they would in rows of their own."""
    vocab = 7
    torch.manual_seed(0)
    logits = torch.randn(1, 8, vocab)
    labels = torch.full((1, 8), -100)
    groups = torch.full((1, 8), -1)
    labels[0, 1], groups[0, 1] = 3, 0  # a one-token answer
    labels[0, 4:8], groups[0, 4:8] = torch.tensor([1, 2, 5, 6]), 1  # a four-token answer
    packed = instruction_losses.answer_loss(logits, labels, "sample", groups)
    split_labels = torch.full((2, 8), -100)
    split_labels[0, 1] = 3
    split_labels[1, 4:8] = torch.tensor([1, 2, 5, 6])
    split = instruction_losses.answer_loss(logits.expand(2, -1, -1), split_labels, "sample")
    assert torch.isclose(packed, split, atol=1e-5)
    # Without groups the row is one answer: the long answer's tokens then outweigh the short one.
    assert not torch.isclose(instruction_losses.answer_loss(logits, labels, "sample"), packed)


def _mixed_scene(model, tasks=("referring_segmentation", "region_caption", "grounded_caption", "counting")):
    """One scene and a question of each task about it, perceived."""
    from omg_llava_ros.toyworld import sample_conversation

    rng = np.random.default_rng(11)
    rendered = data.random_scene(rng, 256)
    while len(rendered.objects) < 3:
        rendered = data.random_scene(rng, 256)
    samples = [sample_conversation(rng, rendered, task, ref_mode="any") for task in tasks]
    return samples, sequences.perceive_batch(model, [rendered.image])


def test_questions_about_a_scene_share_the_image_and_see_nothing_of_each_other(perception_setup):
    _, model = perception_setup
    samples, vb = _mixed_scene(model)
    tok, tokens = model.tokenizer, model.tokens
    with torch.no_grad():
        packed = sequences.build_sequence(model, vb, 0, samples)
        alone = [sequences.build_sequence(model, vb, 0, s) for s in samples]
        hidden, labels, groups = sequences.run_llm(model, [packed, *alone])
    n_prefix = int((packed.segments == -1).sum())
    assert packed.embeds.shape[0] == n_prefix + sum(a.embeds.shape[0] - n_prefix for a in alone)
    # Each question's hidden states, labels and [SEG] positions are those of its sequence alone
    # (a shorter row of the same padded batch): the packing changes the cost, not the loss.
    for k, single in enumerate(alone):
        where = torch.nonzero(packed.segments == k).flatten()
        n = single.embeds.shape[0]
        assert torch.equal(packed.positions[where], torch.arange(n_prefix, n))
        assert torch.allclose(hidden[0, where], hidden[1 + k, n_prefix:n], atol=1e-4)
        assert torch.equal(labels[0, where - 1], single.labels[n_prefix - 1 : n - 1])
        expected = tok.encode(samples[k].answer, add_special_tokens=False) + [tokens.im_end]
        assert packed.labels[packed.answer_index == k].tolist() == expected
        offset = int(where[0]) - n_prefix
        assert [p for p, a in zip(packed.seg_positions, packed.seg_answer, strict=True) if a == k] == [
            p + offset for p in single.seg_positions
        ]
    assert torch.allclose(hidden[0, :n_prefix], hidden[1, :n_prefix], atol=1e-4)
    assert set(packed.answer_index[packed.labels == -100].tolist()) == {-1}
    assert len(packed.seg_positions) == len(packed.target_masks) == sum(len(s.target_masks) for s in samples) > 1
    for p, k in zip(packed.seg_positions, packed.seg_answer, strict=True):
        assert packed.labels[p - 1] == tokens.seg and packed.answer_index[p - 1] == k
    # The per-answer loss of the packed row equals that of the separate rows.
    logits = model.llm.get_output_embeddings()(hidden).float()
    assert torch.isclose(
        instruction_losses.answer_loss(logits[:1], labels[:1], "sample", groups[:1]),
        instruction_losses.answer_loss(logits[1:], labels[1:], "sample", groups[1:]),
        atol=1e-4,
    )


def test_pack_turns_keeps_order_and_the_text_budget(perception_setup):
    _, model = perception_setup
    samples, _ = _mixed_scene(model, ("caption", "grounded_caption", "counting", "existence", "caption", "attribute"))
    keys = list(range(len(samples)))
    sizes = [len(model.tokenizer.encode(s.question + s.answer)) for s in samples]
    groups = sequences.pack_turns(model, samples, keys, budget=3 * max(sizes) + 20)
    assert [k for g in groups for k in g] == keys
    assert 1 < len(groups) < len(samples)
    assert sequences.pack_turns(model, samples, keys, budget=10_000) == [keys]
    assert sequences.pack_turns(model, samples, keys, budget=1) == [[k] for k in keys]


def test_stage2_step_trains_the_llm_side_on_packed_conversations(perception_setup):
    cfg, model = perception_setup
    cfg = dataclasses.replace(cfg, stage2_batch=6, conversations_per_scene=3, max_text_tokens=120)
    model.requires_grad_(False)  # as run_stage does: the perception module stays frozen
    params = instruction_stage.llm_side_parameters(model, with_llm=True)
    for p in params:
        p.requires_grad_(True)
    try:
        mix = {"referring_segmentation": 1.0, "caption": 1.0}
        stats = instruction_stage.stage2_step(model, np.random.default_rng(2), cfg, mix)
        assert set(stats) == {"loss", "ce", "seg", "follow", "align", "location", "anchor"}
        assert stats["align"] == 0 and stats["location"] >= 0
        assert all(np.isfinite(v) for v in stats.values()) and stats["ce"] > 0 and stats["seg"] > 0
        assert model.llm.get_input_embeddings().weight.grad is not None
        assert all(p.grad is None for p in model.omg_decoder.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)


def test_stage2_step_with_word_alignment_trains_the_object_tokens(perception_setup, monkeypatch):
    cfg, model = perception_setup
    # The test model's perception is untrained and covers no object: label every token "circle, red".
    monkeypatch.setattr(
        instruction_losses, "object_attribute_labels", lambda masks, _: (torch.zeros(len(masks), dtype=torch.long),) * 2
    )
    cfg = dataclasses.replace(cfg, stage2_batch=4, conversations_per_scene=2, max_text_tokens=120)
    model.requires_grad_(False)
    for p in instruction_stage.llm_side_parameters(model, with_llm=True):
        p.requires_grad_(True)
    try:
        stats = instruction_stage.stage2_step(model, np.random.default_rng(2), cfg, {"counting": 1.0}, align_weight=0.5)
        assert stats["align"] > 0
        assert np.isclose(stats["loss"], stats["ce"] + stats["seg"] + 0.5 * stats["follow"] + 0.5 * stats["align"])
        # The loss reaches the object projector and the first LLM layer, not the frozen decoder.
        assert any(p.grad is not None for p in model.visual_projector.parameters())
        assert model.llm.base_model.layers[0].self_attn.q_proj.weight.grad is not None
        assert all(p.grad is None for p in model.omg_decoder.parameters())
        # With a learned head (align_target "head") the head trains too.
        model.zero_grad(set_to_none=True)
        head = instruction_losses.AttributeHead(model.config.language_model.hidden_size)
        stats = instruction_stage.stage2_step(model, np.random.default_rng(2), cfg, {"counting": 1.0}, None, 0.5, head)
        assert stats["align"] > 0 and head.shape.weight.grad is not None and head.colour.weight.grad is not None
        assert any(p.grad is not None for p in model.visual_projector.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)


def test_stage2_step_with_object_location_trains_the_location_gate(perception_setup):
    from omg_llava_ros.model.object_location import ObjectLocation

    cfg, model = perception_setup
    # The embedded preset locates objects; training starts its gate where v17's started.
    assert model.object_location is not None
    gate = model.object_location.gate
    assert torch.allclose(gate, torch.full_like(gate, cfg.location_gate_init))
    cfg = dataclasses.replace(cfg, stage2_batch=4, conversations_per_scene=2, max_text_tokens=120, location_weight=2.0)
    built = model.object_location  # the embedded preset has one; this test starts a fresh one at zero
    model.object_location = ObjectLocation(model.config.decoder.hidden_dim, model.config.language_model.hidden_size)
    model.requires_grad_(False)
    for p in instruction_stage.llm_side_parameters(model, with_llm=True):
        p.requires_grad_(True)
    try:
        stats = instruction_stage.stage2_step(model, np.random.default_rng(3), cfg, {"referring_segmentation": 1.0})
        assert stats["location"] >= 0 and np.isfinite(stats["loss"])
        assert np.isclose(stats["loss"], stats["ce"] + stats["seg"] + 0.5 * stats["follow"] + 2.0 * stats["location"])
        assert stats["anchor"] == 0  # this head has no relations
        # The gate starts at zero yet gets a gradient (through the object tokens the answers read).
        assert model.object_location.gate.grad is not None and model.object_location.gate.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.omg_decoder.parameters())
    finally:
        model.object_location = built
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)


def test_a_fine_tune_from_the_shipped_model_trains_the_relations_and_the_anchor(tmp_path):
    # A fine-tune from the shipped model: its pointer has relations, and they train with the anchor.
    cfg = config.TrainConfig(
        out_dir=str(tmp_path), init_from="embedded", stage2_batch=8, conversations_per_scene=4, location_weight=1.5
    )
    model = checkpoints.build_model(cfg, tmp_path)
    head = model.object_location
    assert head.relations and (tmp_path / "tokenizer").is_dir()
    model.requires_grad_(False)
    for p in instruction_stage.llm_side_parameters(model, with_llm=True):
        p.requires_grad_(True)
    stats = instruction_stage.stage2_step(model, np.random.default_rng(1), cfg, {"referring_spatial": 1.0})
    expected = stats["ce"] + stats["seg"] + 0.5 * stats["follow"] + 1.5 * (stats["location"] + 0.5 * stats["anchor"])
    assert np.isclose(stats["loss"], expected, rtol=1e-4)
    assert head.relation.weight.grad is not None and head.relation.weight.grad.abs().sum() > 0
    # Two scenes of four questions: a relation ("the star left of the red circle") among them.
    assert stats["anchor"] > 0 and head.anchor_query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.omg_decoder.parameters())


def test_object_positions_are_where_the_object_tokens_sit():
    from omg_llava_ros import OmgLlava

    model = OmgLlava.from_pretrained()  # trained perception: the scene's objects become object tokens
    samples, vb = _mixed_scene(model)
    with torch.no_grad():
        seq = sequences.build_sequence(model, vb, 0, samples)
        objects = model.visual_projector.object_tokens(model.object_queries(vb.prior, 0))
    assert len(seq.object_positions) == len(objects) > 0
    assert torch.allclose(seq.embeds[seq.object_positions], objects, atol=1e-5)
    # The shipped model locates objects: its object tokens carry where each object is.
    unlocated = model.visual_projector.object_tokens(vb.prior.object_tokens[0])
    assert not torch.allclose(objects, unlocated, atol=1e-3)


def test_object_attribute_labels_follow_the_token_masks():
    from omg_llava_ros.toyworld import COLORS, SHAPES

    rng = np.random.default_rng(21)
    rendered = data.random_scene(rng, 256)
    while len(rendered.objects) < 3:
        rendered = data.random_scene(rng, 256)
    gt = losses.resize_masks(np.stack([o.mask for o in rendered.objects]), (64, 64)) >= 0.5
    order = [2, 0, 1]
    logits = torch.where(gt[order], 5.0, -5.0)
    logits = torch.cat([logits, torch.full((1, 64, 64), -5.0)])  # a token on nothing
    shapes, colours = instruction_losses.object_attribute_labels(logits, rendered)
    objects = [rendered.objects[k] for k in order]
    assert shapes.tolist() == [SHAPES.index(o.shape) for o in objects] + [-100]
    assert colours.tolist() == [list(COLORS).index(o.color) for o in objects] + [-100]


def test_word_alignment_loss_is_lowest_at_the_named_words(perception_setup):
    _, model = perception_setup
    words = ["circle", "square", "triangle", "star", "cross"]
    ids = torch.tensor([model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words])
    states = model.llm.get_input_embeddings().weight[ids].detach()
    right = torch.arange(5)
    assert instruction_losses.word_alignment_loss(model, states, right, words) < instruction_losses.word_alignment_loss(
        model, states, right.roll(1), words
    )
    # Tokens on nothing (-100) are ignored; with none left the loss is zero, not NaN.
    ignored = torch.tensor([0, -100, -100, -100, -100])
    assert torch.isclose(
        instruction_losses.word_alignment_loss(model, states, ignored, words),
        instruction_losses.word_alignment_loss(model, states[:1], right[:1], words),
    )
    assert float(instruction_losses.word_alignment_loss(model, states, torch.full((5,), -100), words)) == 0.0
    with pytest.raises(ValueError, match="one token"):
        instruction_losses.word_alignment_loss(
            model, states, right, ["circle", "square", "triangle", "star", "red circle"]
        )


def test_questions_are_planned_per_scene_within_the_text_budget(perception_setup):
    _, model = perception_setup
    batch = data.conversation_batch(np.random.default_rng(6), 24, 64, per_scene=8)
    _, scene_of = data.scene_index(batch)
    chunks = sequences.plan_conversations(model, batch, scene_of, config.TrainConfig(max_text_tokens=10_000))
    assert [rows for _, rows in chunks] == [list(range(8)), list(range(8, 16)), list(range(16, 24))]
    assert [scene for scene, _ in chunks] == [0, 1, 2]
    split = sequences.plan_conversations(model, batch, scene_of, config.TrainConfig(max_text_tokens=60))
    assert len(split) > 3
    assert sorted(i for _, rows in split for i in rows) == list(range(24))
    for scene, rows in split:
        assert {scene_of[i] for i in rows} == {scene}


def test_seg_loss_decodes_each_seg_alone_whatever_the_grouping(perception_setup):
    """[SEG]s are decoded per image as one batch over that image's memory; each must come out as if
    it were decoded alone over its own copy of the memory (the training mask loss of inference)."""
    from types import SimpleNamespace

    from omg_llava_ros.training.losses import mask_loss, resize_masks

    _, model = perception_setup
    rng = np.random.default_rng(5)
    scenes = [data.random_scene(rng, 256) for _ in range(3)]
    memory = sequences.encode_batch(model, [r.image for r in scenes])
    hidden = torch.randn(3, 6, model.config.language_model.hidden_size, requires_grad=True)
    # The rows' [SEG]s lie on images 2, 0, 0 and 0: the loss takes them in row order, the decoder
    # groups them by image.
    masks = [r.objects[0].mask for r in scenes] + [scenes[0].objects[-1].mask]
    seqs = [
        SimpleNamespace(seg_positions=[1], target_masks=[masks[2]], image_index=2),
        SimpleNamespace(seg_positions=[2, 4], target_masks=[masks[0], masks[3]], image_index=0),
        SimpleNamespace(seg_positions=[5], target_masks=[masks[3]], image_index=0),
    ]
    loss, (q, pos) = instruction_losses.seg_loss(model, memory, seqs, hidden)
    (grad,) = torch.autograd.grad(loss, hidden, retain_graph=True)

    size = tuple(memory.mask_features.shape[-2:])
    alone = []
    pairs = [(s.image_index, m) for s in seqs for m in s.target_masks]  # the order of q and pos
    for j, (image, mask) in enumerate(pairs):
        mem = model_inputs.select_memory(memory, torch.tensor([image]))
        out = model.omg_decoder.decode(q[j : j + 1, None], pos[j : j + 1, None], mem)
        gt = resize_masks(mask[None], size).flatten(1)
        alone.append(mask_loss(out.mask_logits, gt) / len(out.mask_logits))
    reference = torch.stack(alone).mean()
    assert torch.isclose(loss, reference, atol=1e-5)
    (ref_grad,) = torch.autograd.grad(reference, hidden)
    assert torch.allclose(grad, ref_grad, atol=1e-6) and grad.abs().sum() > 0


def test_a_step_with_a_non_finite_gradient_is_skipped(tmp_path, monkeypatch):
    cfg = config.TrainConfig(out_dir=str(tmp_path), stage1_steps=2, bf16=False, threads=1)
    model = checkpoints.build_model(cfg, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def poisoned_step(model, rng, cfg):
        for p in instruction_stage.llm_side_parameters(model, with_llm=False):
            p.grad = torch.full_like(p, float("nan"))
        return {"loss": float("nan")}

    monkeypatch.setattr(stages, "stage1_step", poisoned_step)
    trainer.run_stage(model, cfg, tmp_path, 1, None)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # no NaN reached the weights
    assert json.loads((tmp_path / "stage1" / "DONE").read_text())["steps"] == 2
