"""Official-size GPU benchmark with random weights: command → first mask and follow mode, eager
against optimised.

    python -m omg_llava_ros.bench.gpu_official [--json]        # a GPU with ≥ 24 GB: a few minutes
    omg-llava-ros bench --config official-7b --device cuda [--json]
    python -m omg_llava_ros.bench.gpu_official --device cpu --config tiny   # checks the logic on a CPU

The model is `official-7b` — ConvNeXt-L at 1024², the full OMG decoder (300 queries, 9 layers), the
InternLM2-7B-shaped LLM in bf16 (~15 GB) — built directly on the device with its random init (a few
milliseconds there; nothing is downloaded). Speed does not depend on the weights' values. A small
local tokenizer stands in for InternLM2's: its ids are valid rows of the 92 548-row embedding.
The frames are 640×480 tabletop scenes; each command's answer is scripted as "<p> … </p> [SEG]." so
the measured path is the real one. Everything runs through `PerceptionPipeline`, as the ROS node does.

Variants, each timed per stage (`StageProbe`) and end to end:
- eager: the model as `from_pretrained(device="cuda")` runs it — fp32 vision, bf16 LLM, dynamic KV
  cache, SDPA attention, preprocessing on the CPU (PIL);
- optimised: the eager model plus, one at a time, preprocessing on the GPU, bf16 autocast with
  channels-last convolutions, torch.compile of the encoder, of the pixel decoder and of the
  transformer decoder, a static KV cache, and the decode step compiled with CUDA graphs. Each is
  checked with a full command and two follow frames right after it is applied; one that fails is
  undone and reported in `optimisations`, and the rest go on, so the eager numbers always come out.
With `--json` the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from omg_llava_ros.bench.gpu_preprocess import DevicePreprocessor
from omg_llava_ros.bench.machine import machine_info
from omg_llava_ros.bench.probe import StageProbe
from omg_llava_ros.bench.runner import (
    BenchOptions,
    check_goals,
    device_sync,
    make_workloads,
    run_workload,
    summarise,
    time_workloads,
)
from omg_llava_ros.bench.static_decode import StaticCacheGenerator, plain_rope_for_static_cache, use_generator
from omg_llava_ros.model.omg_llava import OmgLlava

log = logging.getLogger(__name__)

# Issue 8's budget for the official size on an H100 (the optimised variant).
GPU_GOALS: dict[str, tuple[str, float]] = {"command_to_mask_ms": ("<=", 120.0), "follow_hz": (">=", 60.0)}
UNVERIFIED = (
    "Checked on a CPU with the tiny config only (eager and static-cache paths, torch.compile with the "
    "'eager' backend); the CUDA parts — inductor kernels, CUDA graphs, bf16 autocast on the GPU, the "
    "timings — run for the first time on a GPU."
)


@dataclass
class GpuBenchOptions:
    """compile: "auto" (on for CUDA), "on" or "off"; compile_backend: torch.compile's backend
    ("eager" traces without generating code: a quick check of the wiring on a CPU)."""

    config: str = "official-7b"
    device: str = "cuda"
    repeats: int = 5
    warmup: int = 2
    follow_frames: int = 20
    frame: tuple[int, int] = (640, 480)
    compile: str = "auto"
    compile_backend: str = "inductor"
    max_cache_len: int = 2048
    variants: tuple[str, ...] = ("eager", "optimised")
    seed: int = 0
    threads: int | None = None  # CPU threads for torch (None: torch's default)

    def __post_init__(self) -> None:
        if self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile must be auto, on or off, got {self.compile!r}")
        unknown = set(self.variants) - {"eager", "optimised"}
        if unknown or not self.variants:
            raise ValueError(f"variants are eager and/or optimised, got {self.variants}")

    @property
    def compiling(self) -> bool:
        return self.compile == "on" or (self.compile == "auto" and torch.device(self.device).type == "cuda")


@dataclass
class Optimisation:
    name: str
    applied: bool = False
    seconds: float = 0.0  # to apply it and run the check (compilation happens there)
    note: str = ""


@dataclass
class Setup:
    """What the runs of a variant execute under."""

    device: torch.device
    autocast: bool = False
    generator: StaticCacheGenerator | None = None
    optimisations: list[Optimisation] = field(default_factory=list)

    @contextmanager
    def running(self, probe: StageProbe | None) -> Iterator[None]:
        generator = self.generator
        with ExitStack() as stack:
            if self.autocast:
                stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
            if generator is not None:
                generator.probe = probe
                stack.enter_context(use_generator(generator))
            try:
                yield
            finally:
                if generator is not None:
                    generator.probe = None

    def probe(self, model: OmgLlava) -> StageProbe:
        # With a static-cache generator the LLM calls are timed by the generator, not by hooks.
        return StageProbe(model, device_sync(self.device), llm_hooks=self.generator is None)


# -- the model ------------------------------------------------------------------------------------
def build_model(config_name: str, device: torch.device, llm_dtype: torch.dtype | None = None) -> OmgLlava:
    """Random weights, allocated and initialised on `device`; the LLM in bf16 on a GPU."""
    from omg_llava_ros.model.config import get_config
    from omg_llava_ros.model.language_model import (
        DEFAULT_CORPUS,
        add_special_tokens,
        build_language_model,
        train_tokenizer,
    )

    config = get_config(config_name)
    tokenizer = train_tokenizer(DEFAULT_CORPUS)
    vocab = add_special_tokens(tokenizer)
    if config.language_model.vocab_size <= 0:
        config.language_model.vocab_size = vocab
    elif vocab > config.language_model.vocab_size:
        raise ValueError(f"the stand-in tokenizer ({vocab}) exceeds the LLM vocabulary")
    dtype = llm_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    llm = build_language_model(config.language_model, dtype=dtype, device=device)
    model = OmgLlava(config, tokenizer=tokenizer, llm=llm, device=device)
    model._init_class_embed()
    return model


# -- optimisations --------------------------------------------------------------------------------
def _undo_attr(obj: Any, name: str) -> Callable[[], None]:
    """Undo for an instance attribute set over a method (e.g. a compiled forward)."""
    return lambda: delattr(obj, name) if name in obj.__dict__ else None


def optimisation_steps(
    model: OmgLlava, setup: Setup, options: GpuBenchOptions
) -> list[tuple[str, Callable[[], tuple[Callable[[], None], str]]]]:
    """(name, apply) in order; apply() changes the model or setup and returns (undo, note)."""
    device = setup.device

    def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
        return torch.compile(fn, backend=options.compile_backend, dynamic=False)

    def sdpa() -> tuple[Callable[[], None], str]:
        impl = getattr(model.llm.config, "_attn_implementation", None)
        if impl != "sdpa":
            model.llm.set_attn_implementation("sdpa")
            return (lambda: model.llm.set_attn_implementation(impl)), f"LLM attention switched from {impl} to sdpa"
        return (lambda: None), "LLM attention was already sdpa (also in the eager variant)"

    def device_preprocess() -> tuple[Callable[[], None], str]:
        original = model.preprocess
        model.preprocess = DevicePreprocessor(original, device)

        def undo() -> None:
            model.preprocess = original

        return undo, "letterbox, PIL-bicubic resize and normalisation on the device (≤ 1 grey level from PIL)"

    def bf16() -> tuple[Callable[[], None], str]:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        setup.autocast = True
        torch.backends.cuda.matmul.allow_tf32 = True
        for module in (model.image_encoder, model.omg_decoder.pixel_decoder):
            module.to(memory_format=torch.channels_last)

        def undo() -> None:
            setup.autocast = False
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for module in (model.image_encoder, model.omg_decoder.pixel_decoder):
                module.to(memory_format=torch.contiguous_format)

        return undo, "vision in bf16 (autocast), channels-last convolutions, TF32 for what stays fp32"

    def compile_forward(module: torch.nn.Module) -> Callable[[], tuple[Callable[[], None], str]]:
        def apply() -> tuple[Callable[[], None], str]:
            # The bound forward, not the module: hooks (the stage probe's) stay outside the graph.
            module.forward = compiled(module.forward)
            return _undo_attr(module, "forward"), f"torch.compile ({options.compile_backend})"

        return apply

    def compile_decoder() -> tuple[Callable[[], None], str]:
        dec = model.omg_decoder
        dec.decode = compiled(dec.decode)
        return _undo_attr(dec, "decode"), f"torch.compile ({options.compile_backend}); one graph per query count"

    def static_cache(step_mode: str | None) -> Callable[[], tuple[Callable[[], None], str]]:
        def apply() -> tuple[Callable[[], None], str]:
            previous = setup.generator
            rotary = getattr(model.llm.base_model, "rotary_emb", None)
            rope_type = getattr(rotary, "rope_type", None)
            note = plain_rope_for_static_cache(model.llm, options.max_cache_len)
            setup.generator = StaticCacheGenerator(
                model.llm, options.max_cache_len, compile_step=step_mode, compile_backend=options.compile_backend
            )

            def undo() -> None:
                setup.generator = previous
                if rope_type is not None and previous is None:
                    rotary.rope_type = rope_type

            what = f"static KV cache of {options.max_cache_len}"
            if step_mode is not None:
                what += f"; decode step compiled ({options.compile_backend}, mode {step_mode})"
            return undo, "; ".join(x for x in (what, note) if x)

        return apply

    steps: list[tuple[str, Callable[[], tuple[Callable[[], None], str]]]] = [
        ("sdpa_attention", sdpa),
        ("device_preprocessing", device_preprocess),
        ("bf16_channels_last", bf16),
    ]
    if options.compiling:
        steps += [
            ("compile_encoder", compile_forward(model.image_encoder)),
            ("compile_pixel_decoder", compile_forward(model.omg_decoder.pixel_decoder)),
            ("compile_decoder", compile_decoder),
        ]
    steps.append(("static_kv_cache", static_cache(None)))
    if options.compiling:
        mode = "reduce-overhead" if device.type == "cuda" else "default"  # CUDA graphs on a GPU
        steps.append(("compile_decode_step", static_cache(mode)))
    return steps


def optimise(
    model: OmgLlava,
    setup: Setup,
    options: GpuBenchOptions,
    check: Callable[[], None],
    say: Callable[[str], None],
) -> None:
    """Apply every optimisation in turn, each followed by `check()` (a full command + follow frames,
    which is also where torch.compile compiles); a failure undoes that one and is reported."""
    for name, apply in optimisation_steps(model, setup, options):
        item = Optimisation(name)
        setup.optimisations.append(item)
        t0 = time.perf_counter()
        undo: Callable[[], None] | None = None
        try:
            undo, item.note = apply()
            check()
            item.applied = True
        except Exception as err:
            if undo is not None:
                try:
                    undo()
                except Exception:
                    log.exception("undoing %s failed", name)
            first = traceback.format_exception_only(type(err), err)[-1].strip()
            item.note = f"FAILED, not used: {first[:500]}"
            log.debug("optimisation %s failed", name, exc_info=True)
        item.seconds = round(time.perf_counter() - t0, 1)
        say(f"{name}: {'applied' if item.applied else 'not applied'} ({item.seconds} s) {item.note}")


# -- running --------------------------------------------------------------------------------------
def measure_variant(
    model: OmgLlava, setup: Setup, options: GpuBenchOptions, rng: np.random.Generator, say: Callable[[str], None]
) -> dict[str, Any]:
    bench = BenchOptions(follow_frames=options.follow_frames, frame=options.frame)
    works = make_workloads(bench, 2 * (options.warmup + options.repeats), rng)
    total = options.warmup + options.repeats
    say(f"timing {total} commands ({options.warmup} warm-up), {options.follow_frames} frames each")
    plain, probed = time_workloads(
        model, works, options.warmup, scripted=True, probe=setup.probe(model), context=setup.running
    )
    summary = summarise(plain, probed)
    if setup.device.type == "cuda":
        summary["max_memory_gib"] = round(torch.cuda.max_memory_allocated(setup.device) / 2**30, 2)
    return summary


def run(options: GpuBenchOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    say = progress or (lambda msg: log.info("%s", msg))
    device = torch.device(options.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no CUDA GPU")
        free = torch.cuda.mem_get_info(device)[0] / 2**30
        if options.config == "official-7b" and free < 20:
            raise SystemExit(f"error: the official size needs ~18 GB of GPU memory; {free:.1f} GB free")
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    started = time.perf_counter()
    rng = np.random.default_rng(options.seed)
    say(f"building {options.config} with random weights on {device}")
    t0 = time.perf_counter()
    model = build_model(options.config, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report: dict[str, Any] = {
        "bench": "omg-llava-ros gpu-official",
        "config": options.config,
        "device": str(device),
        "machine": machine_info(),
        "build_s": round(time.perf_counter() - t0, 1),
        "parameters_billion": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "llm_dtype": str(next(model.llm.parameters()).dtype),
        "llm_attention": getattr(model.llm.config, "_attn_implementation", None),
        "variants": {},
        "notes": [],
        "unverified": UNVERIFIED if device.type == "cuda" else None,
    }
    say(f"built in {report['build_s']} s: {report['parameters_billion']} B parameters")

    if "eager" in options.variants:
        say("eager variant")
        _measure_into(report, "eager", lambda: measure_variant(model, Setup(device), options, rng, say), say)
    if "optimised" in options.variants:
        say("optimised variant: applying and checking each optimisation")
        setup = Setup(device)
        check_bench = BenchOptions(follow_frames=2, frame=options.frame)

        def check() -> None:
            work = make_workloads(check_bench, 1, rng)[0]
            with setup.running(None):
                run_workload(model, work, scripted=True, max_new_tokens=None)

        def optimised() -> dict[str, Any]:
            optimise(model, setup, options, check, say)
            summary = measure_variant(model, setup, options, rng, say)
            summary["optimisations"] = [asdict(o) for o in setup.optimisations]
            return summary

        _measure_into(report, "optimised", optimised, say)

    variants = report["variants"]
    best = variants.get("optimised") or variants.get("eager") or {}
    report["command_to_mask_ms"] = best.get("command_to_mask_ms")
    report["follow_hz"] = best.get("follow_hz")
    report["stages"] = best.get("stages")
    if "eager" in variants and "optimised" in variants:
        e, o = variants["eager"], variants["optimised"]
        report["speedup"] = {
            "command_to_mask": _ratio(e["command_to_mask_ms"], o["command_to_mask_ms"]),
            "follow": _ratio(o["follow_hz"], e["follow_hz"]),
        }
    report["goals"] = {name: check_goals(v, GPU_GOALS) for name, v in variants.items()}
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(options).items()}
    return report


def _measure_into(
    report: dict[str, Any], name: str, measure: Callable[[], dict[str, Any]], say: Callable[[str], None]
) -> None:
    """A variant that fails (e.g. a recompilation the check did not meet) is reported, not fatal."""
    try:
        report["variants"][name] = measure()
    except Exception as err:
        first = traceback.format_exception_only(type(err), err)[-1].strip()
        report["notes"].append(f"{name} variant failed: {first[:500]}")
        say(f"{name} variant failed: {first}")
        log.debug("%s variant failed", name, exc_info=True)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def format_report(r: dict[str, Any]) -> str:
    gpu = r["machine"].get("gpu") or {}
    lines = [
        f"OMG-LLaVA GPU bench: {r['config']} ({r['parameters_billion']} B parameters, random weights), {r['device']} "
        f"{gpu.get('name', '')}, LLM {r['llm_dtype']} {r['llm_attention']}, {r['machine']['date']}",
    ]
    names = list(r["variants"])
    if names:
        stages = r["variants"][names[0]]["stages"]
        header = f"{'stage':24s}" + "".join(f" {n + ' cmd':>14s} {n + ' follow':>16s}" for n in names)
        lines += ["", header]
        for stage in stages:
            cells = []
            for n in names:
                row = r["variants"][n]["stages"][stage]
                cells.append(f" {_fmt(row['command_ms']):>14s} {_fmt(row['follow_ms']):>16s}")
            lines.append(f"{stage:24s}" + "".join(cells))
        lines.append("")
    for n in names:
        v = r["variants"][n]
        lines.append(
            f"{n}: command → mask {_fmt(v['command_to_mask_ms'])} ms (p90 {_fmt(v['command_to_mask_p90_ms'])}), "
            f"follow {_fmt(v['follow_hz'])} Hz ({_fmt(v['follow_frame_ms'])} ms/frame), prompt {v['prompt_tokens']} "
            f"tokens, {v['generated_tokens']} generated"
        )
        for o in v.get("optimisations", []):
            lines.append(f"  {'+' if o['applied'] else '-'} {o['name']} ({o['seconds']} s): {o['note']}")
    if "speedup" in r:
        lines.append(f"speed-up: {r['speedup']}")
    for n, goals in r["goals"].items():
        text = ", ".join(f"{k} {g['goal']}: {'met' if g['met'] else 'NOT met'}" for k, g in goals.items())
        lines.append(f"goals (issue 8, official size on an H100) for {n}: {text}")
    lines += [f"note: {n}" for n in r["notes"]]
    if r.get("unverified"):
        lines.append(f"note: {r['unverified']}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m omg_llava_ros.bench.gpu_official", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="official-7b", help="official-7b (GPU), or tiny to check the logic")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--follow-frames", type=int, default=20)
    p.add_argument("--frame", default="640x480", help="camera frame WxH")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: check tracing only)")
    p.add_argument("--max-cache-len", type=int, default=2048, help="static KV cache length")
    p.add_argument("--variants", nargs="+", default=["eager", "optimised"], choices=("eager", "optimised"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p


def main(argv: list[str] | None = None) -> int:
    from omg_llava_ros.bench.cli import parse_frame

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        options = GpuBenchOptions(
            config=args.config,
            device=args.device,
            repeats=args.repeats,
            warmup=args.warmup,
            follow_frames=args.follow_frames,
            frame=parse_frame(args.frame),
            compile=args.compile,
            compile_backend=args.compile_backend,
            max_cache_len=args.max_cache_len,
            variants=tuple(args.variants),
            threads=args.threads,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if options.repeats < 1 or options.warmup < 0 or options.follow_frames < 1:
        raise SystemExit("error: --repeats and --follow-frames must be ≥ 1, --warmup ≥ 0")

    def progress(msg: str) -> None:
        print(f"gpu-bench: {msg}", file=sys.stderr, flush=True)

    report = run(options, progress)
    print(format_report(report))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
