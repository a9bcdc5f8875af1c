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
run); the decoder is not (each call decodes over one image's memory, sent with the call). A model
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
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("omg_llava_ros.triton_server")

INFO_MODEL = "omg_llava_info"
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


class GraphModels:
    """The sessions of one export folder and the PyTriton bindings that run them."""

    def __init__(self, directory: Path, threads: int):
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
        self.batch_runs: Counter[int] = Counter()
        self._lock = threading.Lock()

    def bind(self, triton: Any, max_batch: int, queue_delay_us: int) -> None:
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

        for role, session in self.sessions.items():
            batched = role == "encoder" and max_batch > 1
            skip = 1 if batched else 0  # Triton's batch dimension is implicit in the config

            def tensors(args: list[Any], skip: int = skip) -> list[Tensor]:
                return [
                    Tensor(name=a.name, dtype=_NUMPY[a.type], shape=tuple(-1 for _ in a.shape[skip:])) for a in args
                ]

            if batched:
                config = ModelConfig(
                    max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)
                )
                infer = batch(self._batched(session))
            else:
                config = ModelConfig(batching=False)
                infer = self._per_request(session)
            triton.bind(
                model_name=triton_model_name(self.fingerprint, role),
                infer_func=infer,
                inputs=tensors(session.get_inputs()),
                outputs=tensors(session.get_outputs()),
                config=config,
                strict=True,
            )

    def _batched(self, session: Any):
        names = [o.name for o in session.get_outputs()]

        def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
            count = len(next(iter(inputs.values())))
            with self._lock:
                self.batch_runs[count] += 1
            return dict(zip(names, session.run(names, inputs), strict=True))

        return infer

    def _per_request(self, session: Any):
        names = [o.name for o in session.get_outputs()]

        def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
            return [dict(zip(names, session.run(names, dict(r.items())), strict=True)) for r in requests]

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
) -> None:
    """Bind every export folder's graphs and serve until SIGTERM or SIGINT."""
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    models = [GraphModels(Path(d), threads) for d in directories]
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


SERVER_OPTIONS = ("http_port", "grpc_port", "metrics_port", "max_batch", "queue_delay_us", "threads")


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """The server's options (`SERVER_OPTIONS`), shared with `omg-llava-ros serve`."""
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-batch", type=int, default=4, help="largest encoder batch (1: no dynamic batching)")
    p.add_argument("--queue-delay-us", type=int, default=2000, help="how long the batcher waits to fill a batch")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads per graph")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m omg_llava_ros.serving.triton_server", description=__doc__)
    p.add_argument("--engines", type=Path, nargs="+", required=True, help="export folders (export.json inside)")
    add_server_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ports = (args.http_port, args.grpc_port, args.metrics_port)
    serve(args.engines, *ports, args.max_batch, args.queue_delay_us, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
