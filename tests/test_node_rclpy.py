"""The rclpy shell (rclpy_node.py) against stand-ins, since rclpy cannot be installed here.

The stand-in message classes are generated from the real message definitions and are as strict
as rosidl's generated Python setters (a float field refuses an int, a uint8 sequence refuses a
numpy array, a nested field needs its class), so every field dict the node publishes is checked
the way rclpy would check it. The stand-in node/logger follow the rclpy Humble API (the logger
takes one preformatted string). What this cannot show: behaviour of the real rclpy executor,
rmw and lifecycle services.
"""

from __future__ import annotations

import array
import enum
import sys
import time
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omg_llava_ros.ros import messages as m
from omg_llava_ros.ros.transport import resolve_name

_BASE = {
    "bool": "boolean",
    "byte": "octet",
    "char": "char",
    "float32": "float",
    "float64": "double",
    "string": "string",
}
_FLOATS = {"float", "double"}
_INTS = {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "octet", "char"}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Two intra-op threads on a busy 2-core machine run the tiny model ~50x slower (threads spin
    # against each other); one thread is plenty for it. Restored for other test modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _type_string(ftype) -> str:
    node, detail = ftype
    kind = int(node)
    if kind == 1:
        return _BASE.get(detail[0], detail[0])
    if kind == 2:
        pkg, _, name = detail.split("/")
        return f"{pkg}/{name}"
    inner, size = detail
    return f"{_type_string(inner)}[{size}]" if kind == 3 else f"sequence<{_type_string(inner)}>"


class _Registry:
    """Strict rosidl-like message classes for every type of a rosbags typestore."""

    def __init__(self, store) -> None:
        self.store = store
        self.classes: dict[str, type] = {}

    def cls(self, msgtype: str) -> type:
        if msgtype not in self.classes:
            self.classes[msgtype] = self._make(msgtype)
        return self.classes[msgtype]

    def _by_short(self, short: str) -> type:
        pkg, name = short.split("/")
        return self.cls(f"{pkg}/msg/{name}")

    def _make(self, msgtype: str) -> type:
        registry = self
        fields = {name: _type_string(ftype) for name, ftype in self.store.fielddefs[msgtype][1]}

        class Message:
            _fields = fields

            @classmethod
            def get_fields_and_field_types(cls):
                return dict(cls._fields)

            def __init__(self):
                for name, kind in fields.items():
                    object.__setattr__(self, name, registry.default(kind))

            def __setattr__(self, name, value):
                if name not in fields:
                    raise AttributeError(f"{msgtype} has no field {name}")
                registry.check(msgtype, name, fields[name], value)
                object.__setattr__(self, name, value)

        Message.__name__ = msgtype.rsplit("/", 1)[1]
        return Message

    def default(self, kind: str):
        if kind.startswith("sequence<"):
            inner = kind[9:-1]
            return array.array("B") if inner in ("uint8", "octet") else array.array("d") if inner == "double" else []
        if kind.endswith("]"):
            inner, size = kind[:-1].split("[")
            return np.zeros(int(size)) if inner in _FLOATS | _INTS else [self.default(inner) for _ in range(int(size))]
        if kind in _FLOATS:
            return 0.0
        if kind in _INTS:
            return 0
        return {"boolean": False, "string": ""}.get(kind) if kind in ("boolean", "string") else self._by_short(kind)()

    def check(self, msgtype: str, name: str, kind: str, value) -> None:
        where = f"{msgtype}.{name} ({kind})"
        if kind.startswith("sequence<"):
            inner = kind[9:-1]
            if inner in ("uint8", "octet"):
                ok = (isinstance(value, array.array) and value.typecode == "B") or (
                    isinstance(value, (list, tuple)) and all(isinstance(v, int) and 0 <= v < 256 for v in value)
                )
            elif "/" in inner:
                ok = isinstance(value, list) and all(isinstance(v, self._by_short(inner)) for v in value)
            else:
                ok = isinstance(value, (list, tuple, array.array))
        elif kind.endswith("]"):
            size = int(kind[:-1].split("[")[1])
            ok = len(value) == size
        elif kind in _FLOATS:
            ok = isinstance(value, float)
        elif kind in _INTS:
            ok = isinstance(value, int) and not isinstance(value, float)
        elif kind == "boolean":
            ok = isinstance(value, bool)
        elif kind == "string":
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, self._by_short(kind))
        if not ok:
            raise AssertionError(f"rosidl would reject {type(value).__name__} for {where}")


# -- rclpy stand-ins --------------------------------------------------------------------------------
class _Return(enum.Enum):
    SUCCESS = 1
    FAILURE = 2
    ERROR = 3


class _StrictLogger:
    """rclpy's RcutilsLogger: one string argument per call."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _make(level):
        def log(self, message, **kwargs):
            assert isinstance(message, str) and not kwargs.get("args")
            self.lines.append((level, message))

        return log

    debug, info, warning, error = _make("debug"), _make("info"), _make("warning"), _make("error")


class _Publisher:
    def __init__(self, cls, topic):
        self.cls, self.topic_name, self.sent = cls, topic, []

    def publish(self, msg):
        assert isinstance(msg, self.cls)
        self.sent.append(msg)

    def get_subscription_count(self):
        return 1


class _LifecycleNode:
    def __init__(self, node_name, **kwargs):
        self.name, self.params, self.logger = node_name, {}, _StrictLogger()
        self.publishers, self.subscriptions = {}, {}

    def declare_parameter(self, name, value, descriptor=None):
        assert descriptor is not None and descriptor.kwargs["description"]
        self.params[name] = value

    def get_parameter(self, name):
        return SimpleNamespace(value=self.params[name])

    def get_logger(self):
        return self.logger

    def resolve_topic_name(self, topic):
        return resolve_name(topic, "/r", self.name)

    def create_publisher(self, cls, topic, qos):
        pub = _Publisher(cls, self.resolve_topic_name(topic))
        self.publishers[pub.topic_name] = pub
        return pub

    def create_subscription(self, cls, topic, callback, qos, callback_group=None, event_callbacks=None):
        handle = SimpleNamespace(cls=cls, callback=callback, qos=qos, events=event_callbacks)
        self.subscriptions[self.resolve_topic_name(topic)] = handle
        return handle

    def destroy_publisher(self, pub):
        self.publishers.pop(pub.topic_name)

    def destroy_subscription(self, sub):
        self.subscriptions = {k: v for k, v in self.subscriptions.items() if v is not sub}

    def on_activate(self, state):
        return _Return.SUCCESS

    def on_deactivate(self, state):
        return _Return.SUCCESS

    def get_clock(self):
        return SimpleNamespace(now=lambda: SimpleNamespace(seconds_nanoseconds=lambda: (12, 34)))


class _Recorder:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def destroy(self):
        self.destroyed = True


@pytest.fixture
def rclpy_node(monkeypatch):
    """Import omg_llava_ros.ros.rclpy_node with rclpy and the message packages stood in."""
    registry = _Registry(m.make_typestore())
    modules = {
        "rclpy": {},
        "rclpy.action": {
            "ActionServer": type("ActionServer", (_Recorder,), {}),
            "CancelResponse": SimpleNamespace(ACCEPT="accept"),
            "GoalResponse": SimpleNamespace(ACCEPT="accept"),
        },
        "rclpy.callback_groups": {"MutuallyExclusiveCallbackGroup": _Recorder, "ReentrantCallbackGroup": _Recorder},
        "rclpy.lifecycle": {
            "LifecycleNode": _LifecycleNode,
            "LifecycleState": object,
            "TransitionCallbackReturn": _Return,
        },
        "rclpy.qos": {
            "DurabilityPolicy": SimpleNamespace(TRANSIENT_LOCAL="transient_local", VOLATILE="volatile"),
            "HistoryPolicy": SimpleNamespace(KEEP_LAST="keep_last"),
            "ReliabilityPolicy": SimpleNamespace(RELIABLE="reliable", BEST_EFFORT="best_effort"),
            "QoSProfile": lambda **kw: SimpleNamespace(**kw),
            "qos_policy_name_from_kind": lambda kind: {1: "RELIABILITY"}[kind],
        },
        "rclpy.event_handler": {"SubscriptionEventCallbacks": lambda **kw: SimpleNamespace(**kw)},
        "rcl_interfaces": {},
        "rcl_interfaces.msg": {"ParameterDescriptor": _Recorder},
    }
    for package in ("std_msgs", "sensor_msgs", "geometry_msgs", "vision_msgs", "builtin_interfaces", "omg_llava_ros"):
        names = [t for t in registry.store.fielddefs if t.startswith(f"{package}/msg/")]
        modules[f"{package}.msg"] = {n.rsplit("/", 1)[1]: registry.cls(n) for n in names}
    parts = {part: registry.cls(f"omg_llava_ros/action/Segment_{part}") for part in ("Goal", "Result", "Feedback")}
    modules["omg_llava_ros.action"] = {"Segment": SimpleNamespace(**parts)}
    for name, attrs in modules.items():
        mod = types.ModuleType(name)
        for key, value in attrs.items():
            setattr(mod, key, value)
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "omg_llava_ros.ros.rclpy_node", raising=False)
    import omg_llava_ros.ros.rclpy_node as module

    yield module, registry
    sys.modules.pop("omg_llava_ros.ros.rclpy_node", None)


def test_every_published_field_dict_passes_rosidl_setters(rclpy_node):
    module, registry = rclpy_node
    from test_messages import make_result

    result = make_result()
    header = m.header_fields(result.stamp, result.frame_id)
    outputs = {
        m.GROUNDED_SEGMENTATION: m.grounded_segmentation_fields(result),
        m.IMAGE: m.instance_mask_fields(result.instance_ids, header),
        m.DETECTION2D_ARRAY: m.detection_array_fields(result),
        m.POINT_CLOUD2: m.target_cloud_fields(result),
        m.POSE_STAMPED: m.target_pose_fields(result),
    }
    for msgtype, fields in outputs.items():
        msg = module.fill_message(registry.cls(msgtype)(), fields)
        assert msg.header.stamp.sec == result.stamp[0] and msg.header.frame_id == result.frame_id
    res = module.fill_message(registry.cls(m.GROUNDED_SEGMENTATION)(), outputs[m.GROUNDED_SEGMENTATION])
    assert isinstance(res.instance_mask.data, array.array) and len(res.instance_mask.data) == 48
    assert res.objects[0].box.center.position.x == 1.5 and res.objects[0].centroid.z == pytest.approx(1.1)
    overlay = module.fill_message(registry.cls(m.IMAGE)(), m.overlay_fields(result))
    assert overlay.encoding == "rgb8" and len(overlay.data) == 6 * 8 * 3
    with pytest.raises(ValueError, match="no field"):
        module.fill_message(registry.cls(m.IMAGE)(), {"pixels": 1})


def test_helpers_map_qos_names_and_log_text(rclpy_node):
    module, _ = rclpy_node
    from omg_llava_ros.ros.parameters import QosSpec

    profile = module.qos_profile(QosSpec("best_effort", 1, "volatile"))
    assert (profile.reliability, profile.depth, profile.durability) == ("best_effort", 1, "volatile")
    latched = module.qos_profile(QosSpec("reliable", 1, "transient_local"))
    assert (latched.reliability, latched.durability) == ("reliable", "transient_local")
    assert module._element_class("sequence<vision_msgs/Detection2D>").__name__ == "Detection2D"
    assert module._element_class("sequence<vision_msgs/Detection2D, 4>").__name__ == "Detection2D"
    assert module._element_class("geometry_msgs/Point[3]").__name__ == "Point"
    strict = _StrictLogger()
    log = module.RosLogger(strict)
    log.info("images %d, %s", 3, "ok")
    log.log(40, "broken %s", "thing")
    assert strict.lines == [("info", "images 3, ok"), ("error", "broken thing")]


def test_lifecycle_node_runs_the_core_through_rclpy_calls(rclpy_node, tiny_model, monkeypatch):
    module, registry = rclpy_node
    from test_pipeline import ANSWER, force_answer

    import omg_llava_ros.ros.node as node_module

    monkeypatch.setattr(node_module, "load_model", lambda params, log: tiny_model)
    node = module.OmgLlavaLifecycleNode()
    assert node.params["backend"] == "auto" and node.params["autostart"] is True
    node.params.update(backend="torch", stats_period_s=0.0)
    assert node.on_configure(None) == _Return.SUCCESS
    node.core.pipeline.logits_processor = force_answer(tiny_model.tokenizer, ANSWER)
    assert node.on_activate(None) == _Return.SUCCESS, node.logger.lines[-1]
    assert set(node.subscriptions) == {f"/r/omg_llava/{n}" for n in ("image", "depth", "camera_info", "command")}
    image_sub = node.subscriptions["/r/omg_llava/image"]
    assert image_sub.qos.reliability == "best_effort" and image_sub.qos.depth == 1
    image_sub.events.incompatible_qos(SimpleNamespace(last_policy_kind=1, total_count=2))
    assert any("incompatible RELIABILITY" in text for level, text in node.logger.lines if level == "error")

    node.subscriptions["/r/omg_llava/command"].callback(SimpleNamespace(data="pick up the red cup"))
    store = m.RosbagsMessages()
    from omg_llava_ros.ros.image_conversion import rgb_to_image_fields

    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    image = store.build(m.IMAGE, {"header": m.header_fields((5, 6), "cam"), **rgb_to_image_fields(rgb)})
    image_sub.callback(image)
    result_pub = node.publishers["/r/omg_llava/result"]
    deadline = time.monotonic() + 10
    while not result_pub.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    (msg,) = result_pub.sent
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == (5, 6, "cam")
    assert [o.phrase for o in msg.objects] == ["the red cup", "the plate"] and not msg.follow

    server = node.core._handles[-1]
    assert server.args[2] == "~/segment" and server.kwargs["callback_group"] is not None
    handle = SimpleNamespace(
        request=SimpleNamespace(command="the plate", image=image, use_image=True),
        is_cancel_requested=False,
        feedback=[],
        status=None,
    )
    handle.publish_feedback = handle.feedback.append
    handle.succeed = lambda: setattr(handle, "status", "succeeded")
    handle.abort = lambda: setattr(handle, "status", "aborted")
    execute = server.kwargs["execute_callback"]
    result = execute(handle)
    assert handle.status == "succeeded" and result.success and result.result.command == "the plate"
    assert [f.stage for f in handle.feedback] == ["decoding_image", "generating", "done"]

    assert node.on_deactivate(None) == _Return.SUCCESS
    assert node.publishers == {} and node.subscriptions == {}
    assert node.on_cleanup(None) == _Return.SUCCESS and node.core is None
    assert node.on_activate(None) == _Return.ERROR  # not configured: reported, not raised
