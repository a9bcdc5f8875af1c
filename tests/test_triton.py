"""The Triton vision backend against a real Triton server (PyTriton) on loopback.

The server runs in its own environment (`omg_llava_ros/serving/requirements-triton.txt`; `.ci/run`
builds `.venv-triton`), started by the real `omg-llava-ros serve` command.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from omg_llava_ros.pipeline.driver import process_frame
from omg_llava_ros.pipeline.pipeline import PerceptionPipeline
from omg_llava_ros.pipeline.types import Frame
from omg_llava_ros.serving.cli import find_server_python

pytest.importorskip("tritonclient.http", reason="the Triton client is in requirements.txt")

try:
    SERVER_PYTHON = find_server_python()
except ValueError as err:  # pragma: no cover - .ci/run builds the server environment
    pytest.skip(f"no Triton server environment: {err}", allow_module_level=True)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Server:
    """`omg-llava-ros serve` for the embedded model on free ports; stopped with SIGTERM."""

    def __init__(self, max_batch: int = 4):
        self.http, self.grpc, self.metrics = _free_ports(3)
        self.max_batch = max_batch
        self.process: subprocess.Popen | None = None
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"omg_triton_{self.http}.log"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http}"

    def start(self, timeout_s: float = 180.0) -> Server:
        argv = [sys.executable, "-m", "omg_llava_ros.cli", "serve", "--server-python", SERVER_PYTHON]
        argv += ["--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics)]
        argv += ["--max-batch", str(self.max_batch), "--threads", "1"]
        out = self.log.open("w")
        self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "server ready" in self.log.read_text(errors="replace"):
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        tail = self.log.read_text(errors="replace")[-3000:]
        self.stop()
        raise AssertionError(f"the Triton server did not start:\n{tail}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def server():
    s = Server().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def models(server):
    from omg_llava_ros import OmgLlava

    local = OmgLlava.from_pretrained(backend="onnxruntime", build_if_missing=True)
    remote = OmgLlava.from_pretrained(backend="triton", url=server.url)
    return local, remote


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def _scenes(count: int, seed: int):
    from omg_llava_ros.training.evaluate import _scene

    rng = np.random.default_rng(seed)
    return [_scene(rng, 256, "ours") for _ in range(count)]


def test_remote_vision_answers_as_local_engines(models):
    local, remote = models
    assert type(remote.vision).__name__ == "TritonVision"
    masks = 0
    for scene in _scenes(3, seed=11):
        target = scene.objects[0]
        for question in (f"Segment the {target.color} {target.shape}.", "Describe the image."):
            a, b = local.chat(scene.image, question), remote.chat(scene.image, question)
            assert b.text == a.text
            assert len(b.segments) == len(a.segments)
            for x, y in zip(a.segments, b.segments, strict=True):
                assert _iou(x.mask, y.mask) >= 0.99
                masks += 1
            followed_a, followed_b = local.follow(scene.image, a.segments), remote.follow(scene.image, b.segments)
            for x, y in zip(followed_a, followed_b, strict=True):
                assert _iou(x.mask, y.mask) >= 0.99
        assert len(remote.perceive(scene.image)) == len(local.perceive(scene.image))
    assert masks >= 3  # the referring questions were grounded


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(models):
    _, remote = models
    vision = remote.vision
    images = [torch.from_numpy(np.random.default_rng(i).random((1, 3, 256, 256), dtype=np.float32)) for i in range(4)]
    alone = [vision.run_encoder(x)["last_stage"] for x in images]
    before = vision.served()["models"][vision.fingerprint]["encoder_batch_runs"]
    results: dict[tuple[int, int], torch.Tensor] = {}
    start = threading.Barrier(len(images))

    def client(i: int) -> None:
        start.wait()
        for k in range(6):
            results[i, k] = vision.run_encoder(images[i])["last_stage"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (i, _), out in results.items():
        torch.testing.assert_close(out, alone[i], rtol=1e-4, atol=1e-4)  # nobody got a neighbour's features
    after = vision.served()["models"][vision.fingerprint]["encoder_batch_runs"]
    batched = {size: after.get(size, 0) - before.get(size, 0) for size in after if int(size) > 1}
    assert sum(batched.values()) > 0, f"no request was batched: {before} -> {after}"


def test_memory_stays_on_the_server_and_a_forgotten_image_is_encoded_again(models):
    local, remote = models
    vision = remote.vision
    pixels, _ = local.preprocess(_scenes(1, seed=9)[0].image)
    last_stage, memory = vision.encode(pixels)
    assert memory.mask_features.device.type == "meta"  # nothing but shapes came back
    local_stage, local_memory = local.vision.encode(pixels)
    torch.testing.assert_close(last_stage, local_stage, rtol=1e-4, atol=1e-4)
    query = torch.randn(1, 3, vision.spec.hidden_dim, generator=torch.Generator().manual_seed(0))
    expected = local.vision.decode(query, query, local_memory, with_class=True)
    first = vision.decode(query, query, memory, with_class=True)
    vision._remote[id(memory.mask_features)][0] = "0" * 32  # as after an eviction or a server restart
    again = vision.decode(query, query, memory, with_class=True)
    assert vision._remote[id(memory.mask_features)][0] != "0" * 32  # encoded again under a new id
    for out in (first, again):
        torch.testing.assert_close(out.mask_logits[-1], expected.mask_logits[-1], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(out.class_logits, expected.class_logits, rtol=1e-3, atol=1e-3)


def test_a_server_with_other_weights_or_none_gives_a_clear_error(server, models):
    from omg_llava_ros.engines.triton_backend import TritonOptions, TritonVision, VisionServerError

    _, remote = models
    other = TritonVision(remote.vision.spec, "0" * 64, TritonOptions(url=server.url))
    with pytest.raises(VisionServerError, match="does not serve this model"):
        other.check_server()
    with pytest.raises(VisionServerError, match="has no model"):
        other.run_encoder(torch.zeros(1, 3, 256, 256))
    (closed,) = _free_ports(1)
    down = TritonVision(remote.vision.spec, remote.vision.fingerprint, TritonOptions(url=f"127.0.0.1:{closed}"))
    with pytest.raises(VisionServerError, match="unreachable"):
        down.run_encoder(torch.zeros(1, 3, 256, 256))


def test_server_killed_and_restarted_mid_stream_loses_no_frame(models):
    """Every frame is answered or reported while the server is down, and answers resume after it
    comes back on the same port (each call reconnects)."""
    from omg_llava_ros.engines.triton_backend import TritonOptions, triton_vision

    local, _ = models
    own = Server().start()
    try:
        from omg_llava_ros import OmgLlava

        remote = OmgLlava.from_pretrained()
        remote.vision = triton_vision(remote, TritonOptions(url=own.url, timeout_s=5.0))
        pipeline = PerceptionPipeline(remote)
        scene = _scenes(1, seed=5)[0]
        target = scene.objects[0]
        pipeline.set_command(f"Segment the {target.color} {target.shape}.", (0, 0))
        outcomes = []

        def run(frames: range) -> None:
            for n in frames:
                outcomes.append((n, process_frame(pipeline, Frame(scene.image, (n + 1, 0), "camera"))))

        run(range(0, 3))
        own.stop()
        run(range(3, 6))
        own.start()
        run(range(6, 9))
    finally:
        own.stop()
    assert [n for n, _ in outcomes] == list(range(9))
    down = [o for n, o in outcomes if n in range(3, 6)]
    assert all(o.error is not None and "Triton server" in o.error for o in down), down
    assert all(o.result is not None and o.result.objects for n, o in outcomes if n not in range(3, 6))


def test_node_parameters_attach_the_server_or_wait_for_it(server, caplog):
    from omg_llava_ros.ros.node import load_model
    from omg_llava_ros.ros.parameters import NodeParameters

    log = logging.getLogger("test_node_triton")
    model = load_model(NodeParameters(backend="triton", triton_url=server.url, device="cpu"), log)
    assert type(model.vision).__name__ == "TritonVision" and model.vision.reachable
    (closed,) = _free_ports(1)
    with caplog.at_level(logging.WARNING, logger="test_node_triton"):
        waiting = load_model(NodeParameters(backend="triton", triton_url=f"127.0.0.1:{closed}", device="cpu"), log)
    assert not waiting.vision.reachable
    assert "not reachable yet" in caplog.text


def test_fleet_bench_reports_overhead_and_throughput(server):
    from omg_llava_ros.bench.fleet import bench_fleet, format_fleet

    report = bench_fleet(server.url, clients=(1, 2), frames=3, repeats=2)
    assert set(report["clients"]) == {"1", "2"}
    for figures in report["clients"].values():
        assert figures["frames_per_s"] > 0 and figures["ratio_to_local"] > 0
    for side in ("onnxruntime", "triton"):
        assert report["per_call_ms"][side]["encoder_ms"] > 0 and report["per_call_ms"][side]["decoder_ms"] > 0
    assert sum(report["server_encoder_batch_runs"].values()) > 0
    text = format_fleet(report)
    assert "× local" in text and server.url in text


def test_server_prefers_tensorrt_then_cuda_and_keeps_the_cpu():
    from omg_llava_ros.serving.triton_server import session_providers

    assert session_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    gpu = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert session_providers(gpu) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_a_server_that_never_answers_times_out_with_a_clear_error(models):
    from omg_llava_ros.engines.triton_backend import TritonOptions, TritonVision, VisionServerError

    _, remote = models
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # connections are accepted by the kernel, and never answered
    try:
        url = f"127.0.0.1:{silent.getsockname()[1]}"
        vision = TritonVision(remote.vision.spec, remote.vision.fingerprint, TritonOptions(url=url, timeout_s=1.0))
        with pytest.raises(VisionServerError, match="unreachable"):
            vision.encode(torch.zeros(1, 3, 256, 256))
    finally:
        silent.close()


def test_a_replay_accounts_for_every_frame_while_the_server_is_down_and_back(models):
    """The replay command's own runner over a generated 30 Hz stream: the server is stopped before
    frame 10 and started again before frame 20; every frame in between is reported with its stamp,
    and the followed object is answered again after the restart."""
    from omg_llava_ros import OmgLlava
    from omg_llava_ros.engines.triton_backend import TritonOptions, triton_vision
    from omg_llava_ros.pipeline.types import stamp_to_ns
    from omg_llava_ros.replay.runner import ReplayConfig, Replayer
    from omg_llava_ros.replay.soak import IMAGE_TOPIC, GeneratedSource, Planted, SoakConfig

    own = Server().start()

    class ServerStopsAndComesBack(GeneratedSource):
        def messages(self, topics):
            images = 0
            for message in super().messages(topics):
                if message.topic == IMAGE_TOPIC:
                    if images == 10:
                        own.stop()
                    elif images == 20:
                        own.start()
                    images += 1
                yield message

    try:
        model = OmgLlava.from_pretrained()
        model.vision = triton_vision(model, TritonOptions(url=own.url, timeout_s=5.0))
        planted = Planted()
        config = SoakConfig(frames=30, command_every=(30, 30), bad_share=0.0, seed=4)
        source = ServerStopsAndComesBack(config, planted)
        outcome = Replayer(model, ReplayConfig()).run("generated", None, source=source)
    finally:
        own.stop()
    assert planted.commands[0][0] == "referring"  # seed 4 opens with "Pick up the cross."
    assert outcome.processed_frames == 30
    assert not [e for e in outcome.errors if e.reason.startswith("unexpected error")]
    records = sorted(outcome.records, key=lambda r: stamp_to_ns(r.stamp))
    errors = {stamp_to_ns(e.stamp): e.reason for e in outcome.errors if e.stamp is not None}
    assert len(records) == 30
    for k, record in enumerate(records):
        stamp = stamp_to_ns(record.stamp)
        if 10 <= k < 20:
            assert record.latency_ms is None and "Triton server" in errors.get(stamp, ""), (k, record)
        else:
            assert record.latency_ms is not None and record.objects > 0 and stamp not in errors, (k, record)


def test_the_memory_cache_keeps_the_newest_images_and_names_a_forgotten_one():
    from omg_llava_ros.serving.triton_server import UNKNOWN_IMAGE, MemoryCache

    cache = MemoryCache(2)
    first, second = cache.put({"m": np.zeros(1)}), cache.put({"m": np.ones(1)})
    cache.get(first)  # used: now the newest
    third = cache.put({"m": np.full(1, 2.0)})
    assert cache.get(first)["m"][0] == 0 and cache.get(third)["m"][0] == 2
    with pytest.raises(ValueError, match=UNKNOWN_IMAGE):
        cache.get(second)
    with pytest.raises(ValueError, match="at least one"):
        MemoryCache(0)
