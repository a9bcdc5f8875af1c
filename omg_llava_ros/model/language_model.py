"""The LLM side: any Hugging Face causal LM (loaded natively, never with remote code), the special
tokens OMG-LLaVA adds, and greedy generation that keeps the hidden state of every `[SEG]`.

Special tokens, as the official code adds them: `[SEG]`, `<p>`, `</p>`, `<region>` get embedding
rows (the embeddings are resized after adding them); `<mark>` is added afterwards, has no row, and —
like `<region>` — is always replaced by a visual-prompt embedding before the lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from omg_llava_ros.model.chat_template import IM_END, IM_START
from omg_llava_ros.model.config import LanguageModelConfig

SEG_TOKEN = "[SEG]"
PHRASE_START = "<p>"
PHRASE_END = "</p>"
REGION_TOKEN = "<region>"
MARK_TOKEN = "<mark>"
EMBEDDED_SPECIAL_TOKENS = (SEG_TOKEN, PHRASE_START, PHRASE_END, REGION_TOKEN)


@dataclass(frozen=True)
class SpecialTokenIds:
    seg: int
    phrase_start: int
    phrase_end: int
    region: int
    mark: int
    im_end: int
    bos: int | None
    eos: int | None

    @property
    def prompt_ids(self) -> tuple[int, int]:
        """Ids whose positions take visual-prompt embeddings."""
        return (self.region, self.mark)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(i for i in (self.im_end, self.eos) if i is not None)


def add_special_tokens(tokenizer) -> int:
    """Add OMG-LLaVA's tokens in the official order; returns the embedding size (before `<mark>`)."""
    tokenizer.add_tokens(list(EMBEDDED_SPECIAL_TOKENS), special_tokens=True)
    vocab_with_rows = len(tokenizer)
    tokenizer.add_tokens([MARK_TOKEN], special_tokens=True)
    return vocab_with_rows


def special_token_ids(tokenizer) -> SpecialTokenIds:
    def one(token: str) -> int:
        ids = tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token!r} token; was add_special_tokens() applied?")
        return int(ids[0])

    return SpecialTokenIds(
        seg=one(SEG_TOKEN),
        phrase_start=one(PHRASE_START),
        phrase_end=one(PHRASE_END),
        region=one(REGION_TOKEN),
        mark=one(MARK_TOKEN),
        im_end=one(IM_END),
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
    )


def train_tokenizer(corpus: Sequence[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained locally (any UTF-8 text stays encodable), with the
    chat-template tokens, wrapped as a transformers fast tokenizer; OMG-LLaVA tokens not yet added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base_special = ["<s>", "</s>", "<unk>", IM_START, IM_END]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=base_special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=[IM_START, IM_END],
    )


DEFAULT_CORPUS = (
    "Please segment the red circle.",
    "Describe the image with segmentation masks.",
    "What is on the table? two objects: a blue star and an orange cross.",
    "How many squares are there? three.",
    "What color is <region>? green.",
    "Is there a purple triangle? yes.",
    "Pick up the small yellow object left of the large green square.",
)


def build_language_model(config: LanguageModelConfig, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """A causal LM with random weights from the config (on `meta` it allocates nothing)."""
    from transformers import AutoModelForCausalLM

    hf_config = config.to_hf_config()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return model


@dataclass
class Generation:
    """token_ids: the generated ids (stop token excluded); seg_hidden: (n_seg, hidden), the last-layer
    state at each position whose *input* token is `[SEG]`, in order; prompt_hidden: (L, hidden), the
    last-layer states of the prompt."""

    token_ids: list[int]
    seg_hidden: torch.Tensor
    stopped: bool
    prompt_length: int = 0
    prompt_hidden: torch.Tensor | None = None
    phrase_hidden: torch.Tensor | None = None  # (n_seg, hidden): each [SEG]'s phrase (`greedy_loop`)


LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@torch.inference_mode()  # no autograd bookkeeping on any of the per-token ops (no_grad still keeps some)
def greedy_loop(
    logits: torch.Tensor,
    step: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    embed: nn.Module,
    stop_ids: Sequence[int],
    seg_id: int,
    max_new_tokens: int,
    logits_processor: LogitsProcessor | None = None,
    phrase_ids: tuple[int, int] | None = None,
) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor], bool]:
    """The greedy loop every decoder runs (eager here, CUDA-graphed in `bench.static_decode`): from
    the prompt's next-token `logits`, pick, stop or feed the token through `step` ((1, 1, H) embedded
    token → its (1, H) last-layer state and next logits). Returns the generated ids, the states of
    the `[SEG]` tokens (copies: a graphed step reuses its buffers), for each `[SEG]` the mean state
    of the tokens of the last phrase closed before it (`phrase_ids`: the `<p>`, `</p>` ids; the
    `[SEG]`'s own state where there is none) and whether a stop id ended it."""
    generated: list[int] = []
    seg_states: list[torch.Tensor] = []
    phrase_states: list[torch.Tensor] = []
    stop = set(stop_ids)
    opening, closing = phrase_ids if phrase_ids is not None else (None, None)
    inside, total, count, phrase = False, None, 0, None
    for _ in range(max_new_tokens):
        if logits_processor is not None:
            logits = logits_processor(generated, logits)
        best = torch.argmax(logits)
        token = int(best)
        if token in stop:
            return generated, seg_states, phrase_states, True
        generated.append(token)
        # The id is already a tensor on the device: no new host tensor and no copy per token.
        hidden, logits = step(embed(best.view(1, 1)))
        if token == opening:
            inside, total, count = True, None, 0
        elif token == closing and inside:
            inside, phrase = False, (total / count if count else None)
        elif inside:
            total = hidden[0].clone() if total is None else total + hidden[0]
            count += 1
        if token == seg_id:
            seg_states.append(hidden[0].clone())
            phrase_states.append(phrase.clone() if phrase is not None else hidden[0].clone())
    return generated, seg_states, phrase_states, False


def phrase_spans(ids: Sequence[int], seg_at: Sequence[int], phrase_ids: tuple[int, int]) -> list[tuple[int, int]]:
    """Teacher-forced counterpart of `greedy_loop`'s phrase states: for each `[SEG]` position in
    `ids`, the [start, end) positions of the tokens of the last `<p> … </p>` closed before it
    ((p, p + 1), the `[SEG]` itself, where there is none)."""
    opening, closing = phrase_ids
    spans = []
    for p in seg_at:
        span = (p, p + 1)
        closes = [i for i in range(p) if ids[i] == closing]
        if closes:
            opens = [i for i in range(closes[-1]) if ids[i] == opening]
            if opens and closes[-1] > opens[-1] + 1:
                span = (opens[-1] + 1, closes[-1])
        spans.append(span)
    return spans


def greedy_generate(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    stop_ids: Sequence[int],
    seg_id: int,
    max_new_tokens: int,
    logits_processor: LogitsProcessor | None = None,
    phrase_ids: tuple[int, int] | None = None,
) -> Generation:
    """Greedy decoding with the KV cache from a (1, L, H) embedded prompt.

    Every step feeds the previous token; its last-layer (final-norm) state is the `[SEG]` embedding
    when that token is `[SEG]` — the state the official model reads. Every generated token is fed
    at once, so a `[SEG]` generated last still gets its state.
    """
    from transformers import DynamicCache

    base = llm.base_model
    head = llm.get_output_embeddings()
    cache = DynamicCache(config=llm.config)
    out = base(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True)
    prompt_hidden = out.last_hidden_state[0]

    def step(token_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = base(inputs_embeds=token_embeds, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        return hidden, head(hidden)[0].float()

    first = head(out.last_hidden_state[:, -1])[0].float()
    generated, seg_states, phrase_states, stopped = greedy_loop(
        first, step, llm.get_input_embeddings(), stop_ids, seg_id, max_new_tokens, logits_processor, phrase_ids
    )
    hidden_size = inputs_embeds.shape[-1]
    seg_hidden = torch.stack(seg_states) if seg_states else inputs_embeds.new_zeros(0, hidden_size)
    phrase_hidden = torch.stack(phrase_states) if phrase_states else inputs_embeds.new_zeros(0, hidden_size)
    return Generation(generated, seg_hidden, stopped, inputs_embeds.shape[1], prompt_hidden, phrase_hidden)


def seg_hidden_states(input_ids: torch.Tensor, hidden: torch.Tensor, seg_id: int) -> torch.Tensor:
    """Teacher-forced selection: (L,) ids and (L, H) last-layer states → states where the input is `[SEG]`."""
    return hidden[input_ids == seg_id]
