"""The training losses and the stage-0 loop: matching, set loss, the dense auxiliary loss, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omg_llava_ros.training import data, trainer
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
    out = trainer.semantic_targets(targets, num_classes=3)
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
    loss_good = trainer.semantic_loss(good, targets)
    loss_table = trainer.semantic_loss(all_table, targets)
    assert loss_good < 0.05
    # The one object pixel outweighs the three table pixels: calling it table costs most of the loss.
    assert loss_table > 2 * trainer.semantic_loss(all_table, targets, background_weight=1.0)


@pytest.fixture(scope="module")
def perception_setup(tmp_path_factory):
    cfg = trainer.TrainConfig(out_dir=str(tmp_path_factory.mktemp("train")), bf16=False)
    torch.manual_seed(0)
    model = trainer.build_model(cfg, trainer.Path(cfg.out_dir))
    return cfg, model


def test_stage0_steps_lower_the_loss_on_a_fixed_batch(perception_setup):
    cfg, model = perception_setup
    rng = np.random.default_rng(3)
    batch = data.perception_batch(rng, 2, 256, model.config.decoder.class_names, prompts_per_image=1)
    d = model.config.decoder
    semantic = trainer.SemanticHead(d.hidden_dim, d.num_classes)
    params = trainer.perception_parameters(model) + list(semantic.parameters())
    for p in params:
        p.requires_grad_(True)  # the model is built frozen; run_stage unfreezes what a stage trains
    opt = torch.optim.AdamW(params, lr=3e-4)
    model.train()
    losses = []
    for _ in range(6):
        stats = trainer.stage0_step(model, batch, cfg, semantic)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(stats)
    model.eval()
    assert set(losses[0]) == {"loss", "set", "prompt", "semantic"}
    assert losses[-1]["loss"] < 0.8 * losses[0]["loss"]
    assert losses[-1]["semantic"] < losses[0]["semantic"]


def test_stage0_resumes_from_its_checkpoint(tmp_path):
    cfg = trainer.TrainConfig(out_dir=str(tmp_path), stage0_steps=2, stage0_batch=1, stages=(0,), bf16=False, threads=1)
    trainer.train(cfg)
    done = json.loads((tmp_path / "stage0" / "DONE").read_text())
    assert done["steps"] == 2
    assert (tmp_path / "stage0" / "aux.safetensors").is_file()
    first = (tmp_path / "stage0" / "model.safetensors").read_bytes()
    # More steps on the same directory: picks up at step 2, does 1 more, keeps the old tokenizer.
    (tmp_path / "stage0" / "DONE").unlink()
    trainer.train(trainer.TrainConfig(**{**cfg.__dict__, "stage0_steps": 3}))
    assert json.loads((tmp_path / "stage0" / "progress.json").read_text())["step"] == 3
    assert (tmp_path / "stage0" / "model.safetensors").read_bytes() != first


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
    mix = trainer.TrainConfig().stage3_task_weights
    assert set(mix) == set(data.TASK_WEIGHTS)
    assert (mix["counting"] + mix["existence"]) / sum(mix.values()) > 0.5
    assert min(mix.values()) > 0


def test_answer_loss_weighs_each_answer_equally():
    """A one-token answer counts as much as a long one with "sample", by its token count with "token"."""
    vocab = 5
    logits = torch.zeros(2, 6, vocab)
    labels = torch.full((2, 6), -100)
    labels[0, 1] = 2  # short answer, predicted badly (uniform logits)
    labels[1, :5] = 3  # long answer, predicted well
    logits[1, :5, 3] = 20.0
    short = torch.log(torch.tensor(float(vocab)))
    sample = trainer.answer_loss(logits, labels, "sample")
    token = trainer.answer_loss(logits, labels, "token")
    assert torch.isclose(sample, short / 2, atol=1e-4)
    assert torch.isclose(token, short / 6, atol=1e-4)
    # A row without answer tokens (all -100) is left out of the mean, not counted as zero.
    padded = torch.cat([labels, torch.full((1, 6), -100)])
    assert torch.isclose(trainer.answer_loss(torch.cat([logits, torch.zeros(1, 6, vocab)]), padded), sample)
    with pytest.raises(ValueError, match="text_loss"):
        trainer.answer_loss(logits, labels, "mean")
