"""The split of `OmgLlava` (the nn.Module, which computes) and `OmgLlavaPredictor` (which holds the
image cache and runs chat, follow and perceive): same answers either way, nothing of the predictor in
the module's weights, one cache per predictor."""

import numpy as np
import pytest
import torch
from helpers import force_answer

from omg_llava_ros import OmgLlava, OmgLlavaPredictor, Prompt


@pytest.fixture
def image(rng):
    return rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)


def test_a_predictor_of_its_own_answers_as_the_model_does(tiny_model, image, rng):
    predictor = OmgLlavaPredictor(tiny_model)
    assert predictor is not tiny_model.predictor
    force = force_answer(tiny_model.tokenizer, "<p> the star </p> [SEG] and <p> the cup </p> [SEG].")
    a = tiny_model.chat(image, "Please segment the star.", logits_processor=force)
    b = predictor.chat(image, "Please segment the star.", logits_processor=force)
    assert a.text == b.text
    assert [s.phrase for s in a.segments] == [s.phrase for s in b.segments] == ["the star", "the cup"]
    for x, y in zip(a.segments, b.segments, strict=True):
        assert np.array_equal(x.mask, y.mask) and x.score == y.score and torch.equal(x.query, y.query)
    box = [Prompt.box(10, 20, 80, 70)]
    free = [p.chat(image, "What is <region>?", prompts=box, max_new_tokens=6).text for p in (tiny_model, predictor)]
    assert free[0] == free[1]
    other = rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)
    followed = [p.follow(other, a.segments) for p in (tiny_model, predictor)]
    assert [np.array_equal(x.mask, y.mask) for x, y in zip(*followed, strict=True)] == [True, True]
    panoptic = [p.perceive(image) for p in (tiny_model, predictor)]
    assert [(s.label, s.mask.tobytes()) for s in panoptic[0]] == [(s.label, s.mask.tobytes()) for s in panoptic[1]]


def test_the_predictor_is_no_part_of_the_module(tmp_path, image):
    model = OmgLlava.from_config("tiny", seed=0)
    keys, children = list(model.state_dict()), [n for n, _ in model.named_modules()]
    model.chat(image, "Describe the image.", max_new_tokens=2)  # makes the predictor and fills its cache
    assert isinstance(model.predictor, OmgLlavaPredictor) and model.predictor.model is model
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == children
    assert not any("predictor" in k for k in keys) and "_predictor" not in model._modules
    model.save_pretrained(tmp_path / "model")
    loaded = OmgLlava.from_pretrained(tmp_path / "model")
    assert loaded.predictor is not model.predictor and loaded.predictor.model is loaded


def test_set_image_caches_the_last_image_and_the_model_shares_its_predictor_cache(tiny_model, image):
    predictor = OmgLlavaPredictor(tiny_model)
    first = predictor.set_image(image)
    assert predictor.set_image(image.copy()) is first  # the same pixels: the same state
    assert predictor.set_image(image[::-1].copy()) is not first
    predictor.reset_image()
    assert predictor.set_image(image) is not first
    # The model's conveniences go through one predictor: set_image then chat reuse one state.
    state = tiny_model.set_image(image)
    assert tiny_model.predictor.set_image(image) is state
    calls = []
    handle = tiny_model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        tiny_model.chat(image, "Describe the image.", max_new_tokens=2)
        tiny_model.perceive(image)
    finally:
        handle.remove()
    assert calls == [] and tiny_model.set_image(image) is state
    # Follow mode caches only the encoder work; perception is added when a later call needs it.
    fresh = OmgLlavaPredictor(tiny_model)
    light = fresh.set_image(image, perception=False)
    assert light.perception is None and light.visual_tokens is None
    assert fresh.set_image(image) is light and light.visual_tokens is not None
