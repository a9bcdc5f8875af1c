"""Triton vision backend: the model's image work on a Triton Inference Server, the LLM kept local.

    model = OmgLlava.from_pretrained(backend="triton", url="gpu-server:8000")

The server (`omg-llava-ros serve`, `serving.triton_server`) hosts the exported encoder and decoder
graphs under names made from the content hash of the vision weights (`model_fingerprint`), so this
client asks for exactly its own weights: a server holding other weights answers with a clear error,
never with another model's masks. The image's memory (2.6 MB) stays on the server: `encode` brings
back only the last encoder stage and the id the server keeps the memory under, and the returned
`DecoderMemory` holds shape-only ("meta") tensors; `decode` names the id. An id the server no longer
has (evicted, or a restarted server) makes the client encode its image again (it keeps the last few
images' pixels), so the caller never sees it.

Every call has a timeout; a server that is down, restarting or slow gives `VisionServerError` for
that call (the pipeline reports it and goes on) and the next call connects afresh. tritonclient's
HTTP client is not thread-safe, so each thread gets its own connection.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from omg_llava_ros.engines.export import model_fingerprint
from omg_llava_ros.engines.graph_vision import GraphVision, decoder_feeds, decoder_role
from omg_llava_ros.engines.spec import BackendUnavailableError, GraphSpec, memory_positions
from omg_llava_ros.model.omg_decoder import DecoderMemory, DecoderOutput, QueryConstraints
from omg_llava_ros.serving.triton_server import CACHED, IMAGE_ID, INFO_MODEL, UNKNOWN_IMAGE, triton_model_name

if TYPE_CHECKING:
    from omg_llava_ros.model.omg_llava import OmgLlava

log = logging.getLogger(__name__)

_TRITON_TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.bool_): "BOOL", np.dtype(np.int32): "INT32"}


class VisionServerError(RuntimeError):
    """A vision call to the Triton server failed (down, timed out, restarting, wrong model)."""


@dataclass
class TritonOptions:
    """url: "host:port" of the server's HTTP endpoint; timeout_s: per call (connection and answer)."""

    url: str = "127.0.0.1:8000"
    timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.url or "/" in self.url:
            raise ValueError(f"TritonOptions.url must be 'host:port' (no scheme), got {self.url!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"TritonOptions.timeout_s must be > 0, got {self.timeout_s}")


def import_triton_http() -> Any:
    try:
        import tritonclient.http as http
    except ImportError as err:
        raise BackendUnavailableError("the Triton client is not installed: `pip install tritonclient[http]`") from err
    return http


class TritonVision(GraphVision):
    """`VisionBackend` whose graphs run on a Triton server; tensors come back on `device`."""

    name = "triton"

    def __init__(self, spec: GraphSpec, fingerprint: str, options: TritonOptions, device: torch.device | str = "cpu"):
        self.http = import_triton_http()
        self.spec = spec
        self.fingerprint = fingerprint
        self.options = options
        self.device = torch.device(device)
        self.positions = memory_positions(spec, self.device)
        self.reachable = True  # False: the server did not answer when the backend was made
        self._local = threading.local()
        # Per image encoded: its id on the server and its pixels (to encode it again on a miss), by
        # the id() of the meta mask_features tensor of the DecoderMemory handed out; the entry goes
        # when that tensor does (tensors compare elementwise, so they cannot be dict keys themselves).
        self._remote: dict[int, list[Any]] = {}
        self._remote_lock = threading.Lock()

    # -- GraphVision ----------------------------------------------------------------------------
    def run_encoder(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._infer("encoder", {"pixels": pixels}, self.spec.encoder_output_shapes(len(pixels)))

    def run_decoder(
        self, role: str, feeds: dict[str, torch.Tensor], batch: int, queries: int
    ) -> dict[str, torch.Tensor]:
        return self._infer(role, feeds, self.spec.decoder_output_shapes(batch, queries))

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, DecoderMemory]:
        """One image: its memory stays on the server (see the module docstring). Several at once:
        the memories come back, as from the other engines."""
        self.spec.check_pixels(pixels)
        if len(pixels) != 1:
            return super().encode(pixels)
        last_stage, image_id = self._encode_remote(pixels.float())
        shapes = self.spec.encoder_output_shapes(1)
        memory = DecoderMemory(
            torch.empty(shapes["mask_features"], device="meta"),
            [torch.empty(shapes[name], device="meta") for name in self.spec.memory_names],
            self.positions,
            [tuple(s) for s in self.spec.level_shapes],
        )
        key = id(memory.mask_features)
        with self._remote_lock:
            self._remote[key] = [image_id, pixels.detach().cpu()]
        weakref.finalize(memory.mask_features, self._forget, key)
        return last_stage, memory

    def _forget(self, key: int) -> None:
        with self._remote_lock:
            self._remote.pop(key, None)

    def decode(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        memory: DecoderMemory,
        constraints: QueryConstraints | None = None,
        with_class: bool = False,
        seg_decoder: bool = False,
    ) -> DecoderOutput:
        with self._remote_lock:
            remote = self._remote.get(id(memory.mask_features))
        if remote is None:  # a memory with its tensors: sent along, as to the other engines
            return super().decode(query, query_pos, memory, constraints, with_class, seg_decoder)
        feeds = decoder_feeds(self.spec, query, query_pos, memory, constraints)
        for name in ("mask_features", *self.spec.memory_names):
            del feeds[name]
        role = decoder_role(self.spec, seg_decoder)
        shapes = self.spec.decoder_output_shapes(*query.shape[:2])
        try:
            outs = self._infer(f"{role}{CACHED}", feeds, shapes, image_id=remote[0])
        except VisionServerError as err:
            if UNKNOWN_IMAGE not in str(err):
                raise
            log.info("the Triton server no longer has this image's memory: encoding it again")
            _, remote[0] = self._encode_remote(remote[1])
            outs = self._infer(f"{role}{CACHED}", feeds, shapes, image_id=remote[0])
        return self.spec.output_from(outs, with_class)

    def _encode_remote(self, pixels: torch.Tensor) -> tuple[torch.Tensor, str]:
        shapes = {"last_stage": self.spec.encoder_output_shapes(1)["last_stage"]}
        outs = self._infer("encoder", {"pixels": pixels}, shapes, want_id=True)
        return outs["last_stage"], outs[IMAGE_ID]

    # -- the server -------------------------------------------------------------------------------
    def served(self) -> dict[str, Any]:
        """The server's `omg_llava_info` document (fingerprints served, encoder batch counts)."""
        import json

        http = self.http
        request = http.InferInput("request", [1], "INT32")
        request.set_data_from_numpy(np.zeros(1, np.int32))
        result = self._call(INFO_MODEL, [request], [http.InferRequestedOutput("info", binary_data=True)])
        return json.loads(result.as_numpy("info")[0])

    def check_server(self) -> None:
        """Raise VisionServerError unless the server is up and serves this model's graphs."""
        models = self.served().get("models", {})
        if self.fingerprint not in models:
            raise VisionServerError(
                f"the Triton server at {self.options.url} does not serve this model's vision graphs "
                f"(fingerprint {self.fingerprint[:16]}); it serves {sorted(f[:16] for f in models) or 'none'}: "
                "start `omg-llava-ros serve` with this model"
            )

    def _infer(
        self,
        role: str,
        feeds: dict[str, torch.Tensor],
        shapes: dict[str, tuple[int, ...]],
        image_id: str | None = None,
        want_id: bool = False,
    ) -> dict[str, Any]:
        """Run the server's model `role` on `feeds` (and `image_id`, for a cached decoder); the outputs
        named in `shapes`, checked, as tensors (and the returned image id with `want_id`)."""
        http = self.http
        inputs = []
        for name, tensor in feeds.items():
            array = np.ascontiguousarray(tensor.detach().cpu().numpy())
            item = http.InferInput(name, list(array.shape), _TRITON_TYPES[array.dtype])
            item.set_data_from_numpy(array, binary_data=True)
            inputs.append(item)
        if image_id is not None:
            item = http.InferInput(IMAGE_ID, [1], "BYTES")
            item.set_data_from_numpy(np.array([image_id.encode()], dtype=np.object_), binary_data=True)
            inputs.append(item)
        names = [*shapes, IMAGE_ID] if want_id else list(shapes)
        outputs = [http.InferRequestedOutput(name, binary_data=True) for name in names]
        result = self._call(triton_model_name(self.fingerprint, role), inputs, outputs)
        out: dict[str, Any] = {}
        if want_id:
            ids = result.as_numpy(IMAGE_ID)
            if ids is None or ids.size != 1:
                raise VisionServerError(f"the Triton server's {role} returned no image id")
            raw = ids.reshape(-1)[0]
            out[IMAGE_ID] = raw.decode() if isinstance(raw, bytes) else str(raw)
        for name, shape in shapes.items():
            array = result.as_numpy(name)
            if array is None or tuple(array.shape) != tuple(shape):
                got = None if array is None else tuple(array.shape)
                raise VisionServerError(f"the Triton server's {role} returned {name} of shape {got}, expected {shape}")
            out[name] = torch.from_numpy(np.array(array, copy=True)).to(self.device)
        return out

    def _call(self, model_name: str, inputs: list[Any], outputs: list[Any]) -> Any:
        from tritonclient.utils import InferenceServerException

        client = self._client()
        try:
            return client.infer(model_name, inputs, outputs=outputs, timeout=int(self.options.timeout_s * 1e6))
        except InferenceServerException as err:
            self._drop_client()
            text = str(err)
            if "unknown model" in text or "not found" in text:
                raise VisionServerError(
                    f"the Triton server at {self.options.url} has no model {model_name!r} (it serves other weights, "
                    "or is still loading): start `omg-llava-ros serve` with this model"
                ) from err
            raise VisionServerError(f"Triton server at {self.options.url}, {model_name}: {text}") from err
        except Exception as err:  # connection refused or reset, timeouts: the transport's own types
            self._drop_client()
            raise VisionServerError(
                f"Triton server at {self.options.url} unreachable for {model_name}: {type(err).__name__}: {err}"
            ) from err

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            timeout = self.options.timeout_s
            client = self.http.InferenceServerClient(
                self.options.url, connection_timeout=timeout, network_timeout=timeout
            )
            self._local.client = client
        return client

    def _drop_client(self) -> None:
        """Forget this thread's connection, so the next call reconnects (a restarted server)."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            # A broken connection may fail to close; it is dropped anyway.
            with contextlib.suppress(Exception):
                client.close()


def triton_vision(
    model: OmgLlava, options: TritonOptions | dict[str, Any] | None = None, require_server: bool = True
) -> TritonVision:
    """The Triton backend for `model`, checked against the server: VisionServerError if it serves
    other weights, or if it is unreachable and `require_server` (else `reachable` is False and each
    call fails until it is up)."""
    if isinstance(options, dict):
        options = TritonOptions(**options)
    options = options or TritonOptions()
    vision = TritonVision(GraphSpec.from_model(model), model_fingerprint(model), options, model.device)
    try:
        vision.check_server()
    except VisionServerError as err:
        if require_server or "unreachable" not in str(err):
            raise
        vision.reachable = False
    log.info("Triton vision backend: %s, graphs %s", options.url, vision.fingerprint[:16])
    return vision


def vision_backend_plugin(name: str, model: OmgLlava, options: Any = None) -> TritonVision:
    """The entry point `triton` (pyproject.toml, group `omg_llava_ros.vision_backends`)."""
    return triton_vision(model, options)
