"""image_conversion against real ROS 2 message types (rosbags typestore + CDR round trips)."""

from __future__ import annotations

import array
import contextlib
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
from rosbags.typesys import Stores, get_typestore

from omg_llava_ros.ros.image_conversion import (
    ImageConversionError,
    apply_image_fields,
    compressed_to_rgb,
    depth_to_meters,
    image_to_rgb,
    instance_ids_from_image,
    mask_from_mono8,
    mono8_fields,
    mono16_fields,
    rgb_to_image_fields,
    supported_encodings,
)

TS = get_typestore(Stores.ROS2_HUMBLE)
Image = TS.types["sensor_msgs/msg/Image"]
CompressedImage = TS.types["sensor_msgs/msg/CompressedImage"]
Header = TS.types["std_msgs/msg/Header"]
Time = TS.types["builtin_interfaces/msg/Time"]

IMAGE_T = "sensor_msgs/msg/Image"
COMPRESSED_T = "sensor_msgs/msg/CompressedImage"

RNG = np.random.default_rng(1234)
H, W = 5, 7  # odd sizes catch stride/transposition mistakes
RGB = RNG.integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def header() -> Any:
    return Header(stamp=Time(sec=12, nanosec=345), frame_id="camera_optical")


def roundtrip(msg: Any, typename: str = IMAGE_T) -> Any:
    """Serialise to CDR and back, as a message read from a bag or the wire would look."""
    return TS.deserialize_cdr(bytes(TS.serialize_cdr(msg, typename)), typename)


def pack(pixels: np.ndarray, encoding: str, pad: int = 0, big: bool = False, typename: str = IMAGE_T) -> Any:
    """Build a rosbags Image from an H×W×C (or H×W) array, with `pad` junk bytes per row."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    h, w = pixels.shape[:2]
    if pixels.dtype.itemsize > 1:
        pixels = pixels.astype(pixels.dtype.newbyteorder(">" if big else "<"))
    rows = pixels.reshape(h, -1).view(np.uint8)
    junk = np.full((h, pad), 0xAB, dtype=np.uint8)  # padding must never leak into the result
    data = np.concatenate([rows, junk], axis=1).reshape(-1)
    msg = Image(
        header=header(),
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=int(big),
        step=rows.shape[1] + pad,
        data=data,
    )
    return roundtrip(msg)


def image_ns(**overrides: Any) -> SimpleNamespace:
    """An rclpy-like duck-typed Image (data is array.array('B'))."""
    fields: dict[str, Any] = {
        "header": None,
        "height": H,
        "width": W,
        "encoding": "rgb8",
        "is_bigendian": 0,
        "step": W * 3,
        "data": array.array("B", RGB.tobytes()),
    }
    fields.update(overrides)
    return SimpleNamespace(**fields)


# --------------------------------------------------------------------------- raw colour images


@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize(
    ("encoding", "make"),
    [
        ("rgb8", lambda rgb: rgb),
        ("bgr8", lambda rgb: rgb[..., ::-1]),
        ("8UC3", lambda rgb: rgb[..., ::-1]),
        ("rgba8", lambda rgb: np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])),
        ("bgra8", lambda rgb: np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 7, np.uint8)])),
        ("8UC4", lambda rgb: np.dstack([rgb[..., ::-1], np.full(rgb.shape[:2], 7, np.uint8)])),
    ],
)
def test_colour_encodings_roundtrip(encoding: str, make: Any, pad: int) -> None:
    msg = pack(np.ascontiguousarray(make(RGB)), encoding, pad=pad)
    assert msg.header.frame_id == "camera_optical"
    out = image_to_rgb(msg)
    assert out.shape == (H, W, 3)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
@pytest.mark.parametrize("pad", [0, 3])
def test_mono8_is_replicated_to_three_channels(encoding: str, pad: int) -> None:
    grey = RGB[..., 0]
    out = image_to_rgb(pack(grey, encoding, pad=pad))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("pad", [0, 3])  # odd padding: 16-bit samples end up unaligned
def test_mono16_keeps_high_byte_in_both_byte_orders(encoding: str, big: bool, pad: int) -> None:
    values = RNG.integers(0, 65536, size=(H, W), dtype=np.uint16)
    out = image_to_rgb(pack(values, encoding, pad=pad, big=big))
    np.testing.assert_array_equal(out[..., 0], (values >> 8).astype(np.uint8))
    np.testing.assert_array_equal(out[..., 2], out[..., 0])


def test_big_endian_bytes_written_by_hand() -> None:
    # 0x1234 stored big-endian is b"\x12\x34"; reading it little-endian would give high byte 0x34.
    msg = image_ns(encoding="mono16", is_bigendian=1, width=1, height=1, step=2, data=b"\x12\x34")
    assert image_to_rgb(msg)[0, 0, 0] == 0x12
    msg.is_bigendian = 0
    assert image_to_rgb(msg)[0, 0, 0] == 0x34


def test_is_bigendian_is_ignored_for_8bit() -> None:
    msg = pack(RGB, "rgb8")
    msg_flag = Image(
        header=msg.header,
        height=H,
        width=W,
        encoding="rgb8",
        is_bigendian=1,
        step=W * 3,
        data=msg.data,
    )
    np.testing.assert_array_equal(image_to_rgb(roundtrip(msg_flag)), RGB)


@pytest.mark.parametrize(("encoding", "swap"), [("rgb16", False), ("bgr16", True)])
@pytest.mark.parametrize("big", [False, True])
def test_colour16(encoding: str, swap: bool, big: bool) -> None:
    values = RNG.integers(0, 65536, size=(H, W, 3), dtype=np.uint16)
    stored = values[..., ::-1] if swap else values
    out = image_to_rgb(pack(np.ascontiguousarray(stored), encoding, big=big))
    np.testing.assert_array_equal(out, (values >> 8).astype(np.uint8))


@pytest.mark.parametrize(
    ("encoding", "red_pair"),
    [
        # BT.601 red is about Y=81, U=90, V=240; the two packings order the bytes differently.
        ("yuv422", [90, 81, 240, 81]),  # U Y V Y
        ("yuv422_yuy2", [81, 90, 81, 240]),  # Y U Y V
    ],
)
def test_packed_yuv422(encoding: str, red_pair: list[int]) -> None:
    grey_pair = [128, 128, 128, 128]
    data = bytes(red_pair + grey_pair)
    msg = image_ns(encoding=encoding, width=4, height=1, step=8, data=array.array("B", data))
    out = image_to_rgb(msg).astype(int)
    assert out.shape == (1, 4, 3)
    for px in out[0, :2]:
        assert px[0] > 200 and px[1] < 40 and px[2] < 40, px
    for px in out[0, 2:]:
        assert np.all(np.abs(px - 128) <= 12), px


def test_encoding_names_are_case_insensitive() -> None:
    np.testing.assert_array_equal(image_to_rgb(pack(RGB, "RGB8")), RGB)
    assert "rgb8" in supported_encodings()


# --------------------------------------------------------------------------- duck typing / memory


@pytest.mark.parametrize(
    "wrap",
    [bytes, bytearray, memoryview, list, lambda b: array.array("B", b), lambda b: np.frombuffer(b, np.uint8)],
)
def test_duck_typed_data_containers(wrap: Any) -> None:
    msg = image_ns(data=wrap(RGB.tobytes()))
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)


def test_result_does_not_alias_message_buffer() -> None:
    buf = bytearray(RGB.tobytes())
    msg = image_ns(data=buf)
    out = image_to_rgb(msg)
    buf[:] = bytes(len(buf))  # the middleware may reuse the buffer after the callback
    np.testing.assert_array_equal(out, RGB)
    assert out.flags.writeable

    depth_buf = np.arange(1, H * W + 1, dtype="<u2").view(np.uint8).copy()
    depth = depth_to_meters(image_ns(encoding="16UC1", step=W * 2, data=depth_buf))
    depth_buf[:] = 0
    assert depth[0, 0] == pytest.approx(0.001)
    assert not np.shares_memory(depth, depth_buf)


def test_larger_frame_with_padding() -> None:
    big = RNG.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
    out = image_to_rgb(pack(np.ascontiguousarray(big[..., ::-1]), "bgr8", pad=64))
    np.testing.assert_array_equal(out, big)


# --------------------------------------------------------------------------- depth / masks


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("pad", [0, 1])
def test_depth_16uc1_millimetres(big: bool, pad: int) -> None:
    mm = RNG.integers(1, 10000, size=(H, W), dtype=np.uint16)
    mm[0, 0] = 0
    mm[2, 3] = 0
    out = depth_to_meters(pack(mm, "16UC1", pad=pad, big=big))
    assert out.dtype == np.float32 and out.shape == (H, W)
    invalid = mm == 0
    assert np.all(np.isnan(out[invalid]))
    np.testing.assert_allclose(out[~invalid], mm[~invalid].astype(np.float32) / 1000, rtol=1e-6)


@pytest.mark.parametrize("big", [False, True])
def test_depth_32fc1_metres(big: bool) -> None:
    metres = RNG.uniform(0.2, 5.0, size=(H, W)).astype(np.float32)
    metres[0, 0] = np.nan
    metres[0, 1] = np.inf
    metres[0, 2] = 0.0
    metres[0, 3] = -1.0
    metres[0, 4] = -np.inf
    out = depth_to_meters(pack(metres, "32FC1", pad=2, big=big))
    assert out.dtype == np.float32 and out.dtype.isnative
    assert np.all(np.isnan(out[0, :5]))
    np.testing.assert_array_equal(out[1:], metres[1:])
    np.testing.assert_array_equal(out[0, 5:], metres[0, 5:])


@pytest.mark.parametrize("encoding", ["mono8", "8UC1"])
def test_mask_from_mono8(encoding: str) -> None:
    values = np.zeros((H, W), np.uint8)
    values[1:3, 2:5] = 255
    values[4, 6] = 1  # any non-zero value is target
    mask = mask_from_mono8(pack(values, encoding, pad=3))
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, values != 0)


def test_mask_rejects_colour_images() -> None:
    with pytest.raises(ImageConversionError, match="not supported for mask_from_mono8"):
        mask_from_mono8(pack(RGB, "rgb8"))


# --------------------------------------------------------------------------- compressed


def compressed(fmt: str, payload: bytes) -> Any:
    msg = CompressedImage(header=header(), format=fmt, data=np.frombuffer(payload, np.uint8))
    return roundtrip(msg, COMPRESSED_T)


def encode(ext: str, img: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, img, list(params))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("fmt", ["png", "bgr8; png compressed bgr8", "rgb8; png compressed bgr8", ""])
def test_png_is_lossless(fmt: str) -> None:
    payload = encode(".png", np.ascontiguousarray(RGB[..., ::-1]))  # cv2 encodes BGR
    np.testing.assert_array_equal(compressed_to_rgb(compressed(fmt, payload)), RGB)


def test_png_declared_rgb_target_keeps_channel_order() -> None:
    payload = encode(".png", RGB)  # the producer stored RGB bytes and says so
    out = compressed_to_rgb(compressed("rgb8; png compressed rgb8", payload))
    np.testing.assert_array_equal(out, RGB)


def test_png_grey_alpha_and_16bit() -> None:
    grey = RGB[..., 1]
    out = compressed_to_rgb(compressed("mono8; png compressed mono8", encode(".png", grey)))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))

    bgra = np.dstack([RGB[..., ::-1], np.full((H, W), 9, np.uint8)])
    out = compressed_to_rgb(compressed("png", encode(".png", np.ascontiguousarray(bgra))))
    np.testing.assert_array_equal(out, RGB)

    deep = RNG.integers(0, 65536, size=(H, W), dtype=np.uint16)
    out = compressed_to_rgb(compressed("mono16; png compressed mono16", encode(".png", deep)))
    np.testing.assert_array_equal(out[..., 0], (deep >> 8).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["jpeg", "rgb8; jpeg compressed bgr8", "JPEG", ""])
def test_jpeg_is_close(fmt: str) -> None:
    # Smooth content: JPEG error is small and the mean tells channel swaps apart.
    yy, xx = np.mgrid[0:32, 0:48]
    smooth = np.dstack([xx * 5, yy * 7, np.full_like(xx, 40)]).astype(np.uint8)
    payload = encode(".jpg", np.ascontiguousarray(smooth[..., ::-1]), cv2.IMWRITE_JPEG_QUALITY, 95)
    out = compressed_to_rgb(compressed(fmt, payload))
    assert out.shape == smooth.shape
    assert np.abs(out.astype(int) - smooth.astype(int)).mean() < 4


# --------------------------------------------------------------------------- builders


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_rgb_builder_roundtrip(encoding: str) -> None:
    fields = rgb_to_image_fields(RGB, encoding)
    assert fields["encoding"] == encoding
    assert fields["step"] == W * (4 if encoding.endswith("a8") else 3)
    assert fields["data"].dtype == np.uint8 and fields["data"].ndim == 1
    msg = roundtrip(Image(header=header(), **fields))
    np.testing.assert_array_equal(image_to_rgb(msg), RGB)
    if encoding.startswith("bgr"):
        assert msg.data[0] == RGB[0, 0, 2]
    if encoding.endswith("a8"):
        assert np.all(msg.data[3::4] == 255)


def test_mono8_builder() -> None:
    ids = np.zeros((H, W), np.int64)
    ids[1, 1:4] = 1
    ids[3, 2] = 2
    msg = roundtrip(Image(header=header(), **mono8_fields(ids)))
    assert msg.encoding == "mono8" and msg.step == W
    np.testing.assert_array_equal(instance_ids_from_image(msg), ids)
    np.testing.assert_array_equal(mask_from_mono8(msg), ids != 0)

    bool_mask = ids > 0
    fields = mono8_fields(bool_mask)
    np.testing.assert_array_equal(fields["data"].reshape(H, W), bool_mask.astype(np.uint8))


@pytest.mark.parametrize("big", [False, True])
def test_mono16_builder(big: bool) -> None:
    ids = RNG.integers(0, 600, size=(H, W))
    fields = mono16_fields(ids, bigendian=big)
    assert fields["is_bigendian"] == int(big) and fields["step"] == 2 * W
    msg = roundtrip(Image(header=header(), **fields))
    out = instance_ids_from_image(msg)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, ids)


def test_apply_fields_to_rclpy_like_and_rosbags_like_messages() -> None:
    rclpy_like = SimpleNamespace(
        header=None, height=0, width=0, encoding="", is_bigendian=0, step=0, data=array.array("B")
    )
    apply_image_fields(rclpy_like, rgb_to_image_fields(RGB))
    assert isinstance(rclpy_like.data, array.array) and rclpy_like.data.typecode == "B"
    np.testing.assert_array_equal(image_to_rgb(rclpy_like), RGB)

    bag_like = pack(np.zeros((2, 2), np.uint8), "mono8")
    apply_image_fields(bag_like, mono8_fields(np.eye(3, dtype=np.uint8)))
    assert isinstance(bag_like.data, np.ndarray)
    np.testing.assert_array_equal(instance_ids_from_image(roundtrip(bag_like)), np.eye(3))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: rgb_to_image_fields(RGB[..., 0]), "H×W×3"),
        (lambda: rgb_to_image_fields(RGB.astype(np.float32)), "uint8"),
        (lambda: rgb_to_image_fields(RGB, "yuv422"), "unsupported output encoding"),
        (lambda: rgb_to_image_fields(np.zeros((0, 4, 3), np.uint8)), "H×W×3"),
        (lambda: mono8_fields(np.full((2, 2), 256)), r"0\.\.255"),
        (lambda: mono8_fields(np.full((2, 2), -1)), r"0\.\.255"),
        (lambda: mono8_fields(np.zeros((2, 2, 1), np.uint8)), "H×W"),
        (lambda: mono8_fields(np.zeros((2, 2), np.float32)), "integer or bool"),
        (lambda: mono16_fields(np.full((2, 2), 70000)), r"0\.\.65535"),
        (lambda: mono16_fields(np.zeros((0, 3), np.uint16)), "empty"),
    ],
)
def test_builder_errors(call: Any, match: str) -> None:
    with pytest.raises(ImageConversionError, match=match):
        call()


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"width": 0}, "empty image"),
        ({"height": 0}, "empty image"),
        ({"data": array.array("B", RGB.tobytes()[:-1])}, "data too short"),
        ({"data": b""}, "data too short"),
        ({"step": W * 3 - 1}, "step .* smaller"),
        ({"encoding": "rgb9"}, "unknown encoding 'rgb9'"),
        ({"encoding": ""}, "unknown encoding"),
        ({"encoding": "32FC1", "step": W * 4}, "not supported for image_to_rgb"),
        ({"encoding": None}, "encoding must be a string"),
        ({"width": "7"}, "width must be an integer"),
        ({"data": None}, "data is missing"),
        ({"data": "not bytes"}, "bytes-like, got str"),
        ({"data": np.zeros(H * W * 3, np.float32)}, "dtype uint8"),
        ({"data": array.array("H", [0] * H * W * 3)}, "typecode 'B'"),
        ({"data": [300] * (H * W * 3)}, r"0\.\.255"),
        ({"encoding": "yuv422", "width": 3, "step": 6}, "even width"),
    ],
)
def test_image_to_rgb_malformed(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ImageConversionError, match=match):
        image_to_rgb(image_ns(**overrides))


def test_missing_field_and_not_a_message() -> None:
    msg = image_ns()
    del msg.step
    with pytest.raises(ImageConversionError, match="missing field 'step'"):
        image_to_rgb(msg)
    with pytest.raises(ImageConversionError, match="missing field"):
        compressed_to_rgb(object())
    with pytest.raises(ImageConversionError):
        depth_to_meters(None)


def test_short_data_after_cdr_roundtrip() -> None:
    good = pack(RGB, "rgb8")
    bad = Image(
        header=good.header,
        height=H,
        width=W,
        encoding="rgb8",
        is_bigendian=0,
        step=W * 3,
        data=good.data[: W * 3 * (H - 1)],
    )
    with pytest.raises(ImageConversionError, match="data too short"):
        image_to_rgb(roundtrip(bad))


def test_depth_and_mask_malformed() -> None:
    with pytest.raises(ImageConversionError, match="not supported for depth_to_meters"):
        depth_to_meters(pack(RGB, "rgb8"))
    with pytest.raises(ImageConversionError, match="step"):
        depth_to_meters(image_ns(encoding="32FC1", step=W * 2, data=bytes(W * 2 * H)))
    with pytest.raises(ImageConversionError, match="data too short"):
        mask_from_mono8(image_ns(encoding="mono8", step=W, data=bytes(W * H - 1)))


@pytest.mark.parametrize(
    ("fmt", "payload", "match"),
    [
        ("jpeg", b"", "empty compressed data"),
        ("png", b"definitely not a png", "could not decode"),
        ("jpeg", b"\xff\xd8\xff" + bytes(50), "could not decode"),
        ("tiff", b"II*\x00" + bytes(20), "unsupported compressed format 'tiff'"),
        ("h264", b"\x00\x00\x00\x01" + bytes(20), "unsupported compressed format"),
        ("16UC1; compressedDepth png", b"\x00" * 12 + b"\x89PNG", "compressedDepth"),
        ("", b"garbage", "neither JPEG nor PNG"),
    ],
)
def test_compressed_malformed(fmt: str, payload: bytes, match: str) -> None:
    with pytest.raises(ImageConversionError, match=match):
        compressed_to_rgb(compressed(fmt, payload))


def test_compressed_bad_field_types() -> None:
    with pytest.raises(ImageConversionError, match="format must be a string"):
        compressed_to_rgb(SimpleNamespace(format=None, data=b"\x89PNG"))
    with pytest.raises(ImageConversionError, match="data is missing"):
        compressed_to_rgb(SimpleNamespace(format="png", data=None))


def test_random_garbage_only_raises_image_conversion_error() -> None:
    # Small seeded fuzz over header fields and buffer sizes: the only allowed failure type.
    rng = np.random.default_rng(7)
    encodings = [*supported_encodings(), "32FC1", "bogus", ""]
    for _ in range(300):
        msg = SimpleNamespace(
            header=None,
            height=int(rng.integers(-2, 6)),
            width=int(rng.integers(-2, 6)),
            encoding=str(rng.choice(encodings)),
            is_bigendian=int(rng.integers(0, 2)),
            step=int(rng.integers(-4, 40)),
            data=rng.integers(0, 256, size=int(rng.integers(0, 200)), dtype=np.uint8).tobytes(),
        )
        for fn in (image_to_rgb, depth_to_meters, mask_from_mono8, instance_ids_from_image):
            try:
                out = fn(msg)
            except ImageConversionError:
                continue
            assert out.shape[:2] == (msg.height, msg.width)
        cmsg = SimpleNamespace(format=str(rng.choice(["jpeg", "png", ""])), data=msg.data)
        with contextlib.suppress(ImageConversionError):
            compressed_to_rgb(cmsg)


def test_compressed_rclpy_like_message() -> None:
    payload = encode(".png", np.ascontiguousarray(RGB[..., ::-1]))
    msg = SimpleNamespace(header=None, format="bgr8; png compressed bgr8", data=array.array("B", payload))
    np.testing.assert_array_equal(compressed_to_rgb(msg), RGB)
