"""End to end on a small random-weight config: chat, follow and perceive, prompts, caching, saving."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import force_answer

from omg_llava_ros import OmgLlava, Prompt


@pytest.fixture(params=[(120, 200), (200, 90)], ids=["wide", "tall"])
def image(request, rng):
    h, w = request.param
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_chat_with_forced_seg_returns_masks_at_input_size(tiny_model, image):
    answer = "<p> the red circle </p> [SEG] and <p> the star </p> [SEG]."
    res = tiny_model.chat(
        image, "Please segment the red circle.", logits_processor=force_answer(tiny_model.tokenizer, answer)
    )
    assert res.text == answer
    assert res.clean_text == "the red circle and the star."
    assert [s.phrase for s in res.segments] == ["the red circle", "the star"]
    for s in res.segments:
        assert s.mask.dtype == bool and s.mask.shape == image.shape[:2]
        assert 0.0 <= s.score <= 1.0
        assert s.query is not None and s.query.shape == (2, tiny_model.config.decoder.hidden_dim)


@pytest.mark.parametrize(
    "prompt",
    [Prompt.point(30, 40), Prompt.box(10, 20, 80, 70), "mask"],
    ids=["point", "box", "mask"],
)
def test_chat_with_each_visual_prompt(tiny_model, image, prompt):
    if prompt == "mask":
        m = np.zeros(image.shape[:2], bool)
        m[20:60, 15:50] = True
        prompt = Prompt.mask(m)
    res = tiny_model.chat(image, "What is <region>?", prompts=[prompt], max_new_tokens=6)
    assert isinstance(res.text, str)
    assert len(res.history.turns) == 1 and res.history.turns[0].prompts == [prompt]


def test_visual_prompts_change_the_region_embedding(tiny_model, image):
    state = tiny_model.set_image(image)
    emb = tiny_model.prompt_embeddings([Prompt.point(30, 40), Prompt.point(80, 60), Prompt.box(0, 0, 60, 60)], state)
    assert emb.shape == (3, tiny_model.config.language_model.hidden_size)
    assert not torch.allclose(emb[0], emb[1]) and not torch.allclose(emb[0], emb[2])


def test_region_and_mark_tokens_are_replaced_by_prompt_embeddings(tiny_model, image):
    m = tiny_model
    state = m.set_image(image)
    ids = torch.tensor(m.tokenizer.encode("a <region> b <mark>", add_special_tokens=False))
    prompts = torch.randn(2, m.config.language_model.hidden_size)
    x = m.embed_ids(ids, state, prompts)
    where = [int(i) for i in torch.nonzero((ids == m.tokens.region) | (ids == m.tokens.mark)).flatten()]
    assert torch.equal(x[where[0]], prompts[0]) and torch.equal(x[where[1]], prompts[1])


def test_image_placeholder_expands_to_pixel_separator_object_tokens(tiny_model, image):
    m = tiny_model
    state = m.set_image(image)
    n_obj = len(state.prior.object_indices[0])
    assert state.visual_tokens.shape[0] == m.config.num_pixel_tokens + 1 + n_obj
    assert torch.equal(state.visual_tokens[m.config.num_pixel_tokens], m.visual_projector.seperate_embed.weight[0])
    ids = torch.tensor([5, -200, 6])
    x = m.embed_ids(ids, state, None)
    assert x.shape[0] == 2 + state.visual_tokens.shape[0]


def test_conversation_continues_with_history(tiny_model, image):
    m = tiny_model
    first = m.chat(
        image, "Please segment the star.", logits_processor=force_answer(m.tokenizer, "<p> the star </p> [SEG].")
    )
    second = m.chat(image, "What color is it?", history=first.history, max_new_tokens=4)
    assert len(second.history.turns) == 2
    ids = m.conversation_ids(second.history.turns[:1] + [second.history.turns[1].__class__("What color is it?")])
    text = m.tokenizer.decode([i for i in ids if i >= 0])
    assert "<p> the star </p> [SEG].<|im_end|>\n<|im_start|>user\nWhat color is it?" in text
    assert ids.count(-200) == 1


def test_image_work_runs_once_per_image(tiny_model, image):
    m = tiny_model
    calls = []
    handle = m.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        m.predictor.reset_image()
        m.chat(image, "Describe the image.", max_new_tokens=3)
        m.chat(image, "What is <region>?", prompts=[Prompt.point(5, 5)], max_new_tokens=3)
        m.perceive(image)
        assert len(calls) == 1
        m.chat(image[::-1].copy(), "Describe the image.", max_new_tokens=3)
        assert len(calls) == 2
    finally:
        handle.remove()


def test_follow_finds_the_segments_on_new_frames_of_any_size(tiny_model, image, rng):
    m = tiny_model
    res = m.chat(image, "Segment it.", logits_processor=force_answer(m.tokenizer, "<p> it </p> [SEG]."))
    other = rng.integers(0, 256, (150, 260, 3), dtype=np.uint8)
    followed = m.follow(other, res.segments)
    assert len(followed) == 1 and followed[0].phrase == "it"
    assert followed[0].mask.shape == (150, 260)
    # Following on the original frame reproduces the chat mask exactly.
    again = m.follow(image, res.segments)
    assert np.array_equal(again[0].mask, res.segments[0].mask)


def test_perceive_gives_labelled_disjoint_masks(tiny_model, image):
    segs = tiny_model.perceive(image)
    assert segs, "the tiny config keeps every query (thresholds 0)"
    names = set(tiny_model.config.decoder.class_names)
    total = np.zeros(image.shape[:2], int)
    for s in segs:
        assert s.label in names and s.mask.shape == image.shape[:2]
        total += s.mask
    assert total.max() <= 1  # panoptic: each pixel at most once
    followed = tiny_model.follow(image, segs)
    assert [f.label for f in followed] == [s.label for s in segs]


def test_bad_inputs_raise_clear_errors(tiny_model, image):
    m = tiny_model
    with pytest.raises(ValueError, match="prompt"):
        m.chat(image, "What is <region>?")
    with pytest.raises(ValueError, match="prompt"):
        m.chat(image, "Describe the image.", prompts=[Prompt.point(1, 1)])
    with pytest.raises(ValueError, match="uint8"):
        m.chat(image.astype(np.float32), "Describe the image.")
    with pytest.raises(ValueError):
        m.chat(np.zeros((0, 5, 3), np.uint8), "Describe the image.")
    with pytest.raises(ValueError):
        Prompt.box(10, 10, 5, 20)
    with pytest.raises(ValueError):
        Prompt.mask(np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="does not match"):
        m.chat(image, "What is <region>?", prompts=[Prompt.mask(np.ones((3, 3), bool))])
    with pytest.raises(FileNotFoundError):
        OmgLlava.from_pretrained("/nonexistent/model")


def test_save_and_load_round_trip(tiny_model, image, tmp_path):
    m = tiny_model
    m.save_pretrained(tmp_path / "model")
    loaded = OmgLlava.from_pretrained(tmp_path / "model")
    force = force_answer(m.tokenizer, "<p> the cross </p> [SEG].")
    a = m.chat(image, "Segment the cross.", logits_processor=force)
    b = loaded.chat(image, "Segment the cross.", logits_processor=force)
    assert a.text == b.text and np.array_equal(a.segments[0].mask, b.segments[0].mask)
    free_a = m.chat(image, "Describe the image.", max_new_tokens=8)
    free_b = loaded.chat(image, "Describe the image.", max_new_tokens=8)
    assert free_a.text == free_b.text
    assert not any(Path(tmp_path / "model").rglob("*.bin")) and not any(Path(tmp_path / "model").rglob("*.pt"))


def test_float16_storage_halves_the_files_and_loads_back_as_float32(tiny_model, tmp_path):
    m = tiny_model
    m.save_pretrained(tmp_path / "fp32")
    m.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    for name in ("model.safetensors", "llm/model.safetensors"):
        full, half = ((tmp_path / d / name).stat().st_size for d in ("fp32", "fp16"))
        assert half < 0.55 * full, name
    loaded = OmgLlava.from_pretrained(tmp_path / "fp16")
    original = m.state_dict()
    for k, v in loaded.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
            assert torch.equal(v, original[k].to(torch.float16).float()), k


def test_official_7b_builds_on_meta_with_the_released_shapes():
    m = OmgLlava.from_config("official-7b", device="meta")
    sd = m.state_dict()
    assert all(t.device.type == "meta" for t in sd.values())
    assert sd["visual_projector.query_proj.weight"].shape == (6144, 512)
    assert sd["visual_projector.model.0.weight"].shape == (4096, 6144)
    assert sd["visual_projector.model_feat.0.weight"].shape == (4096, 6656)
    assert sd["visual_projector.seperate_embed.weight"].shape == (1, 4096)
    assert sd["text_projector.model.0.weight"].shape == (512, 4096)
    assert sd["text_projector.model.2.weight"].shape == (512, 512)
    assert m.llm.get_input_embeddings().weight.shape == (92548, 4096)
    assert m.llm.get_output_embeddings().weight.shape == (92548, 4096)
    cfg = m.llm.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (
        32,
        32,
        8,
        14336,
    )
    # Encoder: ConvNeXt-L stages; decoder: exactly the 310 tensors of omg_seg_convl.pth.
    assert sd["image_encoder.stages.3.blocks.2.conv_dw.weight"].shape == (1536, 1, 7, 7)
    assert len([k for k in sd if k.startswith("image_encoder.stages.2.blocks.")]) // 9 == 27
    official = json.loads((Path(__file__).parent / "data" / "official_keys.json").read_text())
    ours = {
        "panoptic_head." + k[len("omg_decoder.") :]: list(v.shape)
        for k, v in sd.items()
        if k.startswith("omg_decoder.") and k != "omg_decoder.class_embed"
    }
    assert ours == official["omg_seg_convl"]
    assert sd["omg_decoder.class_embed"].shape == (133, 17, 768)
    projector = {
        k.replace("projector.model.", "visual_projector.").replace("projector_text2vision.", "text_projector."): v
        for k, v in official["projectors"].items()
    }
    assert {k: list(sd[k].shape) for k in projector} == projector


def test_panoptic_winners_give_an_object_its_edge_before_the_table():
    from omg_llava_ros.model.omg_llava import panoptic_winners

    # Pixel 0: object only; pixel 1: the object's edge (object 0.6, confident table 0.9); pixel 2: table.
    probs = torch.tensor([[[0.95, 0.6, 0.1]], [[0.2, 0.9, 0.99]]])  # (2 segments, 1, 3)
    scores = torch.tensor([0.8, 1.0])[:, None, None]
    is_thing = torch.tensor([True, False])
    winner = panoptic_winners(scores * probs, is_thing, probs >= 0.5)
    assert winner.tolist() == [[0, 0, 1]]
    # Mask2Former's rule would give the edge to the table.
    assert (scores * probs).argmax(0).tolist() == [[0, 1, 1]]
    # Between two objects the weighted probability still decides.
    probs = torch.tensor([[[0.7, 0.55]], [[0.6, 0.9]]])
    both = torch.tensor([True, True])
    assert panoptic_winners(probs, both, probs >= 0.5).tolist() == [[0, 1]]
