"""The engine cache: compiled engines and the ONNX files they come from, under `engines/cache/`.

Layout (one folder per model, named by a content hash of its vision config and weights):

    <root>/<config name>-<fingerprint[:16]>/
        encoder.onnx  decoder.onnx  export.json          the exported graphs and their hashes
        refiner_guide.<hash>.onnx  refiner_head.<hash>.onnx   the mask refiner's (ONNX Runtime, CPU)
        encoder.fp16.engine  encoder.fp16.engine.json    a TensorRT engine and its key record
        decoder.fp16.engine  decoder.fp16.engine.json

An engine is only valid for the exact ONNX file, TensorRT version, GPU model and compute capability,
precision and optimisation-profile shapes it was built with; together they are its `EngineKey`. The
key is stored beside the engine together with the engine's own hash. On load the stored key must
equal the expected one and the bytes must hash right; otherwise the engine is rebuilt with a log line
saying why — or, when building is not allowed, a clear `EngineNotBuiltError` says how to build it.
Nothing is loaded on a mismatch, and nothing here raises anything else on a bad cache file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from omg_llava_ros.engines.spec import PRECISIONS, EngineBuildError, EngineNotBuiltError

log = logging.getLogger(__name__)

ENV_CACHE_DIR = "OMG_LLAVA_ROS_ENGINES"
REPO_ENGINES = Path(__file__).resolve().parents[2] / "engines"

Profile = dict[str, tuple[tuple[int, ...], ...]]  # input name → (min, opt, max) shapes


def engines_root(cache_dir: str | Path | None = None) -> Path:
    """Where the cache lives: `cache_dir`, else $OMG_LLAVA_ROS_ENGINES, else `engines/cache` in a source
    checkout, else ~/.cache/omg_llava_ros/engines (an installed package has no `engines/` folder)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    if REPO_ENGINES.is_dir():
        return REPO_ENGINES / "cache"
    return Path.home() / ".cache" / "omg_llava_ros" / "engines"


@dataclass(frozen=True)
class BuildEnvironment:
    """What an engine is tied to besides its graph: the TensorRT version and the GPU."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7" (Jetson Orin), "8.9", "9.0", …


@dataclass(frozen=True)
class EngineKey:
    """Everything a compiled engine depends on. Equal keys ⇔ the cached engine may be used."""

    role: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    shapes: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...]

    @classmethod
    def make(cls, role: str, onnx_sha256: str, env: BuildEnvironment, precision: str, profile: Profile) -> EngineKey:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        shapes = tuple(sorted((name, tuple(tuple(int(d) for d in s) for s in mm)) for name, mm in profile.items()))
        return cls(role, onnx_sha256, env.tensorrt_version, env.gpu_name, env.compute_capability, precision, shapes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shapes"] = {name: [list(s) for s in mm] for name, mm in self.shapes}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineKey:
        data = dict(data)
        data["shapes"] = tuple(sorted((n, tuple(tuple(s) for s in mm)) for n, mm in data["shapes"].items()))
        return cls(**data)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def differences(self, other: EngineKey) -> list[str]:
        """Human-readable 'field: cached → expected' lines, for the rebuild log line."""
        out = []
        for name in ("role", "onnx_sha256", "tensorrt_version", "gpu_name", "compute_capability", "precision"):
            old, new = getattr(other, name), getattr(self, name)
            if old != new:
                if name == "onnx_sha256":
                    old, new = old[:12], new[:12]
                out.append(f"{name.replace('_', ' ')} {old} → {new}")
        if self.shapes != other.shapes:
            out.append("optimisation-profile shapes differ")
        return out


class EngineBuilder(Protocol):
    """What the cache needs from TensorRT (a fake one stands in for it in tests)."""

    def environment(self) -> BuildEnvironment: ...

    def build(self, onnx_path: Path, profile: Profile, precision: str, role: str) -> bytes: ...

    def deserialize(self, data: bytes) -> Any:
        """The runtime engine, or None if the bytes are not a usable engine."""
        ...


@dataclass(frozen=True)
class CacheLookup:
    """status: "hit", "missing", "mismatch" or "corrupt"; reason: a sentence for the log."""

    status: str
    reason: str
    path: Path


class EngineCache:
    """Engine files of one model folder."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path_for(self, role: str, precision: str) -> Path:
        return self.directory / f"{role}.{precision}.engine"

    def engine_path(self, key: EngineKey) -> Path:
        return self.path_for(key.role, key.precision)

    def record_path(self, key: EngineKey) -> Path:
        path = self.engine_path(key)
        return path.with_name(path.name + ".json")

    def lookup(self, key: EngineKey) -> CacheLookup:
        path, record_path = self.engine_path(key), self.record_path(key)
        if not path.is_file():
            return CacheLookup("missing", f"no cached {key.role} engine at {path}", path)
        try:
            record = json.loads(record_path.read_text())
            stored = EngineKey.from_dict(record["key"])
            engine_sha = record["engine_sha256"]
        except FileNotFoundError:
            return CacheLookup("corrupt", f"{path} has no key record ({record_path.name})", path)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return CacheLookup("corrupt", f"the key record of {path} is unreadable ({type(err).__name__})", path)
        if stored != key:
            diff = "; ".join(key.differences(stored))
            return CacheLookup("mismatch", f"{path} was built for another setup ({diff})", path)
        if _sha256(path.read_bytes()) != engine_sha:
            return CacheLookup("corrupt", f"{path} is truncated or modified (hash mismatch)", path)
        return CacheLookup("hit", f"cached {key.role} engine {path}", path)

    def store(self, key: EngineKey, data: bytes) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.engine_path(key)
        record = {"key": key.to_dict(), "engine_sha256": _sha256(data), "digest": key.digest}
        # Engine first, record last: an interrupted write leaves a record-less engine, seen as corrupt.
        atomic_write(path, data)
        atomic_write(self.record_path(key), json.dumps(record, indent=2).encode())
        return path


def load_or_build(
    cache: EngineCache,
    key: EngineKey,
    build: Callable[[], bytes],
    deserialize: Callable[[bytes], Any],
    build_if_missing: bool,
    how_to_build: str,
    force: bool = False,
) -> Any:
    """The runtime engine for `key`: from the cache if it matches and loads, else rebuilt (when allowed).

    `how_to_build` completes the error raised when building is not allowed.
    """
    found = cache.lookup(key)
    if found.status == "hit" and not force:
        engine = _deserialize(deserialize, found.path.read_bytes())
        if engine is not None:
            log.info("loaded %s", found.reason)
            return engine
        found = CacheLookup("corrupt", f"{found.path} could not be deserialized by this TensorRT", found.path)
    if not (build_if_missing or force):
        raise EngineNotBuiltError(f"{found.reason}. {how_to_build}")
    if force:
        log.info("building the %s engine (%s) into %s", key.role, key.precision, found.path)
    elif found.status == "missing":
        log.info("%s; building it (%s)", found.reason, key.precision)
    else:
        log.warning("%s: rebuilding it", found.reason)
    data = build()
    path = cache.store(key, data)
    engine = _deserialize(deserialize, data)
    if engine is None:
        raise EngineBuildError(f"the freshly built {key.role} engine {path} does not deserialize")
    return engine


def _deserialize(deserialize: Callable[[bytes], Any], data: bytes) -> Any:
    try:
        return deserialize(data)
    except Exception as err:  # a bad engine must lead to a rebuild, whatever the runtime raises
        log.warning("engine deserialization failed: %s", err)
        return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write-then-rename: an interrupted write never leaves a half file under the real name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
