"""sensor_msgs Image / CompressedImage <-> numpy, without cv_bridge and without ROS imports.

Every function is duck-typed: it reads only the message's fields, so it accepts rclpy messages
(``data`` is an ``array.array('B')``), rosbags-deserialised messages (``data`` is a numpy uint8
array) and anything else with the same attributes (bytes, bytearray, memoryview, list).

cv_bridge is avoided on purpose: its compiled numpy ABI breaks with mismatched numpy versions
(yolo_ros #75/#123, vision_opencv #535), and these conversions are a few strided numpy views.

All malformed input raises :class:`ImageConversionError` (a ``ValueError``) with a readable reason,
never another exception type, so callers (the node, the replay tool) can log and skip the frame.

Returned arrays always own their memory (or are fresh copies): messages may be reused or mutated by
the middleware after a callback returns, so keeping a view into ``msg.data`` would be unsafe.
"""

from __future__ import annotations

import array
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np

__all__ = [
    "ImageConversionError",
    "apply_image_fields",
    "compressed_to_rgb",
    "depth_to_meters",
    "image_to_rgb",
    "instance_ids_from_image",
    "mask_from_mono8",
    "mono8_fields",
    "mono16_fields",
    "rgb_to_image_fields",
    "supported_encodings",
]


class ImageConversionError(ValueError):
    """A message could not be converted; the text says why (for logs and replay error lists)."""


class _Encoding(NamedTuple):
    channels: int
    dtype: str  # numpy kind+size without byte order, e.g. "u1", "u2", "f4"
    order: str  # channel semantics: "rgb", "bgr", "rgba", "bgra", "mono", "yuv422", "yuyv"


# Names follow sensor_msgs/image_encodings.hpp. "8UC3"/"8UC4" carry no colour order; OpenCV
# producers (the usual source) write BGR, so they are read as bgr8/bgra8.
_ENCODINGS: dict[str, _Encoding] = {
    "rgb8": _Encoding(3, "u1", "rgb"),
    "bgr8": _Encoding(3, "u1", "bgr"),
    "rgba8": _Encoding(4, "u1", "rgba"),
    "bgra8": _Encoding(4, "u1", "bgra"),
    "mono8": _Encoding(1, "u1", "mono"),
    "8UC1": _Encoding(1, "u1", "mono"),
    "8UC3": _Encoding(3, "u1", "bgr"),
    "8UC4": _Encoding(4, "u1", "bgra"),
    "rgb16": _Encoding(3, "u2", "rgb"),
    "bgr16": _Encoding(3, "u2", "bgr"),
    "rgba16": _Encoding(4, "u2", "rgba"),
    "bgra16": _Encoding(4, "u2", "bgra"),
    "mono16": _Encoding(1, "u2", "mono"),
    "16UC1": _Encoding(1, "u2", "mono"),
    "32FC1": _Encoding(1, "f4", "mono"),
    # Packed 4:2:2, two bytes per pixel; usb_cam and many UVC drivers publish these.
    "yuv422": _Encoding(2, "u1", "yuv422"),  # UYVY
    "uyvy": _Encoding(2, "u1", "yuv422"),
    "yuv422_yuy2": _Encoding(2, "u1", "yuyv"),  # YUYV
    "yuyv": _Encoding(2, "u1", "yuyv"),
}
# Drivers are inconsistent about case ("RGB8", "16uc1"); look names up case-insensitively.
_ENCODINGS_FOLDED = {name.lower(): name for name in _ENCODINGS}

_RGB_INPUT = frozenset(n for n, e in _ENCODINGS.items() if e.dtype != "f4")
_DEPTH_INPUT = frozenset({"16UC1", "mono16", "32FC1"})
_MASK_INPUT = frozenset({"mono8", "8UC1"})
_INSTANCE_INPUT = frozenset({"mono8", "8UC1", "mono16", "16UC1"})

_T = TypeVar("_T")


def supported_encodings() -> tuple[str, ...]:
    """Encodings :func:`image_to_rgb` accepts (canonical spelling)."""
    return tuple(sorted(_RGB_INPUT))


def _wrap_errors(what: str) -> Callable[[Callable[..., _T]], Callable[..., _T]]:
    """Turn any unexpected exception into ImageConversionError, keeping the cause chained.

    Bad messages come from the network and from bags; the contract is one exception type.
    """

    def deco(fn: Callable[..., _T]) -> Callable[..., _T]:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> _T:
            try:
                return fn(*args, **kwargs)
            except ImageConversionError:
                raise
            except MemoryError:
                raise
            except Exception as exc:  # funnel everything into one documented type
                raise ImageConversionError(f"{what}: {type(exc).__name__}: {exc}") from exc

        return inner

    return deco


def _field(msg: object, name: str) -> Any:
    try:
        return getattr(msg, name)
    except AttributeError:
        raise ImageConversionError(f"not an image message: missing field {name!r} on {type(msg).__name__}") from None


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ImageConversionError(f"{name} must be an integer, got {type(value).__name__}")
    return int(value)


def _as_bytes_array(data: Any) -> np.ndarray:
    """``data`` as a flat uint8 array, without copying where the input already is a byte buffer."""
    if data is None:
        raise ImageConversionError("data is missing (None)")
    if isinstance(data, str):
        raise ImageConversionError("data must be bytes-like, got str")
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ImageConversionError(f"data array must have dtype uint8, got {data.dtype}")
        return data.reshape(-1)
    if isinstance(data, array.array):
        if data.itemsize != 1:
            raise ImageConversionError(f"data array.array must hold bytes (typecode 'B'), got {data.typecode!r}")
        return np.frombuffer(data, dtype=np.uint8)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, dtype=np.uint8)
    # A plain sequence of ints (e.g. a message built by hand from a list).
    values = np.asarray(data)
    if values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise ImageConversionError(f"data must be a flat sequence of byte values, got {type(data).__name__}")
    if values.min() < 0 or values.max() > 255:
        raise ImageConversionError("data values must be in 0..255")
    return values.astype(np.uint8)


def _lookup_encoding(encoding: Any, allowed: frozenset[str], purpose: str) -> tuple[str, _Encoding]:
    if not isinstance(encoding, str):
        raise ImageConversionError(f"encoding must be a string, got {type(encoding).__name__}")
    name = _ENCODINGS_FOLDED.get(encoding.strip().lower())
    if name is None:
        raise ImageConversionError(
            f"unknown encoding {encoding!r} for {purpose}; supported: {', '.join(sorted(allowed))}"
        )
    if name not in allowed:
        raise ImageConversionError(
            f"encoding {encoding!r} not supported for {purpose}; supported: {', '.join(sorted(allowed))}"
        )
    return name, _ENCODINGS[name]


def _pixels(msg: object, allowed: frozenset[str], purpose: str) -> tuple[str, _Encoding, np.ndarray]:
    """Validate an Image and return a (possibly read-only) H×W×C view of its pixels.

    The view skips row padding via strides and has the message's byte order, so no data is
    copied here; callers make exactly one owning copy while converting.
    """
    height = _as_int(_field(msg, "height"), "height")
    width = _as_int(_field(msg, "width"), "width")
    step = _as_int(_field(msg, "step"), "step")
    name, enc = _lookup_encoding(_field(msg, "encoding"), allowed, purpose)
    big = bool(_field(msg, "is_bigendian"))
    raw = _as_bytes_array(_field(msg, "data"))

    if height <= 0 or width <= 0:
        raise ImageConversionError(f"empty image: {width}x{height} ({name})")
    itemsize = int(enc.dtype[1:])
    row_bytes = width * enc.channels * itemsize
    if step < row_bytes:
        raise ImageConversionError(
            f"step {step} is smaller than width*channels*bytes = {width}*{enc.channels}*"
            f"{itemsize} = {row_bytes} ({name})"
        )
    if raw.size < step * height:
        raise ImageConversionError(
            f"data too short: {raw.size} bytes < step*height = {step}*{height} = "
            f"{step * height} ({name} {width}x{height})"
        )
    if enc.order in ("yuv422", "yuyv") and width % 2:
        raise ImageConversionError(f"{name} needs an even width, got {width}")

    # Byte order only exists for multi-byte samples; 8-bit data ignores is_bigendian.
    dtype = np.dtype(enc.dtype).newbyteorder(">" if big else "<") if itemsize > 1 else np.dtype("u1")
    if not raw.flags.c_contiguous:
        raw = np.ascontiguousarray(raw)
    view = np.ndarray(
        shape=(height, width, enc.channels),
        dtype=dtype,
        buffer=raw,
        offset=0,
        strides=(step, enc.channels * itemsize, itemsize),
    )
    return name, enc, view


def _to_rgb8(view: np.ndarray, enc: _Encoding) -> np.ndarray:
    """H×W×C view (any supported layout) -> owning H×W×3 uint8 RGB array."""
    if enc.order in ("yuv422", "yuyv"):
        import cv2  # only packed YUV needs OpenCV here

        code = cv2.COLOR_YUV2RGB_UYVY if enc.order == "yuv422" else cv2.COLOR_YUV2RGB_YUY2
        return cv2.cvtColor(np.ascontiguousarray(view), code)
    # Channel reordering is done on views; the only copy is the final one below.
    if enc.order == "rgb":
        sel = view
    elif enc.order == "rgba":
        sel = view[..., :3]
    elif enc.order == "bgr":
        sel = view[..., ::-1]
    elif enc.order == "bgra":
        sel = view[..., 2::-1]
    else:  # mono
        sel = np.broadcast_to(view, (*view.shape[:2], 3))
    if sel.dtype.itemsize == 2:
        # 16 -> 8 bit by keeping the high byte: a fixed scale, so brightness does not jump
        # between frames the way per-frame min/max normalisation would.
        return np.ascontiguousarray((sel >> 8).astype(np.uint8))
    # One C-contiguous owning copy (also detaches the result from msg.data).
    return np.array(sel, dtype=np.uint8, order="C", copy=True)


@_wrap_errors("image_to_rgb")
def image_to_rgb(msg: object) -> np.ndarray:
    """sensor_msgs/Image -> H×W×3 uint8 RGB (owning, C-contiguous).

    Accepts rgb8, bgr8, rgba8, bgra8, mono8, 8UC1, 8UC3 (as bgr8), 8UC4 (as bgra8), the 16-bit
    variants (mono16, 16UC1, rgb16, ... scaled down by keeping the high byte) and packed YUV 4:2:2
    (yuv422 = UYVY, yuv422_yuy2 = YUYV). Row padding and ``is_bigendian`` are honoured.
    """
    _, enc, view = _pixels(msg, _RGB_INPUT, "image_to_rgb")
    return _to_rgb8(view, enc)


_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _compressed_layout(fmt: str, head: bytes) -> tuple[str, bool]:
    """Parse a CompressedImage.format into (codec, data_is_rgb_ordered).

    image_transport writes "<source encoding>; <codec> compressed <target encoding>" (e.g.
    "rgb8; jpeg compressed bgr8"); other publishers write just "jpeg" / "png". The target encoding
    tells the channel order of the encoded pixels: image_transport always encodes bgr*, which
    OpenCV decodes to correct BGR, but a producer that declares "compressed rgb8" stored RGB bytes.
    """
    text = fmt.strip().lower()
    if "compresseddepth" in text.replace(" ", ""):
        raise ImageConversionError(
            f"unsupported compressed format {fmt!r}: compressedDepth is a depth transport, not a colour image"
        )
    codec_part = text.split(";", 1)[1] if ";" in text else text
    tokens = codec_part.replace(",", " ").split()
    if any(t in ("jpeg", "jpg") for t in tokens):
        codec = "jpeg"
    elif "png" in tokens:
        codec = "png"
    elif not text:
        # No format given: recognise the container by its magic bytes.
        if head.startswith(_JPEG_MAGIC):
            codec = "jpeg"
        elif head.startswith(_PNG_MAGIC):
            codec = "png"
        else:
            raise ImageConversionError("empty format and data is neither JPEG nor PNG (unknown magic bytes)")
    else:
        raise ImageConversionError(f"unsupported compressed format {fmt!r}; supported: jpeg, png")
    rgb_ordered = False
    if "compressed" in tokens:
        after = tokens[tokens.index("compressed") + 1 :]
        rgb_ordered = bool(after) and after[0].startswith("rgb")
    return codec, rgb_ordered


@_wrap_errors("compressed_to_rgb")
def compressed_to_rgb(msg: object) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg or png) -> H×W×3 uint8 RGB, decoded with cv2.imdecode.

    Grey images are expanded to three channels, alpha is dropped, 16-bit PNGs keep the high byte.
    """
    import cv2

    fmt = _field(msg, "format")
    if not isinstance(fmt, str):
        raise ImageConversionError(f"format must be a string, got {type(fmt).__name__}")
    raw = _as_bytes_array(_field(msg, "data"))
    if raw.size == 0:
        raise ImageConversionError(f"empty compressed data (format {fmt!r})")
    codec, rgb_ordered = _compressed_layout(fmt, raw[:8].tobytes())
    decoded = cv2.imdecode(np.ascontiguousarray(raw), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise ImageConversionError(f"could not decode {raw.size} bytes as {codec} (format {fmt!r})")
    if decoded.dtype == np.uint16:
        decoded = (decoded >> 8).astype(np.uint8)
    elif decoded.dtype != np.uint8:
        raise ImageConversionError(f"decoded {codec} has unsupported sample type {decoded.dtype}")
    if decoded.ndim == 2:
        decoded = decoded[..., None]
    channels = decoded.shape[2]
    if channels == 1:
        out = np.broadcast_to(decoded, (*decoded.shape[:2], 3))
    elif channels in (3, 4):
        # cv2 returns the stored order (BGR for every standard producer).
        out = decoded[..., :3] if rgb_ordered else decoded[..., 2::-1]
    else:
        raise ImageConversionError(f"decoded {codec} has {channels} channels; expected 1, 3 or 4")
    return np.array(out, dtype=np.uint8, order="C", copy=True)


@_wrap_errors("depth_to_meters")
def depth_to_meters(msg: object) -> np.ndarray:
    """Depth sensor_msgs/Image -> H×W float32 metres, NaN where invalid.

    16UC1 (and mono16) are millimetres with 0 = no return (REP 118). 32FC1 is metres; NaN, ±inf,
    0 and negative values are all invalid (drivers use each of them for "no return").
    """
    name, _, view = _pixels(msg, _DEPTH_INPUT, "depth_to_meters")
    plane = view[..., 0]
    if name == "32FC1":
        depth = plane.astype(np.float32)  # owning copy in native byte order
        with np.errstate(invalid="ignore"):
            depth[~(np.isfinite(depth) & (depth > 0))] = np.nan
        return depth
    millimetres = plane.astype(np.float32)
    millimetres[millimetres == 0] = np.nan
    millimetres *= np.float32(0.001)
    return millimetres


@_wrap_errors("mask_from_mono8")
def mask_from_mono8(msg: object) -> np.ndarray:
    """mono8 / 8UC1 ground-truth mask Image -> H×W bool (non-zero = target)."""
    _, _, view = _pixels(msg, _MASK_INPUT, "mask_from_mono8")
    return view[..., 0] != 0  # comparison yields a fresh owning array


@_wrap_errors("instance_ids_from_image")
def instance_ids_from_image(msg: object) -> np.ndarray:
    """Instance-id Image (mono8/8UC1/mono16/16UC1, 0 = background) -> H×W uint16 ids."""
    _, _, view = _pixels(msg, _INSTANCE_INPUT, "instance_ids_from_image")
    return view[..., 0].astype(np.uint16)  # native order, owning


# ---------------------------------------------------------------------------------------------
# Builders for outputs. They return plain dicts so one code path serves rclpy
# (``apply_image_fields(Image(), fields)``) and rosbags (``Image(header=h, **fields)``).
# ---------------------------------------------------------------------------------------------

_OUTPUT_ORDERS = {"rgb8": (0, 1, 2), "bgr8": (2, 1, 0), "rgba8": (0, 1, 2), "bgra8": (2, 1, 0)}


def _fields(height: int, width: int, encoding: str, step: int, data: np.ndarray, big: bool) -> dict[str, Any]:
    return {
        "height": int(height),
        "width": int(width),
        "encoding": encoding,
        "is_bigendian": int(big),  # uint8 in the message definition
        "step": int(step),
        "data": data,
    }


def _check_2d(array_: Any, what: str) -> np.ndarray:
    arr = np.asarray(array_)
    if arr.ndim != 2:
        raise ImageConversionError(f"{what} needs an H×W array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageConversionError(f"{what} got an empty array of shape {arr.shape}")
    return arr


def _check_range(arr: np.ndarray, high: int, what: str) -> None:
    if arr.dtype == np.bool_:
        return
    if arr.dtype.kind not in "iu":
        raise ImageConversionError(f"{what} needs integer or bool values, got {arr.dtype}")
    if arr.min() < 0 or arr.max() > high:
        raise ImageConversionError(f"{what} values must be in 0..{high}, got {arr.min()}..{arr.max()}")


@_wrap_errors("rgb_to_image_fields")
def rgb_to_image_fields(rgb: Any, encoding: str = "rgb8") -> dict[str, Any]:
    """H×W×3 uint8 RGB -> Image fields for encoding rgb8, bgr8, rgba8 or bgra8 (alpha = 255).

    ``data`` is a flat, owning uint8 numpy array without row padding (step = width*channels).
    """
    if encoding not in _OUTPUT_ORDERS:
        raise ImageConversionError(f"unsupported output encoding {encoding!r}; supported: {', '.join(_OUTPUT_ORDERS)}")
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageConversionError(f"rgb_to_image_fields needs an H×W×3 array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ImageConversionError(f"rgb_to_image_fields needs dtype uint8, got {arr.dtype}")
    height, width = arr.shape[:2]
    channels = 4 if encoding.endswith("a8") else 3
    out = np.empty((height, width, channels), dtype=np.uint8)
    out[..., :3] = arr[..., list(_OUTPUT_ORDERS[encoding])]
    if channels == 4:
        out[..., 3] = 255
    return _fields(height, width, encoding, width * channels, out.reshape(-1), big=False)


@_wrap_errors("mono8_fields")
def mono8_fields(array_: Any) -> dict[str, Any]:
    """H×W array of values 0..255 (or bool, stored as 0/1) -> mono8 Image fields.

    Meant for instance-id masks (0 = background) and ground-truth masks.
    """
    arr = _check_2d(array_, "mono8_fields")
    _check_range(arr, 255, "mono8_fields")
    data = np.array(arr, dtype=np.uint8, order="C", copy=True).reshape(-1)
    return _fields(arr.shape[0], arr.shape[1], "mono8", arr.shape[1], data, big=False)


@_wrap_errors("mono16_fields")
def mono16_fields(array_: Any, bigendian: bool = False) -> dict[str, Any]:
    """H×W array of values 0..65535 -> mono16 Image fields (for more than 255 instances)."""
    arr = _check_2d(array_, "mono16_fields")
    _check_range(arr, 65535, "mono16_fields")
    dtype = np.dtype(">u2" if bigendian else "<u2")
    packed = np.array(arr, dtype=dtype, order="C", copy=True)
    data = packed.view(np.uint8).reshape(-1)
    return _fields(arr.shape[0], arr.shape[1], "mono16", arr.shape[1] * 2, data, big=bigendian)


@_wrap_errors("apply_image_fields")
def apply_image_fields(msg: _T, fields: dict[str, Any]) -> _T:
    """Copy builder fields onto an existing message object (rclpy style) and return it.

    rclpy's ``uint8[]`` setter only takes an ``array.array('B')`` quickly (any other sequence is
    checked element by element in Python), so ``data`` becomes one when the message already
    holds an array.array; otherwise the numpy array is kept (what rosbags expects).
    """
    data = np.asarray(fields["data"], dtype=np.uint8).reshape(-1)
    values = {key: fields[key] for key in ("height", "width", "encoding", "is_bigendian", "step")}
    if isinstance(getattr(msg, "data", None), array.array):
        values["data"] = array.array("B", data.tobytes())
    else:
        values["data"] = data
    for key, value in values.items():
        setattr(msg, key, value)
    return msg
