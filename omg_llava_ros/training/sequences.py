"""What the LLM is trained on: one row a scene, the visual tokens then its conversations' turns,
each question masked from the others (`build_sequence`), and the batched LLM pass over the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from omg_llava_ros.model.chat_template import Turn, first_user_text, user_block
from omg_llava_ros.model.language_model import phrase_spans
from omg_llava_ros.model.omg_decoder import DecoderMemory
from omg_llava_ros.model.omg_llava import IMAGE_PLACEHOLDER, OmgLlava
from omg_llava_ros.model.pixel_shuffle import pixel_shuffle
from omg_llava_ros.training.config import TrainConfig
from omg_llava_ros.training.model_inputs import pixels_of, select_memory, to_encoded


@dataclass
class VisualBatch:
    """Frozen perception outputs of a batch, and what the projectors need."""

    memory: DecoderMemory
    shuffled: torch.Tensor  # (B, T, 4·C4)
    prior: object  # PerceptionPrior
    object_masks: list[torch.Tensor] | None = None  # per image (n_b, h, w) mask logits of its object tokens


@torch.no_grad()
def encode_batch(model: OmgLlava, images: list[np.ndarray]) -> DecoderMemory:
    """The frozen decoder memory of `images`, without the panoptic pass (what follow frames need)."""
    return model.omg_decoder.encode_memory(model.image_encoder(pixels_of(model, images)))


@torch.no_grad()
def perceive_batch(model: OmgLlava, images: list[np.ndarray]) -> VisualBatch:
    enc, dec = model.image_encoder, model.omg_decoder
    pixels = pixels_of(model, images)
    feats = enc(pixels)
    memory = dec.encode_memory(feats)
    q, pos = dec.panoptic_queries(len(images))
    out = dec.decode(q, pos, memory, with_class=True)
    ratio = model.config.pixel_shuffle_ratio
    prior = model.perception_prior(out, pos, feats[-1].shape[-1] // ratio)
    return VisualBatch(memory, pixel_shuffle(feats[-1], ratio), prior, prior.object_masks)


def visual_tokens(model: OmgLlava, vb: VisualBatch, i: int) -> torch.Tensor:
    proj = model.visual_projector
    pixel = proj.pixel_tokens(vb.shuffled[i : i + 1], vb.prior.pixel_prior[i : i + 1])[0]
    return proj.image_sequence(pixel, proj.object_tokens(model.object_queries(vb.prior, i)))


@torch.no_grad()
def prompt_queries(model: OmgLlava, memory: DecoderMemory, i: int, prompts) -> torch.Tensor | None:
    """Decoded visual-prompt queries [feature; position] (N, 2C) of image i (frozen decoder)."""
    if not prompts:
        return None
    encoded = [to_encoded(p) for p in prompts]
    pe = model.prompt_encoder
    q, pos = pe.queries(encoded)
    out = model.omg_decoder.decode(
        q, pos, select_memory(memory, slice(i, i + 1)), pe.constraints(encoded, memory.level_shapes)
    )
    return torch.cat([out.query, pos], dim=-1)[:, 0]


@dataclass
class Sequence_:
    """One LLM training row: a scene's image prefix, then one or more questions with their answers.
    Each question sees the prefix and itself only (`segments`), at the positions it would have
    alone (`positions`): the loss is that of separate single-turn sequences, and the image tokens,
    ~80 of a short question's ~100, run once for all of them."""

    embeds: torch.Tensor  # (L, H)
    labels: torch.Tensor  # (L,) -100 outside the answers
    answer_index: torch.Tensor  # (L,) which answer each label belongs to, -1 outside the answers
    segments: torch.Tensor  # (L,) -1 for the shared prefix, k for question k's tokens
    positions: torch.Tensor  # (L,) position ids
    seg_positions: list[int]  # positions whose input token is [SEG], over all answers
    seg_answer: list[int]  # the answer each of those belongs to
    image_index: int
    target_masks: list[np.ndarray]
    object_positions: list[int] = field(default_factory=list)  # where the object tokens sit in the row
    anchor_masks: list[np.ndarray | None] = field(default_factory=list)  # per [SEG]: a form-5 anchor's mask
    phrase_spans: list[tuple[int, int]] = field(default_factory=list)  # per [SEG]: its phrase's positions


def build_sequence(model: OmgLlava, vb: VisualBatch, i: int, samples) -> Sequence_:
    """Questions about scene i packed on one shared image prefix (`<s><|im_start|>user\n<image>`).
    Answers whose [SEG] count does not match their masks get no mask loss (the official code drops
    such samples too)."""
    tok, tokens = model.tokenizer, model.tokens
    samples = samples if isinstance(samples, (list, tuple)) else [samples]
    prefix: list[int] | None = None
    turns: list[tuple[list[int], int]] = []  # (question + answer ids after the image, answer length)
    for sample in samples:
        ids = model.conversation_ids([Turn(first_user_text(sample.question))])
        cut = ids.index(IMAGE_PLACEHOLDER) + 1
        if prefix is None:
            prefix = ids[:cut]
        elif ids[:cut] != prefix:
            raise ValueError("the questions of one sequence must share the text before the image")
        answer = tok.encode(sample.answer, add_special_tokens=False) + [tokens.im_end]
        turns.append((ids[cut:] + answer, len(answer)))
    ids = prefix + [t for body, _ in turns for t in body]
    prompts = [p for sample in samples for p in sample.prompts]
    pq = prompt_queries(model, vb.memory, i, prompts)
    prompt_embeds = model.visual_projector.object_tokens(pq) if pq is not None else None
    state = SimpleNamespace(visual_tokens=visual_tokens(model, vb, i))
    ids_t = torch.tensor(ids)
    embeds = model.embed_ids(ids_t, state, prompt_embeds)
    shift = embeds.shape[0] - len(ids)  # the image placeholder expanded to the visual tokens
    n_prefix = len(prefix) + shift
    length = embeds.shape[0]
    labels = torch.full((length,), -100, dtype=torch.long)
    answer_index = torch.full((length,), -1, dtype=torch.long)
    segments = torch.full((length,), -1, dtype=torch.long)
    positions = torch.arange(length)
    seg_positions: list[int] = []
    seg_answer: list[int] = []
    masks: list[np.ndarray] = []
    anchors: list[np.ndarray | None] = []
    spans: list[tuple[int, int]] = []
    start = n_prefix  # where this turn starts in the expanded row
    for k, ((body, n_answer), sample) in enumerate(zip(turns, samples, strict=True)):
        end = start + len(body)
        segments[start:end] = k
        positions[start:end] = torch.arange(n_prefix, n_prefix + len(body))
        a = end - n_answer  # first answer token
        answer = ids_t[a - shift : end - shift]
        # Position p predicts token p + 1: the last question token predicts the first answer token.
        labels[a - 1 : end - 1] = answer
        answer_index[a - 1 : end - 1] = k
        segs = (torch.nonzero(answer == tokens.seg).flatten() + a).tolist()
        if len(segs) == len(sample.target_masks):
            spans += [
                (first + a, last + a)
                for first, last in phrase_spans(
                    answer.tolist(), [p - a for p in segs], (tokens.phrase_start, tokens.phrase_end)
                )
            ]
            seg_positions += segs
            seg_answer += [k] * len(segs)
            masks += list(sample.target_masks)
            anchors += list(sample.anchor_masks) or [None] * len(segs)
        start = end
    n_objects = len(vb.prior.object_tokens[i])
    first_object = prefix.index(IMAGE_PLACEHOLDER) + shift + 1 - n_objects  # the image's last n tokens
    objects = list(range(first_object, first_object + n_objects))
    return Sequence_(
        embeds, labels, answer_index, segments, positions, seg_positions, seg_answer, i, masks, objects, anchors, spans
    )


def run_llm(model: OmgLlava, seqs: list[Sequence_], layer: int | None = None):
    """Right-padded batch → (B, L, H) final-norm hidden states, (B, L) labels, (B, L) answer index,
    and with `layer` the (B, L, H) residual stream after that many decoder layers as a fourth.
    Attention: causal, within the shared prefix and the token's own question; padding sees itself."""
    length = max(s.embeds.shape[0] for s in seqs)
    hidden = seqs[0].embeds.shape[-1]
    embeds = seqs[0].embeds.new_zeros(len(seqs), length, hidden)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    groups = torch.full((len(seqs), length), -1, dtype=torch.long)
    segments = torch.full((len(seqs), length), -2, dtype=torch.long)  # -2: padding
    positions = torch.zeros(len(seqs), length, dtype=torch.long)
    for b, s in enumerate(seqs):
        n = s.embeds.shape[0]
        embeds[b, :n], labels[b, :n], groups[b, :n] = s.embeds, s.labels, s.answer_index
        segments[b, :n], positions[b, :n] = s.segments, s.positions
    index = torch.arange(length)
    causal = index[None, :] <= index[:, None]
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = causal & (((key == -1) & (query != -2)) | (key == query))
    out = model.llm.base_model(
        inputs_embeds=embeds,
        attention_mask=allowed[:, None],
        position_ids=positions,
        output_hidden_states=layer is not None,
    )
    if layer is not None:
        return out.last_hidden_state, labels, groups, out.hidden_states[layer]
    return out.last_hidden_state, labels, groups


def pack_turns(model: OmgLlava, samples, keys: list, budget: int) -> list[list]:
    """Split one scene's questions into rows of at most `budget` text tokens each (the image tokens
    come on top), keeping their order; returns `keys` grouped the same way. A budget of 0 or less
    gives one row per question without tokenizing anything (the default recipe)."""
    if budget <= 0:
        return [[key] for key in keys]
    tok = model.tokenizer
    groups: list[list] = []
    used = 0
    for key, sample in zip(keys, samples, strict=True):
        n = len(tok.encode(user_block(sample.question) + sample.answer, add_special_tokens=False)) + 2
        if not groups or used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += n
    return groups


def plan_conversations(model: OmgLlava, batch, scene_of: list[int], cfg: TrainConfig) -> list[tuple[int, list[int]]]:
    """Which questions of a batch share a training row: [(scene, [question indices])], the questions
    about a scene on one image prefix, split where they would pass `cfg.max_text_tokens`."""
    chunks: list[tuple[int, list[int]]] = []
    for scene in sorted(set(scene_of)):
        rows = [i for i, s in enumerate(scene_of) if s == scene]
        samples = [batch[i].sample for i in rows]
        chunks += [(scene, part) for part in pack_turns(model, samples, rows, cfg.max_text_tokens)]
    return chunks
