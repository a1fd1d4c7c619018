"""Shipped recipes parse and build; a shrunken recipe trains end to end into a loadable bundle; the CLI runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from uniperception import Perceiver
from uniperception.cli import app
from uniperception.errors import InvalidInputError
from uniperception.training import TrainConfig, apply_overrides, load_recipe, run_recipe

RECIPES = sorted(p.stem for p in (Path(__file__).parents[1] / "uniperception" / "recipes").glob("*.toml"))
SHRINK = [
    "data.train.num_per_class=3", "data.val.num_per_class=2", "data.test.num_per_class=2", "data.common.num_points=256",
    "model.adapter.num_points=256", "model.adapter.image_size=32", "model.adapter.views=2",
    'model.backbone_kwargs={"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64], "kernel_sizes": [[3], [7], [3], [3]]}',
    "train.epochs=1", "train.batch_size=8", "train.progress=false",
]


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_are_complete(name):
    r = load_recipe(name)
    assert {"data", "model", "train"} <= set(r) and r["name"].startswith("unireplknet-a-")
    TrainConfig.from_dict({**r["train"], "out_dir": "x"})  # no unknown training options


def test_overrides():
    r = apply_overrides({"train": {"epochs": 5}}, ["train.epochs=2", "model.adapter.size=32", "a.b=hello"])
    assert r == {"train": {"epochs": 2}, "model": {"adapter": {"size": 32}}, "a": {"b": "hello"}}
    with pytest.raises(InvalidInputError):
        apply_overrides({}, ["no-equals-sign"])


def test_extra_sources_are_mixed_into_a_split(monkeypatch):
    """``[[data.train.extra]]``: more sources for one split, each its own options over the split's."""
    import uniperception.training.recipes as recipes
    from uniperception.datasets.augment import SpeechAugment
    from uniperception.training import MixedDataset, build_dataset

    class Fake:
        def __init__(self, n=2, classes=("a", "b"), transform=None, **kw):
            self.kw, self.n, self.classes, self.transform = kw, n, classes, transform

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return (self.kw["synth"], i)

    monkeypatch.setattr(recipes, "_datasets", lambda: {"fake": Fake})
    data = {"dataset": "fake", "common": {"seed": 1}, "train": {"synth": "espeak", "augment": "speech",
            "extra": [{"synth": "festival", "n": 3}]}}  # fmt: skip
    ds = build_dataset(data, "train")
    assert isinstance(ds, MixedDataset) and len(ds) == 5 and ds.classes == ("a", "b")
    assert [ds[i] for i in (0, 2, 4)] == [("espeak", 0), ("festival", 0), ("festival", 2)]
    assert all(isinstance(p.transform, SpeechAugment) and p.kw["seed"] == 1 for p in ds.datasets)
    assert isinstance(build_dataset(data, "val"), Fake)  # only the split that names them
    with pytest.raises(InvalidInputError, match="share their classes"):
        build_dataset({**data, "train": {"synth": "x", "extra": [{"classes": ("c",)}]}}, "train")
    with pytest.raises(InvalidInputError, match="list of tables"):
        build_dataset({**data, "train": {"extra": {"synth": "festival"}}}, "train")


def test_shrunken_shapes_recipe_trains_into_a_bundle(tmp_path):
    res = run_recipe("shapes", tmp_path / "run", overrides=SHRINK)
    assert "acc1" in res.test_metrics and (tmp_path / "run" / "metrics.jsonl").is_file()
    p = Perceiver.from_pretrained(res.bundle)
    assert p.modality == "points" and len(p.labels) == 10
    card = (res.bundle / "README.md").read_text()
    assert "uniperception train --recipe shapes" in card and "Metrics" in card


def test_cli_train_and_evaluate(tmp_path):
    runner = CliRunner()
    args = ["train", "--recipe", "shapes", "--out", str(tmp_path / "cli")]
    for s in SHRINK:
        args += ["--set", s]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    ev = ["evaluate", str(tmp_path / "cli" / "bundle"), "--recipe", "shapes"]
    for s in SHRINK[:4]:
        ev += ["--set", s]
    res = runner.invoke(app, ev)
    assert res.exit_code == 0 and "acc1" in res.output, res.output
    res = runner.invoke(app, ["train", "--recipe", "no-such-recipe"])
    assert res.exit_code == 2 and "no recipe" in res.output
