"""Property tests: whatever a message or a bag holds, the converters give a result or a clear error.

"Clear" = the converters' own ValueError subclasses (ImageConversionError, MessageError) or, for bags,
BagOpenError / DecodeError: never another exception, never a hang. 1000 examples each.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.image_conversion import ImageConversionError, supported_encodings

EXAMPLES = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CLEAR = (ImageConversionError, m.MessageError)

# Field values of any type a buggy driver or a fuzzer could put there.
junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=8))
small_int = st.one_of(st.integers(min_value=-2, max_value=40), st.integers(min_value=-(2**40), max_value=2**40))
encodings = st.one_of(
    st.sampled_from(supported_encodings() + ("32FC1", "16UC1", "RGB8", "bgr8 ", "", "jpeg")), st.text(max_size=10)
)


@st.composite
def image_messages(draw, encoding_strategy=encodings):
    height = draw(st.one_of(small_int, junk))
    width = draw(st.one_of(small_int, junk))
    encoding = draw(st.one_of(encoding_strategy, junk))
    step = draw(st.one_of(small_int, junk))
    big = draw(st.one_of(st.integers(min_value=-1, max_value=2), junk))
    if draw(st.booleans()) and isinstance(height, int) and isinstance(step, int) and 0 <= height * step <= 20_000:
        # Often the size that matches the declared layout, so conversions get past the size checks.
        data = draw(st.binary(min_size=max(0, height * step), max_size=max(0, height * step)))
    else:
        data = draw(st.one_of(st.binary(max_size=2000), junk, st.lists(st.integers(-300, 300), max_size=20)))
    header = SimpleNamespace(stamp=SimpleNamespace(sec=draw(small_int), nanosec=draw(small_int)), frame_id="cam")
    fields = {"header": header, "height": height, "width": width, "encoding": encoding}
    fields |= {"step": step, "is_bigendian": big, "data": data}
    drop = draw(st.sets(st.sampled_from(sorted(fields))))
    return SimpleNamespace(**{k: v for k, v in fields.items() if k not in drop})


def _clear_or(fn, *args):
    try:
        return fn(*args)
    except CLEAR as exc:
        assert str(exc)  # the reason is logged and listed in replay's errors
        return None


@EXAMPLES
@given(image_messages())
def test_any_image_message_converts_or_fails_clearly(msg):
    rgb = _clear_or(m.rgb_from_message, msg)
    if rgb is not None:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape == (msg.height, msg.width, 3)


@EXAMPLES
@given(image_messages(st.sampled_from(("16UC1", "32FC1", "mono16", "mono8", "bogus"))))
def test_any_depth_message_converts_or_fails_clearly(msg):
    depth = _clear_or(m.depth_from_message, msg)
    if depth is not None:
        assert depth.dtype == np.float32 and depth.shape == (msg.height, msg.width)
        assert not (depth[np.isfinite(depth)] <= 0).any()  # invalid depth is NaN, never 0 or negative


def _encoded(fmt: str) -> bytes:
    image = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png" if fmt == "png" else ".jpg", image)
    assert ok
    return buf.tobytes()


@st.composite
def compressed_messages(draw):
    fmt = draw(st.one_of(st.sampled_from(("jpeg", "png", "rgb8; jpeg compressed bgr8", "bgr8; png compressed")), junk))
    base = _encoded("png" if isinstance(fmt, str) and "png" in fmt else "jpeg")
    kind = draw(st.sampled_from(("valid", "truncated", "flipped", "random", "junk")))
    if kind == "valid":
        data = base
    elif kind == "truncated":
        data = base[: draw(st.integers(0, len(base)))]
    elif kind == "flipped":
        raw = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
        data = bytes(raw)
    elif kind == "random":
        data = draw(st.binary(max_size=500))
    else:
        data = draw(junk)
    header = SimpleNamespace(stamp=SimpleNamespace(sec=1, nanosec=0), frame_id="cam")
    return SimpleNamespace(header=header, format=fmt, data=data)


@EXAMPLES
@given(compressed_messages())
def test_any_compressed_image_decodes_or_fails_clearly(msg):
    rgb = _clear_or(m.rgb_from_message, msg, True)
    if rgb is not None:
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**40), 2**40))


@EXAMPLES
@given(
    k=st.one_of(st.lists(numbers, max_size=12), junk),
    width=st.one_of(small_int, junk),
    height=st.one_of(small_int, junk),
)
def test_any_camera_info_gives_intrinsics_or_fails_clearly(k, width, height):
    msg = SimpleNamespace(k=k, width=width, height=height)
    intrinsics = _clear_or(m.intrinsics_from_camera_info, msg)
    if intrinsics is not None:
        assert np.isfinite([intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy]).all()
        assert intrinsics.fx > 0 and intrinsics.fy > 0


@EXAMPLES
@given(data=st.one_of(st.text(max_size=300), st.binary(max_size=300), junk, st.lists(st.integers(), max_size=3)))
def test_any_command_gives_text_or_fails_clearly_and_the_pipeline_takes_the_text(data):
    from omg_llava_ros.pipeline import PerceptionPipeline

    text = _clear_or(m.command_text, SimpleNamespace(data=data))
    if text is not None:
        assert isinstance(text, str)
        pipeline = PerceptionPipeline(model=None)
        command_id = pipeline.set_command(text)
        command = pipeline.command
        assert command.id == command_id and "\x00" not in command.text
        assert "<image>" not in command.text and "<region>" not in command.text


@EXAMPLES
@given(sec=st.one_of(small_int, junk), nanosec=st.one_of(small_int, junk))
def test_any_header_stamp_is_read_or_fails_clearly(sec, nanosec):
    stamp = _clear_or(
        m.header_stamp, SimpleNamespace(header=SimpleNamespace(stamp=SimpleNamespace(sec=sec, nanosec=nanosec)))
    )
    if stamp is not None:
        assert stamp == (sec, nanosec) and 0 <= nanosec < 1_000_000_000


class _NoModel:
    """Answers instantly with one phrase and no mask: the goal's handling is under test, not the model."""

    def chat(self, image, text, **_):
        return SimpleNamespace(text="<p> it </p>.", clean_text="it.", segments=[])

    def follow(self, image, segments):
        return []


@pytest.fixture(scope="module")
def active_node():
    from omg_llava_ros.ros.node import OmgLlavaNode
    from omg_llava_ros.ros.parameters import NodeParameters
    from omg_llava_ros.ros.transport import MemoryTransport

    node = OmgLlavaNode(
        MemoryTransport(), NodeParameters(warm_up=False, action_timeout_s=0.05), model_loader=lambda p, log: _NoModel()
    )
    node.configure()
    node.activate()
    yield node
    node.shutdown()


@EXAMPLES
@given(
    command=st.one_of(st.text(max_size=50), junk),
    image=st.one_of(image_messages(), junk),
    use_image=st.one_of(st.booleans(), junk),
)
def test_any_action_goal_gets_an_outcome(active_node, command, image, use_image):
    from omg_llava_ros.ros.transport import SegmentGoal

    feedback = []
    outcome = active_node._on_segment_goal(
        SegmentGoal(command, image, bool(use_image)), lambda stage, progress: feedback.append(stage), lambda: False
    )
    assert isinstance(outcome.success, bool) and (outcome.success or outcome.message)
    assert active_node.state == "active"


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layout=st.sampled_from(("metadata.yaml", "x.db3", "x.mcap", "x.bag", "dir_db3")),
    content=st.one_of(st.binary(max_size=400), st.text(max_size=400).map(str.encode)),
)
def test_any_bag_bytes_open_or_fail_clearly(tmp_path_factory, layout, content):
    from omg_llava_ros.replay.bag import BagOpenError, BagSource, DecodeError

    root = tmp_path_factory.mktemp("bag")
    if layout == "metadata.yaml":
        (root / "metadata.yaml").write_bytes(content)
        path = root
    elif layout == "dir_db3":
        (root / "only.db3").write_bytes(content)
        path = root
    else:
        path = root / layout
        path.write_bytes(content)
    try:
        with BagSource(path).open() as bag:
            for msg in bag.messages(list(bag.topics)):
                with contextlib.suppress(DecodeError):
                    bag.deserialize(msg)
    except BagOpenError as exc:
        assert str(path.name) in str(exc) or str(root) in str(exc)


# -- files a user hands us: no pickle anywhere ----------------------------------------------------
PACKAGE = Path(__file__).resolve().parents[1] / "omg_llava_ros"


def _unsafe_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name.endswith("torch.load"):
            value = keywords.get("weights_only")
            if not (isinstance(value, ast.Constant) and value.value is True):
                found.append(f"{name} without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "cloudpickle.load"):
            found.append(name)
        if name.endswith(("np.load", "numpy.load")):
            value = keywords.get("allow_pickle")
            if isinstance(value, ast.Constant) and value.value is not False:
                found.append(f"{name} with allow_pickle")
        if "trust_remote_code" in keywords:
            value = keywords["trust_remote_code"]
            if not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{name} with trust_remote_code not False")
    return found


def test_the_package_never_unpickles_or_runs_remote_code():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        problems += [f"{path.relative_to(PACKAGE.parent)}: {p}" for p in _unsafe_calls(tree)]
    assert problems == []
    # The checker itself sees each kind.
    bad = "\n".join(
        (
            "torch.load(f)",
            "torch.load(f, weights_only=False)",
            "pickle.loads(b)",
            "M.from_pretrained(p, trust_remote_code=True)",
        )
    )
    assert len(_unsafe_calls(ast.parse(bad))) == 4


def _damaged_copies(tmp_path: Path):
    """(what was done, model directory, the file the error must name) for each kind of damage."""
    import json
    import shutil

    from omg_llava_ros.model.omg_llava import EMBEDDED_DIR

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(EMBEDDED_DIR, target)
        return target

    for rel in ("model.safetensors", "llm/model.safetensors"):
        d = copy(f"truncated_{rel.replace('/', '_')}")
        raw = (d / rel).read_bytes()
        (d / rel).write_bytes(raw[: len(raw) // 2])
        yield "truncated", d, d / rel.split("/")[0] if "/" in rel else d / rel
        d = copy(f"garbage_{rel.replace('/', '_')}")
        (d / rel).write_bytes(b"\x00" * 64)
        yield "garbage", d, d / rel.split("/")[0] if "/" in rel else d / rel
    d = copy("shapes")
    config = json.loads((d / "config.json").read_text())
    config["decoder"]["hidden_dim"] *= 2
    (d / "config.json").write_text(json.dumps(config))
    yield "wrong shapes", d, d / "model.safetensors"
    d = copy("not_json")
    (d / "config.json").write_text("{nope")
    yield "not JSON", d, d / "config.json"


def test_damaged_model_files_give_an_error_naming_the_file(tmp_path):
    from omg_llava_ros import OmgLlava
    from omg_llava_ros.model.omg_llava import ModelFileError

    for what, directory, culprit in _damaged_copies(tmp_path):
        with pytest.raises(ModelFileError) as info:
            OmgLlava.from_pretrained(directory)
        assert str(culprit) in str(info.value), (what, str(info.value))
