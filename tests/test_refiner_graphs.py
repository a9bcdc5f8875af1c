"""The mask refiner's convolutions as ONNX Runtime graphs: the same numbers as PyTorch for any crop,
the same masks through the model, exported beside the vision graphs only when building is allowed,
re-exported (or left to PyTorch) when a file is damaged, and on the backend's thread count."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from omg_llava_ros import OmgLlava
from omg_llava_ros.engines import backend as backend_mod
from omg_llava_ros.engines.backend import EngineOptions, build_engines, select_backend
from omg_llava_ros.engines.onnxruntime_backend import OnnxRuntimeVision, OrtOptions
from omg_llava_ros.engines.refiner_graphs import (
    OnnxRuntimeRefiner,
    export_refiner,
    onnxruntime_refiner,
    refiner_paths,
)
from omg_llava_ros.model.config import get_config
from omg_llava_ros.model.mask_refiner import ImageGuide, MaskRefiner
from omg_llava_ros.toyworld import render, sample_scene


def trained_like(refiner: MaskRefiner, seed: int) -> MaskRefiner:
    """An untrained head is the identity (its last layer is zero): give every layer weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in refiner.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return refiner.eval()


def refiner_model(seed: int = 0) -> OmgLlava:
    config = get_config("tiny")
    config.mask_refiner_channels = 8
    model = OmgLlava.from_config(config, seed=0)
    trained_like(model.mask_refiner, seed)
    return model


@pytest.fixture(scope="module")
def refiner_and_graphs(tmp_path_factory):
    refiner = trained_like(MaskRefiner(8), 1)
    paths = export_refiner(refiner, tmp_path_factory.mktemp("refiner"))
    return refiner, OnnxRuntimeRefiner(paths, OrtOptions(device="cpu", intra_op_threads=2))


@pytest.mark.parametrize("height,width", [(2, 2), (13, 40), (61, 59), (256, 256)])
@torch.no_grad()
def test_both_graphs_equal_pytorch_for_any_crop_size(refiner_and_graphs, height, width):
    refiner, graphs = refiner_and_graphs
    gen = torch.Generator().manual_seed(height * 1000 + width)
    pixels = torch.randn(1, 3, height, width, generator=gen)
    up = torch.randn(1, height, width, generator=gen) * 6
    features = refiner.image_features(pixels)
    assert torch.allclose(graphs.image_features(pixels), features, atol=1e-4)
    expected = refiner.correct(up, features)
    assert not torch.allclose(expected, up, atol=1e-2)  # the head does change the logits
    assert torch.allclose(graphs.correct(up, features), expected, atol=1e-4)


@torch.no_grad()
def test_the_refiner_gives_the_same_logits_with_either_compute(refiner_and_graphs):
    refiner, graphs = refiner_and_graphs
    pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    logits = torch.full((2, 32, 32), -10.0)
    logits[0, 3:8, 4:9] = 6.0
    logits[0, 24:30, 20:28] = 4.0  # a second region: a box of its own
    logits[1, 10:20, 10:22] = 3.0
    by_torch = refiner(logits, ImageGuide(refiner, pixels))
    by_graphs = refiner(logits, ImageGuide(graphs, pixels), graphs)
    assert torch.allclose(by_graphs, by_torch, atol=1e-4)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@torch.no_grad()
def test_a_model_on_onnxruntime_refines_there_with_the_same_masks(tmp_path):
    torch_model, ort_model = refiner_model(), refiner_model()
    options = EngineOptions(cache_dir=tmp_path, build_if_missing=True, ort=OrtOptions(device="cpu"))
    ort_model.vision = select_backend("onnxruntime", ort_model, options)
    assert isinstance(ort_model.refiner_compute, OnnxRuntimeRefiner)
    assert torch_model.refiner_compute is torch_model.mask_refiner
    ious = []
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        image = render(sample_scene(rng), size=200, rng=rng).image
        a, b = torch_model.perceive(image), ort_model.perceive(image)
        assert [s.label for s in a] == [s.label for s in b]
        ious += [iou(x.mask, y.mask) for x, y in zip(a, b, strict=True)]
        followed = ort_model.follow(image, b), torch_model.follow(image, a)
        ious += [iou(x.mask, y.mask) for x, y in zip(*followed, strict=True)]
    assert len(ious) >= 4 and min(ious) >= 0.99
    # set_threads reaches the refiner's sessions too
    ort_model.vision.set_threads(1)
    assert all(s.get_session_options().intra_op_num_threads == 1 for s in ort_model.refiner_compute.sessions.values())


def test_graphs_are_named_after_the_weights(tmp_path):
    refiner = trained_like(MaskRefiner(8), 1)
    same, retrained = trained_like(MaskRefiner(8), 1), trained_like(MaskRefiner(8), 2)
    assert refiner_paths(refiner, tmp_path) == refiner_paths(same, tmp_path)
    assert set(refiner_paths(refiner, tmp_path).values()).isdisjoint(refiner_paths(retrained, tmp_path).values())


def test_exported_only_when_building_is_allowed(tmp_path, caplog):
    refiner, cpu = trained_like(MaskRefiner(8), 1), OrtOptions(device="cpu")
    with caplog.at_level(logging.INFO, logger="omg_llava_ros.engines.refiner_graphs"):
        assert onnxruntime_refiner(refiner, tmp_path, cpu, build_if_missing=False) is None
    assert not any(tmp_path.iterdir())
    assert any("runs in PyTorch" in r.getMessage() for r in caplog.records)
    made = onnxruntime_refiner(refiner, tmp_path, cpu, build_if_missing=True)
    assert isinstance(made, OnnxRuntimeRefiner) and all(p.is_file() for p in made.paths.values())
    assert isinstance(onnxruntime_refiner(refiner, tmp_path, cpu, build_if_missing=False), OnnxRuntimeRefiner)


@torch.no_grad()
def test_a_damaged_graph_is_exported_again_or_left_to_pytorch(tmp_path, caplog):
    refiner, cpu = trained_like(MaskRefiner(8), 1), OrtOptions(device="cpu")
    paths = export_refiner(refiner, tmp_path)
    paths["refiner_head"].write_bytes(paths["refiner_head"].read_bytes()[:300])  # truncated
    with caplog.at_level(logging.WARNING, logger="omg_llava_ros.engines.refiner_graphs"):
        assert onnxruntime_refiner(refiner, tmp_path, cpu, build_if_missing=False) is None
    assert any(str(paths["refiner_head"]) in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="omg_llava_ros.engines.refiner_graphs"):
        again = onnxruntime_refiner(refiner, tmp_path, cpu, build_if_missing=True)
    assert isinstance(again, OnnxRuntimeRefiner)
    assert any("exporting them again" in r.getMessage() for r in caplog.records)
    up, features = torch.randn(1, 20, 24) * 5, torch.randn(1, 8, 20, 24)
    assert torch.allclose(again.correct(up, features), refiner.correct(up, features), atol=1e-4)


def test_build_engines_exports_and_checks_the_refiner_graphs(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = refiner_model()
    summary = build_engines(model, "onnxruntime", EngineOptions(cache_dir=tmp_path, ort=OrtOptions(device="cpu")))
    assert {"encoder", "decoder", "refiner_guide", "refiner_head"} <= set(summary.onnx)
    assert set(summary.reports) == set(summary.onnx)
    assert all(not r.problems for r in summary.reports.values())
    # a model asked for on the CPU after build-engines finds them, with nothing exported
    stamps = {p: p.stat().st_mtime_ns for p in summary.onnx.values()}
    vision = backend_mod.onnxruntime_vision(model, EngineOptions(cache_dir=tmp_path, ort=OrtOptions(device="cpu")))
    assert isinstance(vision, OnnxRuntimeVision) and isinstance(vision.refiner, OnnxRuntimeRefiner)
    assert {p: p.stat().st_mtime_ns for p in summary.onnx.values()} == stamps
    # the PyTorch vision backend refines in PyTorch
    model.vision = select_backend("torch", model, EngineOptions(cache_dir=tmp_path))
    assert model.refiner_compute is model.mask_refiner
