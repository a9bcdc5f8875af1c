"""A training recipe: the runs that build a model, in order, each a `TrainConfig` written in TOML.

    omg-llava-ros train --recipe omg_llava_ros/training/recipes/embedded.toml --out runs/recipe
    omg-llava-ros train --recipe ... --out runs/recipe --runs v22 --init-from DIR

Each `[[run]]` has a `name` and any `TrainConfig` fields (unknown names are an error); it trains in
`OUT/<name>` and exports `OUT/<name>/model`. `init_from` may name an earlier run (its exported
model), "embedded" (the shipped model) or a directory. A run whose export is complete is skipped and
an interrupted one resumes from its checkpoints (`trainer.train`), so the recipe can be carried on
over separate invocations. `--init-from` replaces the first selected run's start, e.g. to fine-tune
a copy of an earlier shipped model instead of retraining the runs before it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import tomllib

from omg_llava_ros.training import data
from omg_llava_ros.training.config import TrainConfig

DONE_FILE = "RECIPE_DONE.json"
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def _field_value(name: str, value: Any) -> Any:
    default = getattr(TrainConfig(), name)
    if isinstance(default, data.ExistenceNegatives):
        return data.ExistenceNegatives(**value)
    if isinstance(default, tuple):
        return _as_tuple(value)
    return value


def load_recipe(path: str | Path) -> list[dict[str, Any]]:
    """The runs of a recipe file, in order, each a dict with "name" and `TrainConfig` fields.
    Raises ValueError naming the file for an unknown field, a missing or repeated name, or an
    `init_from` that names a later run."""
    path = Path(path)
    try:
        runs = tomllib.loads(path.read_text()).get("run", [])
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: not a readable recipe: {exc}") from exc
    if not runs:
        raise ValueError(f"{path}: no [[run]] tables")
    names: list[str] = []
    for run in runs:
        name = run.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise ValueError(f"{path}: every run needs a unique name (got {name!r})")
        unknown = sorted(set(run) - set(_FIELDS) - {"name", "out_dir"})
        if unknown or "out_dir" in run:
            raise ValueError(f"{path}: run {name!r}: not TrainConfig fields (or out_dir, set by the recipe): {unknown}")
        names.append(name)
    for i, run in enumerate(runs):
        start = run.get("init_from")
        if start in names and names.index(start) >= i:
            raise ValueError(f"{path}: run {run['name']!r} starts from {start!r}, which is not an earlier run")
    return runs


def run_config(run: dict[str, Any], out: Path, init_from: str | None = None) -> TrainConfig:
    """The `TrainConfig` of one recipe run trained in `out / name`; an `init_from` naming a run
    becomes that run's exported model; `init_from` (the argument) replaces the run's own."""
    fields = {k: _field_value(k, v) for k, v in run.items() if k != "name"}
    start = init_from if init_from is not None else fields.get("init_from")
    if start is not None and start != "embedded" and not Path(start).is_dir():
        start = str(out / start / "model")
    fields["init_from"] = start
    return TrainConfig(out_dir=str(out / run["name"]), **fields)


def run_recipe(
    path: str | Path,
    out: str | Path,
    only: list[str] | None = None,
    init_from: str | None = None,
    export_dtype: str = "float16",
) -> dict[str, Any]:
    """Train the recipe's runs (or those named in `only`) in order; returns per run its export and
    minutes this invocation (None where it was already done)."""
    import torch

    from omg_llava_ros.training.trainer import train

    runs, out = load_recipe(path), Path(out)
    names = [r["name"] for r in runs]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"{path}: no runs named {unknown} (runs: {names})")
    selected = [r for r in runs if only is None or r["name"] in only]
    report: dict[str, Any] = {}
    for i, run in enumerate(selected):
        cfg = run_config(run, out, init_from if i == 0 else None)
        folder, export = Path(cfg.out_dir), Path(cfg.out_dir) / "model"
        if (folder / DONE_FILE).is_file():
            report[run["name"]] = {"model": str(export), "minutes": None}
            continue
        if cfg.init_from is not None and cfg.init_from != "embedded" and not Path(cfg.init_from).is_dir():
            raise FileNotFoundError(f"run {run['name']!r} starts from {cfg.init_from}, which does not exist yet")
        t0 = time.monotonic()
        model = train(cfg)
        model.save_pretrained(export, dtype=getattr(torch, export_dtype))
        minutes = round((time.monotonic() - t0) / 60, 1)
        (folder / DONE_FILE).write_text(json.dumps({"minutes_last_invocation": minutes, "init_from": cfg.init_from}))
        report[run["name"]] = {"model": str(export), "minutes": minutes}
    return report
