"""Special tokens, the chat template, and [SEG] hidden-state selection during generation."""

import torch

from omg_llava_ros.model.chat_template import Turn, first_user_text, render_conversation
from omg_llava_ros.model.language_model import (
    DEFAULT_CORPUS,
    EMBEDDED_SPECIAL_TOKENS,
    MARK_TOKEN,
    add_special_tokens,
    greedy_generate,
    phrase_spans,
    seg_hidden_states,
    special_token_ids,
    train_tokenizer,
)
from omg_llava_ros.model.omg_llava import IMAGE_PLACEHOLDER
from omg_llava_ros.model.results import clean_text, phrases_for_segs


def test_template_text_single_and_multi_turn():
    one = render_conversation([Turn(first_user_text("Please segment the red circle."))])
    assert one == "<|im_start|>user\n<image>\nPlease segment the red circle.<|im_end|>\n<|im_start|>assistant\n"
    two = render_conversation([Turn("<image>\nWhat is <region>?", "a small red circle."), Turn("What color is it?")])
    assert two == (
        "<|im_start|>user\n<image>\nWhat is <region>?<|im_end|>\n<|im_start|>assistant\n"
        "a small red circle.<|im_end|>\n"
        "<|im_start|>user\nWhat color is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_conversation([Turn("hi")], system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_special_tokens_order_rows_and_mark():
    tok = train_tokenizer(DEFAULT_CORPUS, vocab_size=300)
    base = len(tok)
    rows = add_special_tokens(tok)
    ids = special_token_ids(tok)
    # [SEG], <p>, </p>, <region> get the next ids, in that order, and embedding rows;
    # <mark> comes after the resize, so its id equals the row count (no row).
    assert [ids.seg, ids.phrase_start, ids.phrase_end, ids.region] == list(range(base, base + 4))
    assert rows == base + 4 and ids.mark == rows
    assert tok.convert_ids_to_tokens([ids.seg, ids.mark]) == ["[SEG]", MARK_TOKEN]
    # Each is one token even inside text.
    enc = tok.encode("<p> the red circle </p> [SEG]. What is <region> or <mark>?", add_special_tokens=False)
    for t in (*EMBEDDED_SPECIAL_TOKENS, MARK_TOKEN):
        assert tok.convert_tokens_to_ids(t) in enc
    assert tok.decode(enc) == "<p> the red circle </p> [SEG]. What is <region> or <mark>?"


def test_tokenizer_round_trips_any_text():
    tok = train_tokenizer(DEFAULT_CORPUS, vocab_size=300)
    text = "Grüße, 机器人! \t tabs\nnew lines ✓"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_conversation_ids_place_bos_and_one_image(tiny_model):
    turns = [Turn(first_user_text("Where is the red circle?"))]
    ids = tiny_model.conversation_ids(turns)
    assert ids[0] == tiny_model.tokens.bos
    assert ids.count(IMAGE_PLACEHOLDER) == 1
    before = tiny_model.tokenizer.decode(ids[1 : ids.index(IMAGE_PLACEHOLDER)])
    assert before == "<|im_start|>user\n"


def _script(tokenizer, answer: str):
    """A logits processor that forces the model to write `answer` then stop."""
    target = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def force(generated, logits):
        forced = torch.full_like(logits, -1e9)
        forced[target[len(generated)]] = 0
        return forced

    return force, target


def test_seg_hidden_state_is_the_last_layer_state_where_seg_is_the_input(tiny_model):
    m = tiny_model
    answer = "<p> the red circle </p> [SEG] and <p> a star </p> [SEG]."
    force, target = _script(m.tokenizer, answer)
    torch.manual_seed(0)
    prompt = torch.randn(1, 9, m.config.language_model.hidden_size)
    gen = greedy_generate(m.llm, prompt, m.tokens.stop_ids, m.tokens.seg, 64, force)
    assert gen.stopped and gen.token_ids == target[:-1]
    assert gen.seg_hidden.shape == (2, m.config.language_model.hidden_size)

    # Teacher forcing over prompt + answer gives the same states at the [SEG] positions.
    ids = torch.tensor(gen.token_ids)
    full = torch.cat([prompt[0], m.llm.get_input_embeddings()(ids)], 0)[None]
    with torch.no_grad():
        hidden = m.llm.base_model(inputs_embeds=full).last_hidden_state[0, prompt.shape[1] :]
    expected = seg_hidden_states(ids, hidden, m.tokens.seg)
    assert torch.allclose(gen.seg_hidden, expected, atol=1e-4)
    # ... and not the state one position earlier (where [SEG] was the *output*).
    seg_pos = torch.nonzero(ids == m.tokens.seg).flatten()
    assert not torch.allclose(gen.seg_hidden, hidden[seg_pos - 1], atol=1e-3)


def test_each_seg_gets_the_mean_state_of_its_phrase_as_teacher_forcing_gives_it(tiny_model):
    m = tiny_model
    answer = "<p> the red circle </p> [SEG] and <p> the star left of it </p> [SEG], then [SEG]."
    force, target = _script(m.tokenizer, answer)
    torch.manual_seed(2)
    prompt = torch.randn(1, 7, m.config.language_model.hidden_size)
    marks = (m.tokens.phrase_start, m.tokens.phrase_end)
    gen = greedy_generate(m.llm, prompt, m.tokens.stop_ids, m.tokens.seg, 64, force, marks)
    ids = gen.token_ids
    full = torch.cat([prompt[0], m.llm.get_input_embeddings()(torch.tensor(ids))], 0)[None]
    with torch.no_grad():
        hidden = m.llm.base_model(inputs_embeds=full).last_hidden_state[0, prompt.shape[1] :]
    segs = [i for i, t in enumerate(ids) if t == m.tokens.seg]
    spans = phrase_spans(ids, segs, marks)
    words = [m.tokenizer.decode(ids[a:b]).strip() for a, b in spans]
    # The third [SEG] has no phrase of its own: the last one closed before it stands.
    assert words == ["the red circle", "the star left of it", "the star left of it"]
    expected = torch.stack([hidden[a:b].mean(0) for a, b in spans])
    assert gen.phrase_hidden.shape == gen.seg_hidden.shape == (3, m.config.language_model.hidden_size)
    assert torch.allclose(gen.phrase_hidden, expected, atol=1e-4)
    # With no phrase at all, a [SEG]'s own state stands in.
    assert phrase_spans([5, m.tokens.seg], [1], marks) == [(1, 2)]


def test_greedy_loop_matches_transformers_generate(tiny_model):
    m = tiny_model
    torch.manual_seed(1)
    prompt = torch.randn(1, 6, m.config.language_model.hidden_size)
    gen = greedy_generate(m.llm, prompt, [], m.tokens.seg, 12)
    with torch.no_grad():
        ref = m.llm.generate(inputs_embeds=prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert gen.token_ids == ref[0, -12:].tolist()


def test_phrase_assignment_and_clean_text():
    text = "<p> a red circle </p> [SEG], <p> a blue star </p> [SEG], and [SEG]."
    assert phrases_for_segs(text) == ["a red circle", "a blue star", None]
    assert clean_text(text) == "a red circle, a blue star, and."
    assert clean_text("<p> the red circle </p> [SEG].") == "the red circle."
