"""A Triton Inference Server (PyTriton) hosting the exported vision graphs of one or more models.

    python -m omg_llava_ros.serving.triton_server --engines DIR [DIR ...] [--http-port 8000] ...

Usually started by `omg-llava-ros serve`, which exports the graphs first. This module imports only
numpy, ONNX Runtime and PyTriton (no torch, nothing else of this package), because it runs in the
server's own environment: PyTriton 0.7 pins numpy < 2, which the rest of the package does not
(`serving/requirements-triton.txt`).

ONNX Runtime runs the graphs: on the CPU here, through its TensorRT or CUDA provider on a GPU server
that installs onnxruntime-gpu (`session_providers`).

Each DIR is an export folder (`export.json` + `{role}.onnx`, `engines.export`). Per model it binds
one Triton model per graph, named `omg_{fingerprint[:16]}_{role}`, so a client asks by the content
hash of its own weights and a server holding other weights answers "model not found" instead of
wrong masks. The encoder is batched by Triton's dynamic batcher (concurrent robots' frames in one
run); the decoder is not (each call decodes over one image's memory). The server keeps the memory
of the newest images (`MemoryCache`) under an id the encoder returns, so a decoder call names its
image (`{role}_cached`) instead of sending the memory; the plain decoder takes the memory itself. A model
`omg_llava_info` returns, as JSON, the fingerprints served and how many runs of each batch size the
encoders made.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import uuid
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("omg_llava_ros.triton_server")

INFO_MODEL = "omg_llava_info"
IMAGE_ID = "image_id"  # the encoder's extra output: under which id the server keeps the image's memory
CACHED = "_cached"  # suffix of the decoder models that take an image id instead of the memory
UNKNOWN_IMAGE = "unknown image"
EXPORT_META = "export.json"  # engines.export.EXPORT_META (not imported: that module needs torch)
_NUMPY = {"tensor(float)": np.float32, "tensor(bool)": np.bool_, "tensor(int64)": np.int64}


def triton_model_name(fingerprint: str, role: str) -> str:
    """The Triton model of `role` ("encoder", "decoder", "seg_decoder") for a model's fingerprint."""
    return f"omg_{fingerprint[:16]}_{role}"


def _graph_file(directory: Path, role: str, sha256: str) -> Path:
    """The ONNX Runtime copy with fused GELUs where the export has one, else the export itself."""
    fused = directory / f"{role}.{sha256[:16]}.ort.onnx"
    return fused if fused.is_file() else directory / f"{role}.onnx"


# On a GPU server with onnxruntime-gpu (instead of onnxruntime in requirements-triton.txt), ONNX
# Runtime builds TensorRT engines through its TensorRT provider, else runs the CUDA one.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def session_providers(available: list[str]) -> list[str]:
    """The execution providers the sessions use: TensorRT, then CUDA where present, the CPU last."""
    return [p for p in PREFERRED_PROVIDERS if p in available] + ["CPUExecutionProvider"]


class MemoryCache:
    """The per-image decoder memories the encoder made, by image id, the `capacity` newest kept: a
    decoder call names its image instead of sending 2.6 MB of memory with every call."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"the server must keep at least one image's memory, got --cached-images {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, arrays: dict[str, np.ndarray]) -> str:
        image_id = uuid.uuid4().hex
        with self._lock:
            self._items[image_id] = arrays
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return image_id

    def get(self, image_id: str) -> dict[str, np.ndarray]:
        with self._lock:
            arrays = self._items.get(image_id)
            if arrays is not None:
                self._items.move_to_end(image_id)
        if arrays is None:
            # The client re-encodes its image on this message (`TritonVision`): evicted, or a restart.
            raise ValueError(f"{UNKNOWN_IMAGE} {image_id!r}")
        return arrays


class GraphModels:
    """The sessions of one export folder and the PyTriton bindings that run them."""

    def __init__(self, directory: Path, threads: int, cached_images: int = 32):
        import onnxruntime as ort

        meta_path = directory / EXPORT_META
        try:
            meta = json.loads(meta_path.read_text())
            self.fingerprint = str(meta["fingerprint"])
            files = {role: entry["sha256"] for role, entry in meta["files"].items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{meta_path}: not an export record ({err}); run `omg-llava-ros build-engines`") from err
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.providers = session_providers(ort.get_available_providers())
        self.sessions = {
            role: ort.InferenceSession(str(_graph_file(directory, role, sha)), options, providers=self.providers)
            for role, sha in files.items()
        }
        encoder_outputs = {o.name for o in self.sessions["encoder"].get_outputs()}
        # The decoder inputs the encoder made: what the cache holds per image.
        self.memory_names = [i.name for i in self.sessions["decoder"].get_inputs() if i.name in encoder_outputs]
        self.cache = MemoryCache(cached_images)
        self.batch_runs: Counter[int] = Counter()
        self._lock = threading.Lock()

    def bind(self, triton: Any, max_batch: int, queue_delay_us: int) -> None:
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

        def tensors(args: list[Any], skip: int) -> list[Tensor]:
            return [Tensor(name=a.name, dtype=_NUMPY[a.type], shape=tuple(-1 for _ in a.shape[skip:])) for a in args]

        encoder = self.sessions["encoder"]
        batched = max_batch > 1
        skip = 1 if batched else 0  # Triton's batch dimension is implicit in a batched model's config
        config = (
            ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us))
            if batched
            else ModelConfig(batching=False)
        )
        triton.bind(
            model_name=triton_model_name(self.fingerprint, "encoder"),
            infer_func=batch(self._encode) if batched else self._per_request(self._encode),
            inputs=tensors(encoder.get_inputs(), skip),
            outputs=[
                *tensors(encoder.get_outputs(), skip),
                Tensor(name=IMAGE_ID, dtype=np.bytes_, shape=(1,) if batched else (-1, 1)),
            ],
            config=config,
            strict=True,
        )
        for role, session in self.sessions.items():
            if role == "encoder":
                continue
            inputs, outputs = session.get_inputs(), tensors(session.get_outputs(), 0)
            triton.bind(
                model_name=triton_model_name(self.fingerprint, role),
                infer_func=self._per_request(self._decoder(session)),
                inputs=tensors(inputs, 0),
                outputs=outputs,
                config=ModelConfig(batching=False),
                strict=True,
            )
            rest = [i for i in inputs if i.name not in self.memory_names]
            triton.bind(
                model_name=triton_model_name(self.fingerprint, f"{role}{CACHED}"),
                infer_func=self._per_request(self._cached_decoder(session)),
                inputs=[Tensor(name=IMAGE_ID, dtype=np.bytes_, shape=(1,)), *tensors(rest, 0)],
                outputs=outputs,
                config=ModelConfig(batching=False),
                strict=True,
            )

    def _encode(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Encoder outputs for (B, 3, S, S) pixels, and an id per image under which its memory is kept."""
        session = self.sessions["encoder"]
        names = [o.name for o in session.get_outputs()]
        outs = dict(zip(names, session.run(names, inputs), strict=True))
        count = len(inputs["pixels"])
        with self._lock:
            self.batch_runs[count] += 1
        ids = [self.cache.put({k: outs[k][i : i + 1] for k in self.memory_names}) for i in range(count)]
        outs[IMAGE_ID] = np.array([[i.encode()] for i in ids], dtype=np.object_)
        return outs

    @staticmethod
    def _decoder(session: Any):
        names = [o.name for o in session.get_outputs()]
        return lambda **feeds: dict(zip(names, session.run(names, feeds), strict=True))

    def _cached_decoder(self, session: Any):
        names = [o.name for o in session.get_outputs()]

        def infer(**feeds: np.ndarray) -> dict[str, np.ndarray]:
            image_id = feeds.pop(IMAGE_ID).reshape(-1)[0]
            memory = self.cache.get(image_id.decode() if isinstance(image_id, bytes) else str(image_id))
            return dict(zip(names, session.run(names, {**memory, **feeds}), strict=True))

        return infer

    @staticmethod
    def _per_request(run: Any):
        """A Triton model that is not batched: each request on its own."""

        def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
            return [run(**dict(r.items())) for r in requests]

        return infer


def _python_library_first() -> None:
    """Put this interpreter's libpython first on the library path of the processes PyTriton starts:
    the Python backend's stub in the wheel links whatever libpython3.11 the loader finds first, and
    the system's (3.11.2 on Debian 12) beside a newer interpreter fails at the first request
    ("'_thread.RLock' object has no attribute '_recursion_count'")."""
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir).is_dir():
        current = os.environ.get("LD_LIBRARY_PATH", "")
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def info_model(models: list[GraphModels]):
    """The infer function of `INFO_MODEL`: one request in, one JSON document out."""

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        doc = {
            "models": {
                m.fingerprint: {
                    "roles": sorted(m.sessions),
                    "providers": m.providers,
                    "encoder_batch_runs": {str(k): v for k, v in sorted(m.batch_runs.items())},
                }
                for m in models
            }
        }
        return [{"info": np.array([json.dumps(doc).encode()], dtype=np.object_)} for _ in requests]

    return infer


def serve(
    directories: list[Path],
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    max_batch: int = 4,
    queue_delay_us: int = 2000,
    threads: int = 2,
    cached_images: int = 32,
) -> None:
    """Bind every export folder's graphs and serve until SIGTERM or SIGINT."""
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    models = [GraphModels(Path(d), threads, cached_images) for d in directories]
    _python_library_first()
    config = TritonConfig(http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, exit_timeout_secs=5)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with Triton(config=config) as triton:
        for m in models:
            m.bind(triton, max_batch, queue_delay_us)
        triton.bind(
            model_name=INFO_MODEL,
            infer_func=info_model(models),
            inputs=[Tensor(name="request", dtype=np.int32, shape=(1,))],
            outputs=[Tensor(name="info", dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(batching=False),
        )
        triton.run()
        log.info(
            "serving %s (%s) on http :%d, grpc :%d (pid %d)",
            ", ".join(m.fingerprint[:16] for m in models),
            ", ".join(models[0].providers) if models else "-",
            http_port,
            grpc_port,
            os.getpid(),
        )
        print(f"omg-llava-ros triton server ready on http :{http_port}", flush=True)
        stop.wait()
        log.info("stopping")


SERVER_OPTIONS = ("http_port", "grpc_port", "metrics_port", "max_batch", "queue_delay_us", "threads", "cached_images")


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The server's options (`SERVER_OPTIONS`), shared with `omg-llava-ros serve`."""
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=4, help="largest encoder batch (1: no dynamic batching)")
    p.add_argument("--queue-delay-us", type=int, default=2000, help="how long the batcher waits to fill a batch")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads per graph")
    p.add_argument("--cached-images", type=int, default=32, help="per model, the newest images whose memory is kept")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omg_llava_ros.serving.triton_server", description=__doc__)
    p.add_argument("--engines", type=Path, nargs="+", required=True, help="export folders (export.json inside)")
    add_server_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ports = (args.http_port, args.grpc_port, args.metrics_port)
    serve(args.engines, *ports, args.max_batch, args.queue_delay_us, args.threads, args.cached_images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
