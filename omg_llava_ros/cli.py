"""The `omg-llava-ros` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from omg_llava_ros.loading import add_model_argument

log = logging.getLogger("omg_llava_ros")


def load_image(spec: str) -> np.ndarray:
    """An image file (PNG, JPEG, …) as RGB, or `scene:SEED[:SIZE]` for a generated tabletop scene."""
    if spec.startswith("scene:"):
        from omg_llava_ros.toyworld import render, sample_scene

        parts = spec.split(":")
        seed = int(parts[1])
        size = int(parts[2]) if len(parts) > 2 else 256
        rng = np.random.default_rng(seed)
        return render(sample_scene(rng), size=size, rng=rng).image
    import cv2

    data = cv2.imread(spec, cv2.IMREAD_COLOR)
    if data is None:
        raise SystemExit(f"error: cannot read image {spec!r}")
    return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)


def load_model(spec: str | None, backend: str = "torch"):
    """The model a `--model` spec names (`omg_llava_ros.loading`) with its vision on `backend`;
    exits with the reason if absent."""
    from omg_llava_ros.loading import cli_model

    return cli_model(spec, backend=backend)


def overlay(image: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    palette = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180], [70, 240, 240]])
    out = image.astype(np.float32).copy()
    for i, mask in enumerate(masks):
        out[mask] = 0.45 * out[mask] + 0.55 * palette[i % len(palette)]
    return out.astype(np.uint8)


def cmd_ask(args: argparse.Namespace) -> int:
    from omg_llava_ros import Prompt

    image = load_image(args.image)
    model = load_model(args.model)
    prompts = []
    text = args.prompt
    if args.box is not None:
        prompts.append(Prompt.box(*args.box))
    if args.point is not None:
        prompts.append(Prompt.point(*args.point))
    if prompts and "<region>" not in text and "<mark>" not in text:
        text = text.rstrip() + " <region>" if "?" not in text else text.replace("?", " <region>?", 1)
    result = model.chat(image, text, prompts=prompts)
    record = {
        "prompt": text,
        "text": result.text,
        "clean_text": result.clean_text,
        "segments": [
            {"phrase": s.phrase, "score": round(s.score, 4), "box": s.box, "area": int(s.mask.sum())}
            for s in result.segments
        ],
    }
    if args.out:
        import cv2

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / "image.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        vis = overlay(image, [s.mask for s in result.segments])
        cv2.imwrite(str(out / "overlay.png"), cv2.cvtColor(vis, cv2.COLOR_RGB2BGR))
        for i, s in enumerate(result.segments):
            cv2.imwrite(str(out / f"mask_{i}.png"), s.mask.astype(np.uint8) * 255)
        (out / "result.json").write_text(json.dumps(record, indent=2))
        record["out"] = str(out)
    if args.json:
        print(json.dumps(record))
    else:
        print(result.text)
        for i, s in enumerate(result.segments):
            print(f"  segment {i}: phrase={s.phrase!r} score={s.score:.3f} box={s.box} area={int(s.mask.sum())}")
        if args.out:
            print(f"wrote {args.out}/overlay.png and result.json")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import time

    import torch

    from omg_llava_ros.training.config import TrainConfig
    from omg_llava_ros.training.trainer import train

    logging.getLogger().setLevel(logging.INFO)
    steps = {f"stage{i}_steps": getattr(args, f"stage{i}_steps") for i in range(6)}
    if args.recipe:
        from omg_llava_ros.training.recipe import run_recipe

        overridden = [k for k, v in steps.items() if v is not None] + (["--minutes"] if args.minutes else [])
        if overridden:
            raise SystemExit(f"train --recipe: the recipe sets the steps; drop {overridden}")
        report = run_recipe(args.recipe, args.out, args.runs, args.init_from, args.export_dtype)
        print(json.dumps(report))
        return 0
    if args.runs:
        raise SystemExit("train --runs needs --recipe")
    cfg = TrainConfig(
        out_dir=args.out,
        seed=args.seed,
        perception_prior="none" if args.no_prior else "concat",
        stages=tuple(args.stages),
        perception_from=args.perception_from,
        bf16=args.bf16,
        budget_minutes=args.minutes,
        init_from=args.init_from,
        **{k: v for k, v in steps.items() if v is not None},  # unset: TrainConfig's defaults
    )
    t0 = time.monotonic()
    model = train(cfg)
    export = Path(args.export) if args.export else Path(args.out) / "model"
    model.save_pretrained(export, dtype=getattr(torch, args.export_dtype))
    print(json.dumps({"model": str(export), "wall_minutes_this_run": round((time.monotonic() - t0) / 60, 1)}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from omg_llava_ros.training.evaluate import SECTIONS, evaluate

    torch.set_num_threads(args.threads)
    model = load_model(args.model, backend=args.backend)
    sections = tuple(args.only) if args.only else SECTIONS
    result = evaluate(
        model, samples=args.samples, seed=args.seed, sections=sections, size=args.size, renderer=args.renderer
    )
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omg-llava-ros", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="ask about one image")
    ask.add_argument("image", help="image file, or scene:SEED[:SIZE] for a generated tabletop scene")
    ask.add_argument("prompt")
    group = ask.add_mutually_exclusive_group()
    group.add_argument("--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"))
    group.add_argument("--point", nargs=2, type=float, metavar=("X", "Y"))
    add_model_argument(ask)
    ask.add_argument("--out", default=None, help="write overlay.png, masks and result.json here")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.set_defaults(func=cmd_ask)

    tr = sub.add_parser("train", help="train the embedded model on the tabletop world (resumes)")
    tr.add_argument("--out", default="runs/embedded", help="run folder (checkpoints, log, tokenizer)")
    tr.add_argument("--export", default=None, help="where to write the trained model (default OUT/model)")
    tr.add_argument(
        "--export-dtype",
        choices=("float16", "float32"),
        default="float16",
        help="precision the exported weights are stored in (they load as float32 on the CPU); the "
        "embedded model is stored as float16",
    )
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--stage0-steps", type=int, default=None, help="default: TrainConfig's")
    tr.add_argument("--stage1-steps", type=int, default=None, help="default: TrainConfig's")
    tr.add_argument("--stage2-steps", type=int, default=None, help="default: TrainConfig's")
    tr.add_argument("--stage3-steps", type=int, default=None, help="default: TrainConfig's")
    tr.add_argument("--stage4-steps", type=int, default=None, help="default: TrainConfig's")
    tr.add_argument("--stage5-steps", type=int, default=None, help="default: TrainConfig's")
    tr.add_argument(
        "--stages",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4, 5],
        choices=range(8),
        help="0 perception, 1 projectors, 2 instruction tuning, 3 counting/existence, 4 fine-tune, 5 mask "
        "refiner, 6 the location pointer alone (training.pointer_fit), 7 its relation choice "
        "(training.relation_choice_fit)",
    )
    tr.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="fit the whole run into this many minutes: each stage gets its share and as many steps "
        "as fit (default: the full recipe's step counts)",
    )
    tr.add_argument("--no-prior", action="store_true", help="ablation: zero the perception-prior embedding")
    tr.add_argument("--perception-from", default=None, help="reuse a trained stage-0 checkpoint folder")
    tr.add_argument(
        "--recipe",
        default=None,
        help="a recipe file (TOML: the runs that build a model, e.g. omg_llava_ros/training/recipes/embedded.toml); "
        "each run trains in OUT/NAME",
    )
    tr.add_argument("--runs", nargs="+", default=None, help="with --recipe: only these runs (in recipe order)")
    tr.add_argument(
        "--init-from",
        default=None,
        help='start from this model directory ("embedded": the shipped one) instead of from scratch; with '
        "--recipe it replaces the first selected run's start",
    )
    tr.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: only where the CPU has native bf16, avx512_bf16 or AMX)",
    )
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a model on fresh tabletop scenes (JSON metrics)")
    add_model_argument(ev)
    ev.add_argument("--samples", type=int, default=200, help="samples per task")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--size", type=int, default=256, help="canvas size the scenes are drawn at (pixels)")
    ev.add_argument("--threads", type=int, default=2)
    ev.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="sections: referring_forms referring text region grounded_caption panoptic follow referring_alike "
        "(referring_forms: per form 1-6 and per command template, expressions drawn form first; referring: "
        "the shortest expression)",
    )
    ev.add_argument(
        "--renderer",
        choices=("ours", "pil"),
        default="ours",
        help="who draws the scenes: our renderer, or an independent Pillow one (robustness)",
    )
    ev.add_argument(
        "--backend",
        choices=("torch", "onnxruntime", "auto"),
        default="torch",
        help="where the vision parts run (auto: what the node picks on this machine; on a CPU, ONNX Runtime)",
    )
    ev.add_argument("--json", action="store_true", help="one line of JSON")
    ev.set_defaults(func=cmd_eval)
    from omg_llava_ros.convert.cli import add_convert_parser  # the converter's own subcommand

    add_convert_parser(sub)
    from omg_llava_ros.engines.cli import add_build_engines_parser  # the engines' own subcommand

    add_build_engines_parser(sub)
    from omg_llava_ros.replay.cli import add_replay_parser  # replay and make-demo-bag

    add_replay_parser(sub)
    from omg_llava_ros.replay.soak import add_soak_parser  # long replay with faults

    add_soak_parser(sub)
    from omg_llava_ros.serving.cli import add_serve_parser  # the Triton server

    add_serve_parser(sub)
    from omg_llava_ros.bench.cli import add_bench_parser  # the benchmark's own subcommand

    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
