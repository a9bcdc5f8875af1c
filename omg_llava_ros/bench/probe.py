"""Stage timers on the real `chat` / `follow` code path.

`StageProbe` wraps the model's own seams for the length of a `with` block — the preprocessor, the
vision backend, the image-encoder and LLM forward passes, `_perceive_state`, `_embed_conversation`
and `_masks_for_queries` — and records wall-clock intervals. Nothing is re-implemented, so the stages
are exactly what `chat` and `follow` do. With a `sync` (CUDA) every timer waits for the device
first, so a stage is device time, not launch time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from omg_llava_ros.model.omg_llava import OmgLlava
from omg_llava_ros.model.vision_backend import VisionBackend

# The stages of issue 8, in pipeline order.
STAGES = (
    "preprocess",
    "encoder",
    "pixel_decoder",
    "perception",
    "projection",
    "llm_prefill",
    "llm_decode_per_token",
    "seg_decode",
    "postprocess",
)
STAGE_NOTES = {
    "preprocess": "expand to square, resize, normalise",
    "encoder": "ConvNeXt image encoder",
    "pixel_decoder": "deformable pixel decoder + decoder memories",
    "perception": "panoptic decode (all queries, classes) + perception prior",
    "projection": "visual projector: pixel and object tokens",
    "llm_prefill": "LLM forward over the prompt (visual tokens + text)",
    "llm_decode_per_token": "one generated token: head, argmax, embedding, LLM step",
    "seg_decode": "text projector + decoder for the [SEG] / followed queries",
    "postprocess": "mask logits to input size (resize, crop), threshold, score",
}


@dataclass
class Recording:
    """Raw intervals of one command or one frame, in seconds."""

    spans: dict[str, float] = field(default_factory=dict)
    llm_calls: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, input length)

    def add(self, name: str, seconds: float) -> None:
        self.spans[name] = self.spans.get(name, 0.0) + seconds


class _TimedVision(VisionBackend):
    """The model's vision backend, with every call timed; decode calls are sorted by what asked."""

    def __init__(self, inner: VisionBackend, probe: StageProbe):
        self.inner = inner
        self.probe = probe
        self.name = inner.name

    def encode(self, pixels):
        with self.probe.span("vision_encode"):
            return self.inner.encode(pixels)

    def decode(self, query, query_pos, memory, constraints=None, with_class: bool = False, **kwargs):
        # The panoptic pass asks for classes, visual prompts bring constraints, [SEG]/follow neither.
        kind = "perception_decode" if with_class else "prompt_decode" if constraints is not None else "seg_vision"
        with self.probe.span(kind):
            return self.inner.decode(query, query_pos, memory, constraints, with_class, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class StageProbe:
    """`with StageProbe(model) as probe:` … `probe.reset()`; run chat/follow; `probe.stages()`."""

    def __init__(self, model: OmgLlava, sync: Callable[[], None] | None = None, llm_hooks: bool = True):
        self.model = model
        self.sync = sync
        # A generator with a compiled step reports its calls itself (`llm_call`): hooks would be traced.
        self.llm_hooks = llm_hooks
        self.record = Recording()
        self._undo: list[Callable[[], None]] = []
        self._open: dict[str, float] = {}
        self._llm_open: tuple[float, int] | None = None  # (start, input length) of the running LLM call
        self._in_perception = False

    # -- timing -------------------------------------------------------------------------------
    def now(self) -> float:
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        t0 = self.now()
        try:
            yield
        finally:
            self.record.add(name, self.now() - t0)

    def reset(self) -> None:
        self.record = Recording()
        self._open.clear()
        self._llm_open = None

    # -- installing -----------------------------------------------------------------------------
    def __enter__(self) -> StageProbe:
        m = self.model
        self._patch("preprocess", lambda orig: self._timed(orig, "preprocess"))
        self._patch("vision", lambda orig: _TimedVision(orig, self))
        self._patch("_perceive_state", self._perception_wrapper)
        self._patch("_embed_conversation", lambda orig: self._timed(orig, "prompt"))
        self._patch("_masks_for_queries", lambda orig: self._timed(orig, "masks_for_queries"))
        self._hook(m.image_encoder, "encoder")
        self._hook(m.text_projector, "text_projector")
        proj = m.visual_projector
        for module in (proj.model_feat, proj.model, proj.query_proj):
            self._hook(module, "projection", only_in_perception=True)
        if self.llm_hooks:
            base = m.llm.base_model
            handles = [
                base.register_forward_pre_hook(self._llm_start, with_kwargs=True),
                base.register_forward_hook(self._llm_end, with_kwargs=True),
            ]
            self._undo.extend(h.remove for h in handles)
        return self

    def __exit__(self, *exc: object) -> None:
        while self._undo:
            self._undo.pop()()

    def _patch(self, name: str, make: Callable[[Any], Any]) -> None:
        m = self.model
        had_own = name in m.__dict__  # an instance attribute (preprocess, vision), not a method
        original = getattr(m, name)
        setattr(m, name, make(original))

        def undo() -> None:
            if had_own:
                setattr(m, name, original)
            else:
                delattr(m, name)

        self._undo.append(undo)

    def _timed(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.span(name):
                return fn(*args, **kwargs)

        return timed

    def _perception_wrapper(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def perceive(*args: Any, **kwargs: Any) -> Any:
            self._in_perception = True
            try:
                with self.span("perceive_state"):
                    return fn(*args, **kwargs)
            finally:
                self._in_perception = False

        return perceive

    def _hook(self, module: Any, name: str, only_in_perception: bool = False) -> None:
        key = f"{name}:{id(module)}"

        def pre(*_: Any) -> None:
            if not only_in_perception or self._in_perception:
                self._open[key] = self.now()

        def post(*_: Any) -> None:
            start = self._open.pop(key, None)
            if start is not None:
                self.record.add(name, self.now() - start)

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        self._undo.extend(h.remove for h in handles)

    def llm_call(self, start: float, end: float, length: int) -> None:
        """Record one LLM forward (prefill or one decode step) of `length` input positions."""
        self.record.llm_calls.append((start, end, length))

    def _llm_start(self, module: Any, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        length = int(embeds.shape[1]) if embeds is not None else int(args[0].shape[1])
        self._llm_open = (self.now(), length)

    def _llm_end(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        if self._llm_open is not None:
            start, length = self._llm_open
            self.llm_call(start, self.now(), length)
            self._llm_open = None

    # -- results --------------------------------------------------------------------------------
    def stages(self) -> dict[str, float | None]:
        """The recording as stage → milliseconds (None: the path has no such stage), plus
        `prompt_ms`, `llm_decode_ms`, `generated_tokens`, `prompt_tokens` and `fused_encoder`."""
        s = self.record.spans
        out: dict[str, Any] = dict.fromkeys(STAGES)
        out["preprocess"] = s.get("preprocess")
        vision = s.get("vision_encode")
        if "encoder" in s and vision is not None:
            out["encoder"], out["pixel_decoder"] = s["encoder"], vision - s["encoder"]
        elif vision is not None:
            out["encoder"] = vision  # an engine runs encoder and pixel decoder as one graph
        out["fused_encoder"] = vision is not None and "encoder" not in s
        if "perceive_state" in s:
            projection = s.get("projection", 0.0)
            out["perception"], out["projection"] = s["perceive_state"] - projection, projection
        calls = self.record.llm_calls
        if calls:
            start, end, length = calls[0]
            out["llm_prefill"] = end - start
            out["prompt_tokens"] = length
            steps = calls[1:]
            out["generated_tokens"] = len(steps)
            if steps:
                # From the prefill's end to the last step's end: every token's head, argmax,
                # embedding and LLM step, with whatever Python runs in between.
                out["llm_decode_ms"] = steps[-1][1] - end
                out["llm_decode_per_token"] = out["llm_decode_ms"] / len(steps)
        if "seg_vision" in s:
            out["seg_decode"] = s["seg_vision"] + s.get("text_projector", 0.0)
            if "masks_for_queries" in s:
                out["postprocess"] = s["masks_for_queries"] - s["seg_vision"]
        out["prompt_ms"] = s.get("prompt")
        ms_keys = (*STAGES, "prompt_ms", "llm_decode_ms")
        return {k: (1000.0 * v if k in ms_keys and v is not None else v) for k, v in out.items()}
