"""Vision engines: ONNX export and its checks, ONNX Runtime parity with PyTorch, the engine cache
with a fake TensorRT builder, backend selection, and the build-engines command."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from omg_llava_ros import OmgLlava, Prompt
from omg_llava_ros.engines import backend as backend_mod
from omg_llava_ros.engines import tensorrt_backend
from omg_llava_ros.engines.backend import EngineOptions, build_engines, select_backend, tensorrt_engines
from omg_llava_ros.engines.cache import BuildEnvironment, EngineCache, EngineKey, load_or_build
from omg_llava_ros.engines.export import fp16_safe_classify, load_exported, model_fingerprint, verify_graph
from omg_llava_ros.engines.onnxruntime_backend import OnnxRuntimeVision, OrtOptions, fuse_gelu
from omg_llava_ros.engines.spec import (
    BackendUnavailableError,
    EngineNotBuiltError,
    EngineShapes,
    GraphCheckError,
    GraphSpec,
)
from omg_llava_ros.engines.speed import measure_vision_speed
from omg_llava_ros.engines.trt_operators import SUPPORTED_OPS
from omg_llava_ros.model.config import get_config
from omg_llava_ros.model.omg_decoder import QueryConstraints
from omg_llava_ros.model.omg_llava import TorchVision
from omg_llava_ros.toyworld import render, sample_scene


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def options(cache_root) -> EngineOptions:
    return EngineOptions(cache_dir=cache_root, ort=OrtOptions(device="cpu", intra_op_threads=2))


def tiny_config():
    """The tiny config with the [SEG] decoder copy, so that every graph (and the model's [SEG] path
    through the copy) is exercised by one export."""
    config = get_config("tiny")
    config.decoder.llm_decoder_copy = True
    return config


@pytest.fixture(scope="module")
def tiny_model():
    return OmgLlava.from_config(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def exported(tiny_model, options):
    return backend_mod.prepare_onnx(tiny_model, replace(options, build_if_missing=True))


@pytest.fixture(scope="module")
def ort_model(exported, options):
    """A second tiny model with the same weights (same seed), its vision on ONNX Runtime."""
    model = OmgLlava.from_config(tiny_config(), seed=0)
    model.vision = OnnxRuntimeVision(exported, options.ort)
    return model


@pytest.fixture(scope="module")
def memory(tiny_model):
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    return TorchVision(tiny_model).encode(pixels)[1]


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("model")
    tiny_model.save_pretrained(directory)
    return directory


def scene(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return render(sample_scene(rng), size=224, rng=rng).image


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# -- export and graph checks ---------------------------------------------------------------------
def test_exported_graphs_pass_checker_trt_allow_list_and_shape_checks(exported):
    assert exported.roles == ("encoder", "decoder", "seg_decoder")
    for role in exported.roles:
        report = verify_graph(exported.path(role))
        assert report.problems == []
        assert set(report.ops) <= set(SUPPORTED_OPS)
        assert 17 <= report.opset <= 20
    enc = verify_graph(exported.encoder_path)
    assert enc.inputs == {"pixels": ["images", 3, 256, 256]}
    assert enc.outputs["memory_2"] == ["images", 32 * 32, 64]
    dec = verify_graph(exported.decoder_path)
    assert dec.inputs["query"] == ["batch", "queries", 64]
    assert dec.inputs["mask_features"] == [1, 64, 64, 64]  # one image's memory
    assert dec.outputs == {
        "mask_logits": ["batch", "queries", 64, 64],
        "query_out": ["batch", "queries", 64],
        "class_logits": ["batch", "queries", 7],
        "iou": ["batch", "queries", 1],
    }


def test_fp16_safe_class_head_equals_the_model_head_including_empty_masks(tiny_model, memory):
    dec = tiny_model.omg_decoder
    gen = torch.Generator().manual_seed(4)
    query = torch.randn(2, 5, 64, generator=gen)
    logits = torch.randn(2, 5, 64, 64, generator=gen)
    logits[0, 1] = -1.0  # an empty mask: the pooling denominator is 0 + 1e-8 in the model
    ref = dec.classify(query, logits, memory.mask_features)
    torch.testing.assert_close(fp16_safe_classify(dec, query, logits, memory.mask_features), ref)


def _tiny_graph(nodes, inputs, outputs, opset: int = 18, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_verify_graph_reports_unsupported_ops_and_value_dependent_shapes():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    nonzero = _tiny_graph(
        [helper.make_node("NonZero", ["x"], ["y"], name="nz")],
        [x],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1, "k"])],
    )
    with pytest.raises(GraphCheckError, match="data-dependent"):
        verify_graph(nonzero)

    det = _tiny_graph(
        [helper.make_node("Det", ["m"], ["d"], name="det")],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [])],
    )
    report = verify_graph(det, raise_on_error=False)
    assert any("Det is not supported by TensorRT" in p for p in report.problems)

    # A Reshape whose target shape is computed from tensor values, not from input shapes.
    shape_from_data = _tiny_graph(
        [
            helper.make_node("Cast", ["s"], ["s64"], to=TensorProto.INT64, name="cast"),
            helper.make_node("Reshape", ["x", "s64"], ["y"], name="reshape"),
        ],
        [x, helper.make_tensor_value_info("s", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    report = verify_graph(shape_from_data, raise_on_error=False)
    assert any("reshape" in p and "depends on tensor values" in p for p in report.problems)

    # The same Reshape fed from the input's own shape is fine.
    shape_from_shape = _tiny_graph(
        [
            helper.make_node("Shape", ["x"], ["s"], name="shape"),
            helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape"),
        ],
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    assert verify_graph(shape_from_shape).problems == []

    relu = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    report = verify_graph(_tiny_graph(relu, [x], [y], opset=22), raise_on_error=False)
    assert any("opset 22" in p for p in report.problems)


# -- ONNX Runtime parity ---------------------------------------------------------------------------
def test_ort_encoder_matches_torch(tiny_model, ort_model):
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(7))
    last_t, mem_t = TorchVision(tiny_model).encode(pixels)
    last_o, mem_o = ort_model.vision.encode(pixels)
    torch.testing.assert_close(last_o, last_t, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mem_o.mask_features, mem_t.mask_features, atol=1e-4, rtol=1e-4)
    for a, b in zip(mem_o.memories, mem_t.memories, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(mem_o.positions, mem_t.positions, strict=True):
        torch.testing.assert_close(a, b)
    assert mem_o.level_shapes == mem_t.level_shapes


def test_gelu_fusion_replaces_every_erf_gelu_and_keeps_the_outputs(exported):
    import onnxruntime as ort

    path = str(exported.path("encoder"))
    plain = onnx.load(path)
    fused = onnx.load_from_string(fuse_gelu(path))
    erfs = sum(n.op_type == "Erf" for n in plain.graph.node)
    assert erfs > 0  # ConvNeXt's GELUs, as the torch exporter writes them
    assert not any(n.op_type == "Erf" for n in fused.graph.node)
    assert sum(n.op_type == "Gelu" and n.domain == "com.microsoft" for n in fused.graph.node) == erfs
    feeds = {"pixels": np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, feeds)
    b = ort.InferenceSession(fused.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


def test_sessions_fuse_once_and_reuse_the_copy_beside_the_export(exported, options, monkeypatch):
    from omg_llava_ros.engines import onnxruntime_backend

    OnnxRuntimeVision(exported, options.ort)  # writes the fused copies (or finds them)
    fused = exported.directory / f"encoder.{exported.hashes['encoder'][:16]}.ort.onnx"
    assert fused.is_file()
    assert not any(n.op_type == "Erf" for n in onnx.load(str(fused)).graph.node)

    def fuse_again(path):
        raise AssertionError(f"{path} fused again")

    monkeypatch.setattr(onnxruntime_backend, "fuse_gelu", fuse_again)
    OnnxRuntimeVision(exported, options.ort)


def _constraints(batch: int, n: int, level_shapes, seed: int) -> QueryConstraints:
    """Box-like allowed regions and a mix of prompt kinds (use_prediction False = mask prompt)."""
    gen = torch.Generator().manual_seed(seed)
    allowed = []
    for h, w in level_shapes:
        grid = torch.zeros(batch, n, h, w, dtype=torch.bool)
        grid[..., h // 4 : 3 * h // 4, : w // 2] = True
        grid |= torch.rand(batch, n, h, w, generator=gen) < 0.1
        allowed.append(grid.flatten(2))
    use = torch.rand(batch, n, generator=gen) < 0.5
    return QueryConstraints(allowed, use)


@pytest.mark.parametrize("n", [1, 3, 7])
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_ort_decoder_matches_torch_for_any_query_count(tiny_model, ort_model, memory, n, constrained):
    c = tiny_model.config.decoder.hidden_dim
    gen = torch.Generator().manual_seed(n)
    for batch in (1, 3):
        q, pos = torch.randn(batch, n, c, generator=gen), torch.randn(batch, n, c, generator=gen)
        cons = _constraints(batch, n, memory.level_shapes, n) if constrained else None
        ref = TorchVision(tiny_model).decode(q, pos, memory, cons, with_class=True)
        out = ort_model.vision.decode(q, pos, memory, cons, with_class=True)
        torch.testing.assert_close(out.mask_logits[-1], ref.mask_logits[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.query, ref.query, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.class_logits, ref.class_logits, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(out.iou, ref.iou, atol=1e-4, rtol=1e-4)
        assert out.mask_logits[-1].shape == (batch, n, 64, 64)
        without_class = ort_model.vision.decode(q, pos, memory, cons)
        assert without_class.class_logits is None and without_class.iou is None


def test_constraints_change_the_ort_result(ort_model, memory):
    """The constraint inputs are live in the graph, not folded away."""
    c = ort_model.config.decoder.hidden_dim
    q, pos = torch.randn(2, 1, c), torch.randn(2, 1, c)
    free = ort_model.vision.decode(q, pos, memory)
    cons = _constraints(2, 1, memory.level_shapes, 0)
    cons.use_prediction[:] = False
    constrained = ort_model.vision.decode(q, pos, memory, cons)
    assert not torch.allclose(free.query, constrained.query)


def test_end_to_end_chat_follow_perceive_match_torch(tiny_model, ort_model):
    assert model_fingerprint(ort_model) == model_fingerprint(tiny_model)
    tok = tiny_model.tokenizer
    answer = "<p> the red circle </p> [SEG] and <p> the star </p> [SEG]."
    target = tok.encode(answer, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]

    def force(generated, logits):
        out = torch.full_like(logits, -1e9)
        out[target[min(len(generated), len(target) - 1)]] = 0
        return out

    ious = []
    for seed in (0, 1):
        image, other = scene(seed), scene(seed + 10)
        results = {}
        for name, model in (("torch", tiny_model), ("ort", ort_model)):
            free = model.chat(image, "What is on the table?", max_new_tokens=12)
            boxed = model.chat(image, "What is <region>?", prompts=[Prompt.box(20, 30, 120, 150)], max_new_tokens=8)
            seg = model.chat(image, "Please segment the red circle.", logits_processor=force)
            followed = model.follow(other, seg.segments)
            panoptic = model.perceive(image)
            results[name] = (free, boxed, seg, followed, panoptic)
        (f_t, b_t, s_t, fo_t, p_t), (f_o, b_o, s_o, fo_o, p_o) = results["torch"], results["ort"]
        assert f_o.text == f_t.text and b_o.text == b_t.text and s_o.text == s_t.text
        assert [s.label for s in p_o] == [s.label for s in p_t]
        pairs = [*zip(s_o.segments, s_t.segments, strict=True), *zip(fo_o, fo_t, strict=True)]
        pairs += list(zip(p_o, p_t, strict=True))
        ious += [iou(a.mask, b.mask) for a, b in pairs]
    assert len(ious) > 8 and min(ious) >= 0.99


def test_seg_decoder_copy_runs_in_its_own_graph(tiny_model, ort_model, memory):
    q, pos = torch.randn(2, 1, 64), torch.randn(2, 1, 64)
    for seg in (False, True):
        ref = TorchVision(tiny_model).decode(q, pos, memory, seg_decoder=seg)
        out = ort_model.vision.decode(q, pos, memory, seg_decoder=seg)
        torch.testing.assert_close(out.mask_logits[-1], ref.mask_logits[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.query, ref.query, atol=1e-4, rtol=1e-4)
    plain = ort_model.vision.decode(q, pos, memory).mask_logits[-1]
    assert not torch.allclose(plain, ort_model.vision.decode(q, pos, memory, seg_decoder=True).mask_logits[-1])


def test_ort_backend_rejects_bad_input_clearly(ort_model, memory):
    vision = ort_model.vision
    with pytest.raises(ValueError, match=r"pixels must be \(images, 3, 256, 256\)"):
        vision.encode(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match=r"query must be \(batch, queries, 64\)"):
        vision.decode(torch.zeros(1, 2, 32), torch.zeros(1, 2, 32), memory)
    with pytest.raises(ValueError, match="query_pos"):
        vision.decode(torch.zeros(1, 2, 64), torch.zeros(1, 3, 64), memory)
    two_images = replace(memory, mask_features=memory.mask_features.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="one image's memory"):
        vision.decode(torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), two_images)
    bad = QueryConstraints([torch.ones(1, 2, 7, dtype=torch.bool)] * 3, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"constraints.allowed\[0\] must be \(batch, queries, 64\)"):
        vision.decode(torch.zeros(1, 2, 64), torch.zeros(1, 2, 64), memory, bad)
    with pytest.raises(ValueError, match="OrtOptions.device"):
        OrtOptions(device="gpu")


# -- cache with a fake TensorRT ------------------------------------------------------------------------
class FakeBuilder:
    """Stands in for TensorRT: an "engine" is the key digest it was built for."""

    def __init__(self, version: str = "10.3.0", gpu: str = "Orin", cc: str = "8.7"):
        self.env = BuildEnvironment(version, gpu, cc)
        self.builds: list[str] = []

    def environment(self) -> BuildEnvironment:
        return self.env

    def build(self, onnx_path: Path, profile, precision: str, role: str) -> bytes:
        assert onnx_path.is_file()
        self.builds.append(role)
        return json.dumps({"engine": role, "precision": precision, "profile": sorted(profile)}).encode()

    def deserialize(self, data: bytes):
        try:
            return json.loads(data)
        except ValueError:
            return None  # what TensorRT's deserialize_cuda_engine does with bad bytes


PROFILE = {"query": ((1, 1, 64), (1, 8, 64), (16, 12, 64))}


def _key(env: BuildEnvironment, **changes) -> EngineKey:
    base = {"role": "decoder", "onnx_sha256": "ab" * 32, "precision": "fp16", "profile": PROFILE}
    base.update(changes)
    return EngineKey.make(base["role"], base["onnx_sha256"], env, base["precision"], base["profile"])


def test_engine_key_covers_every_field():
    env = BuildEnvironment("10.3.0", "Orin", "8.7")
    key = _key(env)
    variants = [
        _key(BuildEnvironment("10.0.1", "Orin", "8.7")),
        _key(BuildEnvironment("10.3.0", "NVIDIA GeForce RTX 4090", "8.7")),
        _key(BuildEnvironment("10.3.0", "Orin", "8.9")),
        _key(env, onnx_sha256="cd" * 32),
        _key(env, precision="fp32"),
        _key(env, role="encoder"),
        _key(env, profile={"query": ((1, 1, 64), (1, 8, 64), (16, 300, 64))}),
    ]
    digests = {key.digest, *(v.digest for v in variants)}
    assert len(digests) == len(variants) + 1
    assert EngineKey.from_dict(json.loads(json.dumps(key.to_dict()))) == key
    assert key.differences(variants[0]) == ["tensorrt version 10.0.1 → 10.3.0"]
    assert key.differences(variants[-1]) == ["optimisation-profile shapes differ"]
    with pytest.raises(ValueError, match="precision"):
        _key(env, precision="int4")


def _load(cache, key, builder, allowed=True, onnx_path=None):
    onnx_path = onnx_path or Path(__file__)
    return load_or_build(
        cache,
        key,
        lambda: builder.build(onnx_path, PROFILE, key.precision, key.role),
        builder.deserialize,
        build_if_missing=allowed,
        how_to_build="Run `omg-llava-ros build-engines`",
    )


def test_cache_miss_hit_and_no_build_unless_allowed(tmp_path):
    cache, builder = EngineCache(tmp_path), FakeBuilder()
    key = _key(builder.env)
    with pytest.raises(EngineNotBuiltError, match="no cached decoder engine.*build-engines"):
        _load(cache, key, builder, allowed=False)
    assert builder.builds == []
    engine = _load(cache, key, builder)
    assert engine["engine"] == "decoder" and builder.builds == ["decoder"]
    assert cache.engine_path(key).is_file() and cache.record_path(key).is_file()
    assert _load(cache, key, builder, allowed=False) == engine  # a hit needs no permission
    assert builder.builds == ["decoder"]


@pytest.mark.parametrize("damage", ["truncate", "no_record", "garbage_record", "undeserializable"])
def test_corrupt_cached_engine_is_rebuilt_with_a_log_line(tmp_path, caplog, damage):
    cache, builder = EngineCache(tmp_path), FakeBuilder()
    key = _key(builder.env)
    _load(cache, key, builder)
    path, record = cache.engine_path(key), cache.record_path(key)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:5])
        reason = "truncated or modified"
    elif damage == "no_record":
        record.unlink()
        reason = "no key record"
    elif damage == "garbage_record":
        record.write_text("{not json")
        reason = "unreadable"
    else:  # right hash, but the runtime cannot load it
        cache.store(key, b"\x00not an engine")
        reason = "could not be deserialized"
    with pytest.raises(EngineNotBuiltError, match=reason):
        _load(cache, key, builder, allowed=False)
    with caplog.at_level(logging.WARNING, logger="omg_llava_ros.engines.cache"):
        engine = _load(cache, key, builder)
    assert engine["engine"] == "decoder" and builder.builds == ["decoder", "decoder"]
    assert any(reason in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert _load(cache, key, builder, allowed=False) == engine  # and the rebuilt one is a hit


def test_mismatching_engine_is_never_loaded(tmp_path, caplog):
    cache, old = EngineCache(tmp_path), FakeBuilder(version="10.0.1")
    _load(cache, _key(old.env), old)
    new = FakeBuilder(version="10.3.0")
    loaded: list[bytes] = []
    new.deserialize = lambda data: loaded.append(data) or json.loads(data)
    with pytest.raises(EngineNotBuiltError, match="tensorrt version 10.0.1 → 10.3.0"):
        _load(cache, _key(new.env), new, allowed=False)
    assert loaded == []
    with caplog.at_level(logging.WARNING, logger="omg_llava_ros.engines.cache"):
        _load(cache, _key(new.env), new)
    assert new.builds == ["decoder"]
    assert any("built for another setup" in r.getMessage() for r in caplog.records)
    stored = json.loads(cache.record_path(_key(new.env)).read_text())
    assert stored["key"]["tensorrt_version"] == "10.3.0"


def test_tensorrt_engines_keyed_by_onnx_hash_and_profile(tiny_model, exported, options):
    builder = FakeBuilder()
    opts = replace(options, build_if_missing=True, max_queries=12)
    _, engines = tensorrt_engines(tiny_model, opts, builder)
    assert set(engines) == {"encoder", "decoder", "seg_decoder"}
    assert sorted(builder.builds) == ["decoder", "encoder", "seg_decoder"]
    record = json.loads((exported.directory / "decoder.fp16.engine.json").read_text())
    assert record["key"]["onnx_sha256"] == exported.hashes["decoder"]
    assert record["key"]["shapes"]["query"] == [[1, 1, 64], [1, 8, 64], [16, 12, 64]]
    tensorrt_engines(tiny_model, replace(opts, build_if_missing=False), builder)  # all hits
    assert len(builder.builds) == 3
    # More queries: only the decoders' profile changes, so the encoder engine is kept.
    tensorrt_engines(tiny_model, replace(opts, max_queries=40), builder)
    assert builder.builds[3:] == ["decoder", "seg_decoder"]


def test_engine_shapes_profiles(exported):
    spec = exported.spec
    shapes = EngineShapes(max_queries=12, max_batch=4, opt_queries=8)
    profile = shapes.decoder_profile(spec)
    assert profile["query"] == ((1, 1, 64), (1, 8, 64), (4, 12, 64))
    assert profile["allowed_2"] == ((1, 1, 1024), (1, 8, 1024), (4, 12, 1024))
    assert "memory_0" not in profile and "mask_features" not in profile  # static inputs
    assert EngineShapes(max_queries=4).opt_queries == 4
    assert shapes.encoder_profile(spec)["pixels"][2] == (1, 3, 256, 256)
    with pytest.raises(ValueError, match="max_batch"):
        EngineShapes(max_queries=4, max_batch=0)
    assert GraphSpec.from_dict(spec.to_dict()) == spec


# -- backend selection ------------------------------------------------------------------------------------
@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(tensorrt_backend, "tensorrt_importable", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_without_tensorrt_or_gpu_takes_onnxruntime_cpu(tiny_model, exported, options, no_gpu, caplog):
    with caplog.at_level(logging.INFO, logger="omg_llava_ros.engines.backend"):
        vision = select_backend("auto", tiny_model, options)
    assert isinstance(vision, OnnxRuntimeVision) and vision.options.device == "cpu"
    chosen = [r.getMessage() for r in caplog.records if "auto" in r.getMessage()]
    assert chosen and "ONNX Runtime on CPU" in chosen[-1] and "TensorRT: not installed" in chosen[-1]


def test_auto_prefers_tensorrt_then_falls_back_when_not_built(tiny_model, exported, options, monkeypatch, caplog):
    monkeypatch.setattr(tensorrt_backend, "tensorrt_importable", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(backend_mod, "cuda_provider_available", lambda: False)
    sentinel = TorchVision(tiny_model)
    monkeypatch.setattr(backend_mod, "tensorrt_vision", lambda model, opts: sentinel)
    assert select_backend("auto", tiny_model, options) is sentinel

    def not_built(model, opts):
        raise EngineNotBuiltError("no cached encoder engine")

    monkeypatch.setattr(backend_mod, "tensorrt_vision", not_built)
    with caplog.at_level(logging.WARNING, logger="omg_llava_ros.engines.backend"):
        vision = select_backend("auto", tiny_model, options)
    assert isinstance(vision, OnnxRuntimeVision)
    assert any("TensorRT not usable" in r.getMessage() for r in caplog.records)


def test_nothing_built_gives_a_clear_error(tiny_model, tmp_path, no_gpu):
    empty = EngineOptions(cache_dir=tmp_path, export_on_cpu=False)
    with pytest.raises(EngineNotBuiltError, match="build-engines"):
        select_backend("onnxruntime", tiny_model, empty)
    with pytest.raises(EngineNotBuiltError, match="no vision engine backend is usable"):
        select_backend("auto", tiny_model, empty)
    assert not any(tmp_path.iterdir())  # nothing was exported behind the user's back


def test_auto_on_a_machine_with_no_gpu_exports_once_with_a_log_line(tiny_model, tmp_path, no_gpu, caplog):
    options = EngineOptions(cache_dir=tmp_path)  # export_on_cpu is the default
    with pytest.raises(EngineNotBuiltError, match="build-engines"):
        select_backend("onnxruntime", tiny_model, options)  # asked for by name: never exported behind its back
    with caplog.at_level(logging.WARNING, logger="omg_llava_ros.engines.backend"):
        first = select_backend("auto", tiny_model, options)
    assert isinstance(first, OnnxRuntimeVision)
    assert sum("exporting them once" in r.getMessage() for r in caplog.records) == 1
    written = sorted(p for p in tmp_path.rglob("*.onnx"))
    assert written, "auto exported no graphs"
    stamps = {p: p.stat().st_mtime_ns for p in written}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="omg_llava_ros.engines.backend"):
        again = select_backend("auto", tiny_model, options)
    assert isinstance(again, OnnxRuntimeVision)
    assert not any("exporting" in r.getMessage() for r in caplog.records)  # the second start reuses them
    assert {p: p.stat().st_mtime_ns for p in written} == stamps


def test_tensorrt_requested_but_missing(tiny_model, options, monkeypatch, tmp_path):
    monkeypatch.setattr(tensorrt_backend, "tensorrt_importable", lambda: False)
    with pytest.raises(BackendUnavailableError, match="TensorRT.*not installed.*pip install tensorrt"):
        select_backend("tensorrt", tiny_model, options)
    with pytest.raises(BackendUnavailableError, match="python3-libnvinfer"):
        build_engines(tiny_model, "tensorrt", EngineOptions(cache_dir=tmp_path))
    assert not any(tmp_path.iterdir())  # checked before the export
    with pytest.raises(ValueError, match="unknown vision backend"):
        select_backend("openvino", tiny_model, options)


def test_import_tensorrt_error_is_clear():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendUnavailableError, match="engines/README.md"):
            tensorrt_backend.import_tensorrt()
    else:  # pragma: no cover - only on machines with TensorRT
        pytest.skip("TensorRT is installed here")


def test_from_config_and_from_pretrained_take_a_backend(exported, cache_root, model_dir, monkeypatch, no_gpu):
    monkeypatch.setenv("OMG_LLAVA_ROS_ENGINES", str(cache_root))
    model = OmgLlava.from_config(tiny_config(), seed=0, backend="onnxruntime")
    assert isinstance(model.vision, OnnxRuntimeVision)
    loaded = OmgLlava.from_pretrained(model_dir, backend="auto")
    assert isinstance(loaded.vision, OnnxRuntimeVision)
    assert isinstance(OmgLlava.from_pretrained(model_dir).vision, TorchVision)
    monkeypatch.setenv("OMG_LLAVA_ROS_ENGINES", str(cache_root / "empty"))
    with pytest.raises(EngineNotBuiltError, match="build-engines"):
        OmgLlava.from_config(tiny_config(), seed=0, backend="onnxruntime")


def test_stale_export_is_not_used(tiny_model, exported, tmp_path):
    other = OmgLlava.from_config(tiny_config(), seed=5)
    with pytest.raises(EngineNotBuiltError, match="other weights"):
        load_exported(exported.directory, model_fingerprint(other))
    onnx_copy = tmp_path / "export"
    onnx_copy.mkdir()
    for f in exported.directory.glob("*.onnx"):
        (onnx_copy / f.name).write_bytes(f.read_bytes())
    (onnx_copy / "export.json").write_text((exported.directory / "export.json").read_text())
    (onnx_copy / "decoder.onnx").write_bytes(b"broken")
    with pytest.raises(EngineNotBuiltError, match="modified or is corrupt"):
        load_exported(onnx_copy)


# -- command line and speed -------------------------------------------------------------------------------
def test_build_engines_command(cache_root, exported, model_dir, capsys, no_gpu):
    from omg_llava_ros.cli import main

    args = ["build-engines", "--model", str(model_dir), "--cache-dir", str(cache_root)]
    assert main([*args, "--backend", "onnxruntime"]) == 0  # the export is in the cache already
    out = capsys.readouterr().out
    assert str(exported.directory) in out and out.count("checks passed") == 3
    with pytest.raises(SystemExit, match="not installed"):
        main([*args, "--backend", "tensorrt"])
    assert main([*args, "--trtexec"]) == 0
    out = capsys.readouterr().out
    assert "--minShapes=query:1x1x64,query_pos:1x1x64,allowed_0:1x1x64" in out
    assert "--maxShapes=query:16x12x64" in out and "--minShapes=pixels:1x3x256x256" in out
    assert out.count("--fp16") == 3 and "seg_decoder.fp16.trtexec.engine" in out
    with pytest.raises(SystemExit, match="int8"):
        main([*args, "--backend", "onnxruntime", "--precision", "int8"])


def test_measure_vision_speed_reports_both_backends(tiny_model, ort_model):
    speed = measure_vision_speed(tiny_model, ort_model.vision, repeats=1, warmup=0)
    assert speed.backend == "onnxruntime" and speed.repeats == 1
    for times in (speed.torch, speed.other):
        parts = times.encode + times.panoptic + times.seg_queries + times.prompts
        assert times.total > 0 and parts == pytest.approx(times.total, rel=1e-6)
    assert speed.ratio == pytest.approx(speed.torch.total / speed.other.total)
    with pytest.raises(ValueError, match="repeats"):
        measure_vision_speed(tiny_model, ort_model.vision, repeats=0)


class _EngineOverOrt:
    """A stand-in TensorRT engine that runs an ONNX Runtime session on the feeds it is given."""

    def __init__(self, ort_vision: OnnxRuntimeVision, role: str, calls: list[int]):
        self.ort, self.role, self.calls = ort_vision, role, calls

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls.append(len(feeds.get("query", feeds.get("pixels"))))
        if self.role == "encoder":
            return self.ort.run_encoder(feeds["pixels"])
        b, n = feeds["query"].shape[:2]
        return self.ort.run_decoder(self.role, feeds, b, n)


def test_the_tensorrt_backend_splits_calls_over_its_profile_and_matches_one_call(ort_model, memory):
    from omg_llava_ros.engines.spec import EngineShapes
    from omg_llava_ros.engines.tensorrt_backend import TensorRTVision

    ort = ort_model.vision
    calls: list[int] = []
    trt = object.__new__(TensorRTVision)  # no TensorRT here: its engines are ONNX Runtime sessions
    trt.engines = {role: _EngineOverOrt(ort, role, calls) for role in ort.sessions}
    trt.spec, trt.positions, trt.device = ort.spec, ort.positions, torch.device("cpu")
    trt.shapes = EngineShapes(max_queries=8, max_batch=2, max_images=1)
    q = torch.randn(5, 3, ort.spec.hidden_dim, generator=torch.Generator().manual_seed(1))
    pos = torch.randn_like(q)
    whole, split = ort.decode(q, pos, memory, with_class=True), trt.decode(q, pos, memory, with_class=True)
    assert calls == [2, 2, 1]  # five items over a profile of two
    for a, b in zip(whole.mask_logits, split.mask_logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(whole.class_logits, split.class_logits, atol=1e-5)
    pixels = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    calls.clear()
    last, mem = trt.encode(pixels)
    ort_last, ort_mem = ort.encode(pixels)
    assert calls == [1, 1] and torch.allclose(last, ort_last, atol=1e-5)
    assert torch.allclose(mem.mask_features, ort_mem.mask_features, atol=1e-5)
    with pytest.raises(ValueError, match="max-queries"):
        trt.decode(torch.randn(1, 9, ort.spec.hidden_dim), torch.randn(1, 9, ort.spec.hidden_dim), memory)


def test_onnxruntime_changes_its_thread_count_with_the_same_outputs(exported, options):
    vision = OnnxRuntimeVision(exported, replace(options.ort, intra_op_threads=2))
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    two = vision.run_encoder(pixels)
    first = vision.sessions
    vision.set_threads(1)
    assert vision.threads == 1 and vision.sessions is not first
    assert all(s.get_session_options().intra_op_num_threads == 1 for s in vision.sessions.values())
    one = vision.run_encoder(pixels)
    for name in two:
        assert torch.allclose(one[name], two[name], atol=1e-4), name
    vision.set_threads(2)  # the first sessions again, not new ones
    assert vision.sessions is first and vision.threads == 2
    with pytest.raises(ValueError, match="threads"):
        vision.set_threads(0)


def test_eval_command_runs_on_the_backend_asked_for(tmp_path, monkeypatch, capsys, no_gpu):
    from omg_llava_ros.cli import main

    monkeypatch.setenv("OMG_LLAVA_ROS_ENGINES", str(tmp_path))
    args = ["eval", "--model", "config:tiny", "--samples", "2", "--only", "follow", "--json"]
    with pytest.raises(SystemExit, match="build-engines"):  # by name: never exported behind the user's back
        main([*args, "--backend", "onnxruntime"])
    assert main([*args, "--backend", "auto"]) == 0  # auto on a CPU: exported once, then ONNX Runtime
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["follow_miou"] <= 1.0
    assert any(tmp_path.rglob("encoder.onnx"))
