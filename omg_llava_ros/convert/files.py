"""Reading the official files safely and writing safetensors with bounded memory.

Every `.pth`/`.bin` is read with `torch.load(weights_only=True)`: plain tensors and containers only,
never arbitrary pickled objects. Zip-format files are memory-mapped, so an 8 GB checkpoint costs
page cache for the tensors actually touched, not 8 GB of RAM.

The writers stream: the header of a safetensors file only needs every tensor's name, dtype and
shape, which the converter knows before it computes anything, so each tensor is written as soon as
it exists and then dropped.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

log = logging.getLogger(__name__)

# Extra entries of at most this many elements are ignored (with a log line) instead of failing the
# conversion: the finetune checkpoint is listed with 449 entries where the code gives 339, and the
# file size leaves room only for tiny ones (official_checkpoint_keys.md §3.5).
TINY_EXTRA_NUMEL = 64
_LIST_LIMIT = 40


class ConversionError(RuntimeError):
    """A checkpoint cannot be converted (refused, incomplete, unexpected content or shapes)."""


def format_keys(keys: Iterable[str], limit: int = _LIST_LIMIT) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f", … and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}]"


def load_pth(path: str | Path, what: str) -> Any:
    """`torch.load(weights_only=True)`, memory-mapped where the file format allows it."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{what}: no such file {path}")
    mmap = zipfile.is_zipfile(path)
    if not mmap:
        log.warning("%s: %s is in torch's legacy format; it is read into memory whole", what, path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else ""
        raise ConversionError(
            f"{what}: refusing {path}: it holds Python objects that torch.load(weights_only=True) will not "
            "build, and unpickling them would run code from the file. Only tensors in plain dicts/lists are "
            "read. If you trust the file, extract its tensors on a machine where it loads, e.g. "
            f"`sd = torch.load(path, weights_only=False); torch.save(sd.get('state_dict', sd), 'clean.pth')`, "
            f"and convert clean.pth. ({first_line})"
        ) from None


def state_dict_from(obj: Any, path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded checkpoint: `obj["state_dict"]` when present (mmengine/xtuner), else `obj`."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{what}: {path} holds a {type(obj).__name__}, not a state dict")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConversionError(f"{what}: {path} has entries that are not tensors: {format_keys(not_tensors)}")
    return dict(obj)


def load_tensor(path: str | Path, what: str) -> torch.Tensor:
    """A file that holds one bare tensor (the class-embedding file)."""
    obj = load_pth(path, what)
    if not isinstance(obj, torch.Tensor):
        raise ConversionError(f"{what}: {path} should hold one bare tensor, found a {type(obj).__name__}")
    return obj


def load_any_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A `.safetensors` file (memory-mapped) or a `.pth`/`.bin` read with weights_only."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise ConversionError(f"{what}: no such file {path}")
        return load_file(path)
    return state_dict_from(load_pth(path, what), path, what)


def drop_tiny_extras(extras: Mapping[str, torch.Tensor], what: str) -> list[str]:
    """Log and forget unexpected tensors of ≤ TINY_EXTRA_NUMEL elements; return the other (fatal) names."""
    fatal = []
    for key in sorted(extras):
        numel = extras[key].numel()
        if numel <= TINY_EXTRA_NUMEL:
            log.info("%s: ignoring extra tiny tensor %s %s", what, key, list(extras[key].shape))
        else:
            fatal.append(key)
    return fatal


# -- safetensors writing ------------------------------------------------------------------------
_DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class StreamingSafetensorsWriter:
    """Writes one safetensors file tensor by tensor, in the order of `specs` (checked)."""

    def __init__(self, path: str | Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        self._next = 0
        header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for spec in self.specs:
            if spec.dtype not in _DTYPE_CODES:
                raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be written")
            header[spec.name] = {
                "dtype": _DTYPE_CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise ValueError(f"{self.path}: unexpected extra tensor {name}")
        spec = self.specs[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{self.path}: expected {spec.name} {list(spec.shape)} {spec.dtype}, "
                f"got {name} {list(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next :]]
            raise ValueError(f"{self.path}: tensors never written: {format_keys(missing)}")


class ShardedSafetensorsWriter:
    """Hugging Face sharded layout: `{prefix}-0000i-of-0000n.safetensors` + `{prefix}.safetensors.index.json`
    (or one `{prefix}.safetensors` when everything fits in one shard). Tensors must come in spec order."""

    def __init__(self, directory: str | Path, specs: list[TensorSpec], max_shard_bytes: int, prefix: str = "model"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        n = len(shards)
        if n == 1:
            names = [f"{prefix}.safetensors"]
        else:
            names = [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._plan = list(zip(names, shards, strict=True))
        self._index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": {}}
        for file_name, shard in self._plan:
            for spec in shard:
                self._index["weight_map"][spec.name] = file_name
        self._prefix = prefix
        self._shard = -1
        self._writer: StreamingSafetensorsWriter | None = None
        self._left = 0

    @property
    def files(self) -> list[str]:
        return [name for name, _ in self._plan]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._writer is None or self._left == 0:
            if self._writer is not None:
                self._writer.close()
            self._shard += 1
            if self._shard >= len(self._plan):
                raise ValueError(f"unexpected extra tensor {name}")
            file_name, shard = self._plan[self._shard]
            self._writer = StreamingSafetensorsWriter(self.directory / file_name, shard)
            self._left = len(shard)
            log.info("writing %s (%d tensors)", self.directory / file_name, len(shard))
        self._writer.write(name, tensor)
        self._left -= 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._shard != len(self._plan) - 1 or self._left:
            raise ValueError(f"{self.directory}: not every planned tensor was written")
        if len(self._plan) > 1:
            index_path = self.directory / f"{self._prefix}.safetensors.index.json"
            index_path.write_text(json.dumps(self._index, indent=2))


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count → bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)
