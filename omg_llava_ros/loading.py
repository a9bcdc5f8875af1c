"""One way to name and load a model, shared by every CLI, the node, the bench and the replay.

A model spec is one of:

- empty (`""` or None): the embedded default shipped in the package;
- a model directory (written by `OmgLlava.save_pretrained`, `train` or `convert-official`);
- `config:NAME`: a preset (`tiny`, `embedded`, `official-7b`) with random weights, for smoke tests
  and speed figures only — its answers and masks mean nothing.

A bare preset name (`tiny`) that is not a directory reads as `config:tiny`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omg_llava_ros.model.omg_llava import OmgLlava

log = logging.getLogger(__name__)

RANDOM_PREFIX = "config:"
MODEL_HELP = (
    "model directory; config:NAME for random weights of a preset (tiny, embedded, official-7b); "
    "default: the embedded model"
)


@dataclass(frozen=True)
class ModelSpec:
    """kind: "embedded" | "directory" | "random"; value: the directory or the preset name."""

    kind: str
    value: str | None = None

    def __str__(self) -> str:
        if self.kind == "embedded":
            return "embedded"
        return f"{RANDOM_PREFIX}{self.value}" if self.kind == "random" else str(self.value)


def parse_model_spec(spec: str | Path | None) -> ModelSpec:
    """The spec a user wrote → what it names; ValueError for an unknown preset."""
    from omg_llava_ros.model.config import PRESETS

    text = "" if spec is None else str(spec)
    if not text:
        return ModelSpec("embedded")
    name = text.removeprefix(RANDOM_PREFIX) if text.startswith(RANDOM_PREFIX) else None
    if name is None and text in PRESETS and not Path(text).is_dir():
        name = text
    if name is None:
        return ModelSpec("directory", text)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} in model spec {text!r}; known: {sorted(PRESETS)}")
    return ModelSpec("random", name)


def load_model(
    spec: str | Path | ModelSpec | None = None, device: str = "cpu", backend: str = "torch", **backend_options: Any
) -> OmgLlava:
    """Load the model `spec` names on `device` with its vision on `backend` (see
    `model.vision_backend`; `backend_options` go to it, e.g. `url` for "triton").
    FileNotFoundError when the directory (or the embedded model) is absent."""
    from omg_llava_ros.model.omg_llava import OmgLlava

    parsed = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    if parsed.kind == "random":
        log.warning("model %s: RANDOM weights (smoke tests and speed only: answers and masks mean nothing)", parsed)
        return OmgLlava.from_config(parsed.value, device=device, backend=backend, **backend_options)
    return OmgLlava.from_pretrained(parsed.value, device=device, backend=backend, **backend_options)


def add_model_argument(parser: argparse.ArgumentParser, help_text: str = MODEL_HELP) -> None:
    """The `--model SPEC` option every command takes."""
    parser.add_argument("--model", default=None, help=help_text)


def resolve_device(device: str) -> str:
    """ "auto" → "cuda" where a CUDA GPU is visible, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cli_model(spec: str | None, device: str = "cpu", backend: str = "torch") -> Any:
    """`load_model` for a command line: a missing model, an unknown preset or engines that are not built
    exit with the reason."""
    from omg_llava_ros.engines.spec import EngineError  # light: no torch, no engines loaded

    try:
        return load_model(spec, resolve_device(device), backend)
    except (FileNotFoundError, ValueError, EngineError) as err:
        raise SystemExit(f"error: {err}") from None
