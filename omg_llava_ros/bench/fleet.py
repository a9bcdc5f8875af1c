"""Many robots, one server: the Triton backend's cost per call and a fleet's follow-mode throughput.

Measured in one run against local ONNX Runtime on the same frames:
- per call: the encoder (+ pixel decoder) and one decoder call, median ms, local vs. through the
  server (the difference is what the network hop, serialisation and the server add);
- throughput: N clients (threads, each with its own model and connection, as N robots) following
  the objects of one command at full speed against one server, frames/s in all, for each N, and as a
  ratio to one local pipeline's follow rate.
On a single machine the server and the clients share its cores, so the ratios say what the hop costs
there; on a GPU server the encoder leaves the robots' CPUs altogether.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: connections, arenas
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _follow_rate(models: Sequence[Any], images: list[np.ndarray], segments: list[Any], frames: int) -> float:
    """Frames/s of all `models` following `segments` over `images` at once, one thread each."""
    start = threading.Barrier(len(models) + 1)
    errors: list[BaseException] = []

    def client(model: Any, offset: int) -> None:
        start.wait()
        try:
            for k in range(frames):
                model.follow(images[(k + offset) % len(images)], segments)
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(m, i)) for i, m in enumerate(models)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"a follow client failed: {errors[0]}") from errors[0]
    return len(models) * frames / wall


def bench_fleet(
    url: str,
    clients: Sequence[int] = (1, 2, 4),
    frames: int = 40,
    repeats: int = 20,
    seed: int = 0,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The figures of the module docstring as a dict (see `format_fleet`)."""
    from omg_llava_ros.model.omg_llava import OmgLlava
    from omg_llava_ros.training.evaluate import _scene

    if not clients or min(clients) < 1 or frames < 1 or repeats < 1:
        raise ValueError("clients, frames and repeats must be positive")
    rng = np.random.default_rng(seed)
    scenes = [_scene(rng, 256, "ours") for _ in range(8)]
    images = [s.image for s in scenes]
    local = OmgLlava.from_pretrained(backend="onnxruntime", build_if_missing=True)
    remote = OmgLlava.from_pretrained(backend="triton", url=url)
    target = scenes[0].objects[0]
    answer = local.chat(images[0], f"Segment the {target.color} {target.shape}.")
    if not answer.segments:
        raise RuntimeError("the reference command grounded no object; nothing to follow")
    segments = answer.segments

    progress("timing one encoder and one decoder call, local and through the server")
    pixels, _ = local.preprocess(images[0])
    per_call = {}
    for name, model in (("onnxruntime", local), ("triton", remote)):
        _, memory = model.vision.encode(pixels)
        query = torch.zeros(1, 4, model.vision.spec.hidden_dim)
        per_call[name] = {
            "encoder_ms": _median_ms(lambda m=model: m.vision.encode(pixels), repeats),
            "decoder_ms": _median_ms(lambda m=model, q=query, mem=memory: m.vision.decode(q, q, mem), repeats),
        }
    overhead = {k: per_call["triton"][k] - per_call["onnxruntime"][k] for k in ("encoder_ms", "decoder_ms")}

    progress(f"one local pipeline following for {frames} frames")
    local_hz = _follow_rate([local], images, segments, frames)
    throughput = {}
    for n in clients:
        progress(f"{n} client(s) following through the server, {frames} frames each")
        fleet = [remote] + [OmgLlava.from_pretrained(backend="triton", url=url) for _ in range(n - 1)]
        hz = _follow_rate(fleet, images, segments, frames)
        throughput[str(n)] = {"frames_per_s": hz, "ratio_to_local": hz / local_hz}
    batches = remote.vision.served()["models"][remote.vision.fingerprint]["encoder_batch_runs"]
    return {
        "url": url,
        "per_call_ms": per_call,
        "overhead_ms": overhead,
        "local_follow_hz": local_hz,
        "clients": throughput,
        "server_encoder_batch_runs": batches,
        "frames_per_client": frames,
    }


def format_fleet(r: dict[str, Any]) -> str:
    c = r["per_call_ms"]
    lines = [
        "",
        f"Triton server {r['url']} against local ONNX Runtime (same frames, same run)",
        f"{'call':10s} {'local ms':>9s} {'server ms':>10s} {'added ms':>9s}",
    ]
    for key, label in (("encoder_ms", "encoder"), ("decoder_ms", "decoder")):
        local, remote = c["onnxruntime"][key], c["triton"][key]
        lines.append(f"{label:10s} {local:9.2f} {remote:10.2f} {remote - local:9.2f}")
    lines.append(f"one local pipeline, follow mode: {r['local_follow_hz']:.2f} Hz")
    lines.append(f"{'clients':>7s} {'frames/s':>9s} {'× local':>8s}")
    for n, v in r["clients"].items():
        lines.append(f"{n:>7s} {v['frames_per_s']:9.2f} {v['ratio_to_local']:8.2f}")
    lines.append(f"server encoder runs by batch size: {r['server_encoder_batch_runs']}")
    return "\n".join(lines)
