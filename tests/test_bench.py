"""The benchmark: `omg-llava-ros bench --json` on the tiny config, the stage probe on the real chat /
follow path, the static-cache generator and device preprocessing of the GPU script, and the GPU
script's CPU path. No speed is asserted here: the figures come from the bench command itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omg_llava_ros import OmgLlava
from omg_llava_ros.bench import gpu_official
from omg_llava_ros.bench.gpu_preprocess import DevicePreprocessor
from omg_llava_ros.bench.probe import STAGES, StageProbe
from omg_llava_ros.bench.runner import BenchOptions, make_workloads, script_answer
from omg_llava_ros.bench.static_decode import StaticCacheGenerator, plain_rope_for_static_cache
from omg_llava_ros.bench.table import load_report, readme_table
from omg_llava_ros.cli import main
from omg_llava_ros.model.chat_template import Turn, first_user_text
from omg_llava_ros.model.config import CLIP_MEAN, CLIP_STD, get_config
from omg_llava_ros.model.language_model import greedy_generate
from omg_llava_ros.model.preprocessing import ImagePreprocessor

FOLLOW_STAGES = ("preprocess", "encoder", "pixel_decoder", "seg_decode", "postprocess")


def last_json(text: str) -> dict:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return json.loads(lines[-1])


def test_bench_json_on_tiny(tmp_path, capsys):
    argv = ["bench", "--config", "tiny", "--threads", "1", "--repeats", "2", "--warmup", "1"]
    assert main([*argv, "--follow-frames", "2", "--cache-dir", str(tmp_path), "--json"]) == 0
    report = last_json(capsys.readouterr().out)

    assert report["model"]["config"] == "tiny" and report["model"]["weights"] == "random"
    assert report["model"]["threads"] == 1 and report["model"]["backend"] == "torch"
    for key in ("cpu", "cores", "torch", "onnxruntime", "date"):
        assert report["machine"][key]
    # Two measured commands, each answered with a (scripted) [SEG] mask and followed for 2 frames.
    assert report["commands"] == 2 and report["commands_with_mask"] == 2
    assert report["follow_frames"] == 4
    assert report["command_to_mask_ms"] > 0 and report["follow_hz"] > 0
    assert report["follow_hz"] == pytest.approx(1000.0 / report["follow_frame_ms"], rel=1e-3)
    # the encoder is part of every followed frame: its bound is above the rate reached
    encoder_ms = report["stages"]["encoder"]["follow_ms"] + report["stages"]["pixel_decoder"]["follow_ms"]
    assert report["follow_encoder_bound_hz"] == pytest.approx(1000.0 / encoder_ms, rel=1e-3)
    assert report["follow_encoder_bound_hz"] > report["follow_hz"]
    assert report["generated_tokens"] > 0 and report["prompt_tokens"] > report["generated_tokens"]

    stages = report["stages"]
    assert list(stages) == list(STAGES)
    for name, row in stages.items():
        assert row["command_ms"] > 0, name
        if name in FOLLOW_STAGES:
            assert row["follow_ms"] > 0, name
        else:  # follow mode runs no perception pass and no LLM
            assert row["follow_ms"] is None, name

    ort = report["onnxruntime"]
    assert ort["torch_ms"] > 0 and ort["onnxruntime_ms"] > 0 and ort["threads"] == 1
    assert report["onnxruntime_speedup"] == pytest.approx(ort["torch_ms"] / ort["onnxruntime_ms"], rel=1e-3)
    assert set(report["goals"]) == {"follow_hz", "command_to_mask_ms", "onnxruntime_speedup"}
    assert all(isinstance(g["met"], bool) for g in report["goals"].values())
    assert any(p.suffix == ".onnx" for p in tmp_path.rglob("*")), "the graphs were exported into --cache-dir"

    # The README table reads the same JSON (here from a file with the whole output, as saved).
    saved = tmp_path / "cpu.txt"
    saved.write_text("bench output …\n" + json.dumps(report) + "\n")
    table = readme_table(load_report(saved))
    assert all(f"| {s.replace('_', ' ')} |" in table for s in STAGES)
    assert f"{report['command_to_mask_ms']:.1f} ms" in table and report["machine"]["date"][:10] in table


def test_bench_compares_backends_in_one_run_under_load(tmp_path, capsys):
    argv = ["bench", "--config", "tiny", "--threads", "1", "--repeats", "1", "--warmup", "0", "--follow-frames", "2"]
    argv += ["--backends", "torch", "auto", "--load", "1", "--no-onnxruntime", "--cache-dir", str(tmp_path), "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    reports = last_json(out)
    assert set(reports) == {"torch", "auto"}
    assert reports["torch"]["model"]["backend"] == "torch"
    assert reports["auto"]["model"]["backend"] == "onnxruntime"  # no GPU here: auto is ONNX Runtime
    for r in reports.values():
        assert r["follow_hz"] > 0 and r["command_to_mask_ms"] > 0 and r["machine"]["busy_processes"] == 1
    assert "follow Hz" in out and "command → mask ms" in out  # the comparison lines


def test_training_bench_times_both_prompt_layouts(capsys):
    argv = ["bench", "--training", "--threads", "1", "--repeats", "1", "--warmup", "0"]
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr().out
    report = last_json(out)
    assert report["config"] == "embedded" and report["threads"] == 1 and report["repeats"] == 1
    assert report["batch"] == 8 and report["prompts_per_image"] == 3  # the recipe's
    assert set(report["stage0_step_s"]) == {"joint", "separate"}
    assert all(v > 0 for v in report["stage0_step_s"].values())
    ratio = report["stage0_step_s"]["separate"] / report["stage0_step_s"]["joint"]
    assert report["joint_speedup"] == pytest.approx(ratio)
    assert "stage-0 training step (embedded" in out
    for other in (["--config", "tiny"], ["--model", "some/model"], ["--device", "cuda"]):
        with pytest.raises(SystemExit, match="embedded config"):
            main(["bench", "--training", *other])


def test_probe_times_the_real_chat_and_follow_and_leaves_the_model_as_it_was():
    model = OmgLlava.from_config("tiny", seed=0)
    work = make_workloads(BenchOptions(follow_frames=1), 1, np.random.default_rng(3))[0]
    force = script_answer(model.tokenizer, work.answer)
    plain = model.chat(work.frames[0], work.command, logits_processor=force)
    model.predictor.reset_image()  # the probed run must do the image work again
    preprocess, vision = model.preprocess, model.vision

    with StageProbe(model) as probe:
        probed = model.chat(work.frames[0], work.command, logits_processor=force)
        chat_stages = probe.stages()
        probe.reset()
        model.follow(work.frames[1], probed.segments)
        follow_stages = probe.stages()

    # Timing changes nothing, and every hook and wrapper is gone afterwards.
    assert probed.text == plain.text == work.answer
    assert np.array_equal(probed.segments[0].mask, plain.segments[0].mask)
    assert model.preprocess is preprocess and model.vision is vision
    assert not {"_perceive_state", "_masks_for_queries", "_embed_conversation"} & set(model.__dict__)
    assert not model.image_encoder._forward_hooks and not model.llm.base_model._forward_pre_hooks

    answer_ids = model.tokenizer.encode(work.answer, add_special_tokens=False)
    assert chat_stages["generated_tokens"] == len(answer_ids)  # one LLM step per answer token
    turns = [Turn(first_user_text(work.command))]
    prompt = model._embed_conversation(model.conversation_ids(turns), turns, model.set_image(work.frames[0]))
    assert chat_stages["prompt_tokens"] == prompt.shape[0]
    assert all(chat_stages[s] > 0 for s in STAGES)
    assert all(follow_stages[s] > 0 for s in FOLLOW_STAGES)
    assert follow_stages["perception"] is None and follow_stages["llm_prefill"] is None


@pytest.mark.parametrize("rope", [None, {"rope_type": "dynamic", "factor": 2.0}], ids=["rope", "dynamic-rope"])
def test_static_cache_generator_gives_the_tokens_and_seg_states_of_greedy_generate(rope):
    config = get_config("tiny")
    config.language_model.rope_scaling = rope
    model = OmgLlava.from_config(config, seed=0)
    seg = model.tokens.seg

    def every_third_seg(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if len(generated) % 3 == 2:
            logits = logits.clone()
            logits[seg] = 1e9
        return logits

    prompt = torch.randn(1, 40, config.language_model.hidden_size, generator=torch.Generator().manual_seed(1))
    reference = greedy_generate(model.llm, prompt, [], seg, 16, every_third_seg)
    note = plain_rope_for_static_cache(model.llm, 128)
    assert (note is not None) == (rope is not None)
    for compile_step in (None, "default"):
        gen = StaticCacheGenerator(model.llm, max_cache_len=128, compile_step=compile_step, compile_backend="eager")
        for _ in range(2):  # the cache is reset between commands
            out = gen(model.llm, prompt, [], seg, 16, every_third_seg)
            assert out.token_ids == reference.token_ids
            assert out.seg_hidden.shape == reference.seg_hidden.shape == (5, config.language_model.hidden_size)
            torch.testing.assert_close(out.seg_hidden, reference.seg_hidden, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="static cache"):
        gen(model.llm, prompt, [], seg, 100)


@pytest.mark.parametrize(("size", "shape"), [(256, (480, 640)), (1024, (480, 640)), (256, (200, 120))])
def test_device_preprocessing_matches_pil_within_one_grey_level(size, shape):
    reference = ImagePreprocessor(size, CLIP_MEAN, CLIP_STD)
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected, box = reference(image)
    pixels, device_box = DevicePreprocessor(reference, "cpu")(image)
    assert device_box == box and pixels.shape == expected.shape
    grey = (pixels - expected).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    assert float(grey.max()) <= 1.0 + 1e-3
    assert float((grey > 0.01).float().mean()) < 1e-3  # PIL's fixed-point rounding, rarely


def test_gpu_script_cpu_path_on_tiny(capsys):
    """Everything but the CUDA parts: both variants, every optimisation (compiled with the 'eager'
    backend, which traces the same graphs without generating kernels), the report."""
    argv = ["--device", "cpu", "--config", "tiny", "--repeats", "1", "--warmup", "0", "--follow-frames", "2"]
    assert gpu_official.main([*argv, "--threads", "1", "--compile", "on", "--compile-backend", "eager", "--json"]) == 0
    report = last_json(capsys.readouterr().out)

    assert set(report["variants"]) == {"eager", "optimised"} and not report["notes"]
    applied = {o["name"]: o["applied"] for o in report["variants"]["optimised"]["optimisations"]}
    assert applied == dict.fromkeys(
        [
            "sdpa_attention",
            "device_preprocessing",
            "bf16_channels_last",
            "compile_encoder",
            "compile_pixel_decoder",
            "compile_decoder",
            "static_kv_cache",
            "compile_decode_step",
        ],
        True,
    )
    for variant in report["variants"].values():
        assert variant["commands_with_mask"] == 1 and variant["follow_frames"] == 2
        assert variant["command_to_mask_ms"] > 0 and variant["follow_hz"] > 0
        assert all(row["command_ms"] > 0 for row in variant["stages"].values())
    assert report["command_to_mask_ms"] == report["variants"]["optimised"]["command_to_mask_ms"]
    eager, optimised = report["variants"]["eager"], report["variants"]["optimised"]
    expected = eager["command_to_mask_ms"] / optimised["command_to_mask_ms"]
    assert report["speedup"]["command_to_mask"] == pytest.approx(expected, rel=1e-2)
    assert set(report["goals"]["optimised"]) == {"command_to_mask_ms", "follow_hz"}
    assert f"{report['follow_hz']:.1f} Hz" in readme_table(report["variants"]["eager"] | _cpu_stub(), report)


def _cpu_stub() -> dict:
    """The CPU-report fields the README table needs beyond a GPU variant's."""
    machine = {"cpu": "x", "cores": 1, "torch": "t", "onnxruntime": "o", "date": "2026-01-01"}
    return {"machine": machine, "model": {"threads": 1, "backend": "torch"}, "onnxruntime_speedup": None}


def test_official_size_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a GPU"):
        main(["bench", "--config", "official-7b", "--device", "cpu"])
