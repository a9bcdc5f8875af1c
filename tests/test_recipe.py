"""Training recipes: the shipped one loads into configs, bad ones are refused, runs chain and resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from omg_llava_ros.training import config, data, recipe, trainer

SHIPPED = Path(recipe.__file__).parent / "recipes" / "embedded.toml"


def test_the_shipped_recipe_builds_every_run_from_scratch_to_the_shipped_model(tmp_path):
    runs = recipe.load_recipe(SHIPPED)
    names = [r["name"] for r in runs]
    assert names[0] == "scratch" and names[-2:] == ["v22", "v23"]
    configs = [recipe.run_config(r, tmp_path) for r in runs]
    first, last = configs[0], configs[-1]
    assert first.init_from is None and first.stages == (0, 1, 2, 3, 4, 5)  # from nothing
    for run, cfg, before in zip(runs[1:], configs[1:], names[:-1], strict=True):
        assert cfg.init_from == str(tmp_path / before / "model")  # each from the run before it
        assert cfg.out_dir == str(tmp_path / run["name"])
    # The shipped model's last steps: the pointer, given relations, fitted alone (stage 6), then its
    # relation choice over the world's five shapes (stage 7).
    pointer = configs[-2]
    assert pointer.point_relations and pointer.stages == (6,)
    assert pointer.stage6_records > 0 and pointer.stage6_steps > 0
    assert last.point_relations and last.stages == (7,) and last.relation_shapes == 5
    assert 0 < last.stage7_held_out < last.stage7_records and last.stage7_steps > 0
    assert all(set(r.stage4_task_weights) <= data_tasks() for r in configs)
    assert isinstance(last.stage4_existence, data.ExistenceNegatives)
    assert isinstance(first.stage0_restarts, tuple) and all(isinstance(r, tuple) for r in first.stage0_restarts)
    # --init-from replaces the start of the first selected run.
    assert recipe.run_config(runs[-1], tmp_path, init_from="embedded").init_from == "embedded"


def data_tasks() -> set[str]:
    """The tasks the training sampler knows beyond toyworld's."""
    return {"referring_position", "referring_spatial", "referring_relation", *data.TASK_WEIGHTS}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[[run]]\nname = "a"\nstage4_stepz = 3\n', "stage4_stepz"),
        ('[[run]]\nname = "a"\n[[run]]\nname = "a"\n', "unique name"),
        ('[[run]]\nname = "a"\ninit_from = "b"\n[[run]]\nname = "b"\n', "not an earlier run"),
        ('[[run]]\nname = "a"\nout_dir = "x"\n', "out_dir"),
        ("name = 3\n", "no \\[\\[run\\]\\]"),
        ("[[run]\n", "not a readable recipe"),
    ],
)
def test_a_bad_recipe_is_refused_with_its_file_and_problem(tmp_path, text, problem):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem) as info:
        recipe.load_recipe(path)
    assert str(path) in str(info.value)


def test_runs_chain_skip_when_done_and_refuse_a_missing_start(tmp_path, monkeypatch):
    path = tmp_path / "r.toml"
    path.write_text('[[run]]\nname = "a"\nstages = [1]\n[[run]]\nname = "b"\ninit_from = "a"\nstages = [4]\n')
    trained: list[config.TrainConfig] = []

    class Saved:
        def save_pretrained(self, folder, dtype=None):
            Path(folder).mkdir(parents=True)
            (Path(folder) / "config.json").write_text("{}")

    def fake_train(cfg):
        trained.append(cfg)
        return Saved()

    monkeypatch.setattr(trainer, "train", fake_train)
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="does not exist yet"):
        recipe.run_recipe(path, out, only=["b"])  # b starts from a, not trained yet
    report = recipe.run_recipe(path, out)
    assert [c.out_dir for c in trained] == [str(out / "a"), str(out / "b")]
    assert trained[1].init_from == str(out / "a" / "model") and report["b"]["minutes"] is not None
    again = recipe.run_recipe(path, out)  # both done: nothing retrains
    assert len(trained) == 2 and again["a"]["minutes"] is None
    with pytest.raises(ValueError, match="no runs named"):
        recipe.run_recipe(path, out, only=["c"])
