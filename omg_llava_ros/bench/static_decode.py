"""Greedy decoding over a static KV cache, the one-token step optionally compiled (CUDA graphs).

`StaticCacheGenerator` is a drop-in for `language_model.greedy_generate` (same signature, same tokens,
same `[SEG]` states): the cache is allocated once at a fixed length, so the decode step has static
shapes and addresses, which is what `torch.compile(mode="reduce-overhead")` needs to capture it in a
CUDA graph — one launch per token instead of hundreds. The prompt (prefill) runs eagerly: its length
changes with every command. `use_generator` swaps it into `OmgLlava.chat` for a `with` block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from omg_llava_ros.model.language_model import Generation, LogitsProcessor, greedy_loop


class StaticCacheGenerator:
    """Greedy generation for one `llm` with a cache of `max_cache_len` positions.

    compile_step: None (eager), or a torch.compile mode such as "reduce-overhead" (CUDA graphs on a
    GPU) or "default"; compile_backend: torch.compile's backend ("inductor"; "eager" checks the
    tracing without generating code). `probe` (a StageProbe), when set, receives every LLM call's
    timing, since hooks inside a compiled step would break the graph.
    """

    def __init__(
        self,
        llm: nn.Module,
        max_cache_len: int = 2048,
        compile_step: str | None = None,
        compile_backend: str = "inductor",
    ):
        from transformers import StaticCache

        self.llm = llm
        self.base = llm.base_model
        self.head = llm.get_output_embeddings()
        self.embed = llm.get_input_embeddings()
        self.max_cache_len = max_cache_len
        self.cache = StaticCache(config=llm.config, max_cache_len=max_cache_len)
        self.probe: Any = None
        self.step: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = self._step
        if compile_step is not None:
            # A mode (CUDA graphs, autotuning) is an inductor setting; other backends take none.
            mode = compile_step if compile_backend == "inductor" else None
            self.step = torch.compile(self._step, mode=mode, backend=compile_backend, dynamic=False)
        self.compiled = compile_step is not None
        # CUDA-graph trees: each token is a new iteration whose outputs may overwrite the last one's.
        self._graphs = compile_step == "reduce-overhead" and compile_backend == "inductor"

    def _step(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.base(inputs_embeds=embeds, past_key_values=self.cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]
        return hidden, self.head(hidden)[0].float()

    def _timed(self, call: Callable[[], Any], length: int) -> Any:
        if self.probe is None:
            return call()
        start = self.probe.now()
        out = call()
        self.probe.llm_call(start, self.probe.now(), length)
        return out

    @torch.no_grad()  # as transformers' own compiled generation; inference mode and CUDA graphs mix less well
    def __call__(
        self,
        llm: nn.Module,
        inputs_embeds: torch.Tensor,
        stop_ids: Sequence[int],
        seg_id: int,
        max_new_tokens: int,
        logits_processor: LogitsProcessor | None = None,
        phrase_ids: tuple[int, int] | None = None,
    ) -> Generation:
        if llm is not self.llm:
            raise ValueError("this generator was built for another language model")
        length = inputs_embeds.shape[1]
        if length + max_new_tokens > self.max_cache_len:
            raise ValueError(
                f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceed the static cache ({self.max_cache_len})"
            )
        self.cache.reset()
        # The LLM runs in its own dtype even inside a (vision) autocast region: autocast would give
        # the cache keys and values different dtypes on an fp32 model.
        with torch.autocast(inputs_embeds.device.type, enabled=False):
            return self._generate(inputs_embeds, stop_ids, seg_id, max_new_tokens, logits_processor, phrase_ids)

    def _generate(
        self,
        inputs_embeds: torch.Tensor,
        stop_ids: Sequence[int],
        seg_id: int,
        max_new_tokens: int,
        logits_processor: LogitsProcessor | None,
        phrase_ids: tuple[int, int] | None,
    ) -> Generation:
        length = inputs_embeds.shape[1]

        def prefill() -> tuple[torch.Tensor, torch.Tensor]:
            out = self.base(inputs_embeds=inputs_embeds, past_key_values=self.cache, use_cache=True)
            hidden = out.last_hidden_state[:, -1]
            return hidden, self.head(hidden)[0].float()

        _, logits = self._timed(prefill, length)

        def step(token_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self._graphs:
                torch.compiler.cudagraph_mark_step_begin()
            return self._timed(lambda: self.step(token_embeds), 1)

        generated, seg_states, phrase_states, stopped = greedy_loop(
            logits, step, self.embed, stop_ids, seg_id, max_new_tokens, logits_processor, phrase_ids
        )
        empty = inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
        seg_hidden = torch.stack(seg_states) if seg_states else empty
        phrase_hidden = torch.stack(phrase_states) if phrase_states else empty
        return Generation(generated, seg_hidden, stopped, prompt_length=length, phrase_hidden=phrase_hidden)


@contextmanager
def use_generator(generator: Callable[..., Generation]) -> Iterator[None]:
    """`OmgLlava.generate` (so `chat`) generates with `generator` inside the block (it calls the
    module-level name)."""
    from omg_llava_ros.model import omg_llava

    original = omg_llava.greedy_generate
    omg_llava.greedy_generate = generator
    try:
        yield
    finally:
        omg_llava.greedy_generate = original


def plain_rope_for_static_cache(llm: nn.Module, max_len: int) -> str | None:
    """Dynamic-NTK RoPE checks `max(position) > cached length` on the host at every step, which breaks a
    compiled graph. Below the original length it never rescales, so plain RoPE gives identical numbers;
    switch to it when `max_len` stays below. Returns a note on what was done, or None."""
    rotary = getattr(llm.base_model, "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", None)
    if not isinstance(rope_type, str) or "dynamic" not in rope_type:
        return None
    if max_len > rotary.original_max_seq_len:
        return f"dynamic RoPE kept: the cache ({max_len}) may exceed {rotary.original_max_seq_len} positions"
    rotary.rope_type = "default"
    return f"dynamic RoPE run as plain RoPE (identical below {rotary.original_max_seq_len} positions)"
