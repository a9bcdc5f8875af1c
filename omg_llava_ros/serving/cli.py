"""`omg-llava-ros serve`: export a model's vision graphs (once) and start the Triton server on them.

    omg-llava-ros serve [--model SPEC ...] [--http-port 8000] [--max-batch 4] [--server-python PY]

The server runs in its own Python environment (PyTriton pins numpy < 2): `--server-python`, else
$OMG_LLAVA_ROS_TRITON_PYTHON, else `.venv-triton/bin/python` in a source checkout, else this
interpreter if PyTriton imports in it. This process exports what is missing and then becomes the
server (exec), so SIGTERM to it stops the server.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from omg_llava_ros.loading import MODEL_HELP
from omg_llava_ros.serving.triton_server import SERVER_OPTIONS, add_server_arguments

ENV_SERVER_PYTHON = "OMG_LLAVA_ROS_TRITON_PYTHON"
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
REQUIREMENTS = Path(__file__).resolve().parent / "requirements-triton.txt"
SETUP_HINT = f"python3 -m venv .venv-triton && .venv-triton/bin/pip install -r {REQUIREMENTS}"


def _has_pytriton(python: str) -> bool:
    try:
        done = subprocess.run([python, "-c", "import pytriton"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def find_server_python(explicit: str | None = None) -> str:
    """The interpreter that runs the server (see the module docstring); ValueError naming the set-up
    command when there is none."""
    if explicit:
        if not _has_pytriton(explicit):
            raise ValueError(f"{explicit} cannot import pytriton; set up the server environment: {SETUP_HINT}")
        return explicit
    candidates = [os.environ.get(ENV_SERVER_PYTHON), str(PACKAGE_PARENT / ".venv-triton" / "bin" / "python")]
    for python in [c for c in candidates if c and Path(c).exists()] + [sys.executable]:
        if _has_pytriton(python):
            return python
    raise ValueError(f"no Python environment with PyTriton found; set one up: {SETUP_HINT}")


def server_command(python: str, export_dirs: list[Path], args: Any) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the server process."""
    argv = [python, "-m", "omg_llava_ros.serving.triton_server", "--engines", *map(str, export_dirs)]
    for flag in SERVER_OPTIONS:
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_PARENT), env.get("PYTHONPATH", "")) if p)
    return argv, env


def export_for_serving(spec: str | None, cache_dir: str | None) -> Path:
    """The export folder of the model `spec` names, exporting it first where the cache lacks it."""
    from omg_llava_ros.engines.backend import EngineOptions, prepare_onnx
    from omg_llava_ros.engines.onnxruntime_backend import session_graph
    from omg_llava_ros.loading import cli_model

    model = cli_model(spec)
    exported = prepare_onnx(model, EngineOptions(cache_dir=cache_dir, build_if_missing=True))
    for role in exported.roles:
        session_graph(exported, role)  # the copy with fused GELUs, which the server prefers
    return exported.directory


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        python = find_server_python(args.server_python)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    folders = [export_for_serving(spec, args.cache_dir) for spec in (args.model or [None])]
    argv, env = server_command(python, folders, args)
    print(f"serve: {' '.join(argv)}", file=sys.stderr, flush=True)
    os.execve(python, argv, env)  # the server replaces this process: signals reach it directly
    return 0  # not reached


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the vision graphs of models on a Triton server (many robots)")
    p.add_argument("--model", action="append", help=MODEL_HELP + " (repeat to serve several)")
    p.add_argument("--cache-dir", default=None, help="engine cache (default: as build-engines)")
    p.add_argument("--server-python", default=None, help="interpreter of the server's environment (PyTriton)")
    add_server_arguments(p)
    p.set_defaults(func=cmd_serve)
