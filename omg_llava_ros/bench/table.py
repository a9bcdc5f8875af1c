"""The README's figures as a Markdown table, from the JSON of `omg-llava-ros bench --json` (CPU,
embedded model) and of the GPU script (official size):

    python -m omg_llava_ros.bench.table cpu.json [gpu.json]

A file may hold the whole output of a run: the last line that parses as JSON is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from omg_llava_ros.bench.probe import STAGES


def load_report(path: str | Path) -> dict[str, Any]:
    for line in reversed(Path(path).read_text().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"{path}: no JSON report line")


def _cell(value: float | None, unit: str = "ms") -> str:
    return "–" if value is None else f"{value:.1f} {unit}" if unit else f"{value:.2f}×"


def _stage(report: dict[str, Any] | None, stage: str) -> str:
    if report is None or not report.get("stages"):
        return "–"
    row = report["stages"][stage]
    command, follow = row["command_ms"], row["follow_ms"]
    if follow is None or command is None:
        return _cell(command)
    return f"{_cell(command)} ({_cell(follow)} in follow)"


def readme_table(cpu: dict[str, Any], gpu: dict[str, Any] | None = None) -> str:
    gpu_head = "GPU, official size (optimised)" if gpu else "GPU, official size"
    lines = [f"| stage | CPU, embedded model | {gpu_head} |", "|---|---|---|"]
    for stage in STAGES:
        lines.append(f"| {stage.replace('_', ' ')} | {_stage(cpu, stage)} | {_stage(gpu, stage)} |")
    g = gpu or {}
    lines += [
        f"| **command → mask** | {_cell(cpu['command_to_mask_ms'])} | {_cell(g.get('command_to_mask_ms'))} |",
        f"| **follow mode** | {_cell(cpu['follow_hz'], 'Hz')} | {_cell(g.get('follow_hz'), 'Hz')} |",
        f"| ONNX Runtime vs PyTorch (encoder + decoder) | {_cell(cpu.get('onnxruntime_speedup'), '')} | – |",
    ]
    m = cpu["machine"]
    where = [
        f"CPU: {m['cpu']}, {cpu['model']['threads']} thread(s) of {m['cores']} core(s), vision "
        f"{cpu['model']['backend']}, torch {m['torch']}, ONNX Runtime {m['onnxruntime']}, {m['date'][:10]}"
    ]
    if gpu:
        name = (gpu["machine"].get("gpu") or {}).get("name", gpu["device"])
        where.append(f"GPU: {name}, torch {gpu['machine']['torch']}, {gpu['machine']['date'][:10]}")
    return "\n".join(lines) + "\n\n" + "; ".join(where) + "."


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omg_llava_ros.bench.table", description=__doc__.split("\n")[0])
    p.add_argument("cpu", help="JSON of `omg-llava-ros bench --json` (the embedded model on the CPU)")
    p.add_argument("gpu", nargs="?", default=None, help="JSON of the GPU script (official size)")
    args = p.parse_args(argv)
    print(readme_table(load_report(args.cpu), load_report(args.gpu) if args.gpu else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
