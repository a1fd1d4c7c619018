"""Recipes: a whole training run (data, model, schedule) described by a small TOML file.

``uniperception train --recipe shapes`` runs ``uniperception/recipes/shapes.toml``: builds the datasets and
the Perceiver it names, trains with :class:`~uniperception.training.Trainer`, evaluates on the test split and
writes a bundle (``<out>/bundle``) whose model card records the data, the command, the time and the metrics.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from ..errors import InvalidInputError
from .collate import AdapterCollate
from .config import TrainConfig, load_recipe
from .engine import Trainer

__all__ = ["MixedDataset", "RecipeResult", "apply_overrides", "build_dataset", "run_recipe"]


def _datasets() -> dict[str, Any]:
    from .. import datasets as ds

    return {
        "keywords": ds.KeywordSpeech,
        "speech_commands": ds.SpeechCommands,
        "shapes": ds.Shapes,
        "modelnet": ds.ModelNet,
        "sprites": ds.MovingSprites,
        "video_folder": ds.VideoFolder,
        "series_classification": ds.SeriesClassification,
    }


class MixedDataset(ConcatDataset):
    """Several datasets with the same classes, one after the other (a recipe's ``extra`` sources)."""

    def __init__(self, parts: list[Dataset]) -> None:
        classes = [tuple(getattr(p, "classes", ())) for p in parts]
        if any(c != classes[0] for c in classes[1:]):
            raise InvalidInputError(f"mixed datasets must share their classes, got {classes}")
        super().__init__(parts)
        self.classes = classes[0]


def build_dataset(data: dict[str, Any], split: str) -> Dataset:
    """The ``split`` dataset of a recipe's ``[data]`` table (``common`` options + ``[data.<split>]``).

    ``[[data.<split>.extra]]`` tables add more sources to the split, each given as option overrides of the
    split's own (e.g. ``synth = "festival"`` for keyword speech); the result is a :class:`MixedDataset`.
    """
    name = data.get("dataset")
    table = _datasets()
    if name not in table:
        raise InvalidInputError(f"unknown dataset {name!r} in recipe; choose from {sorted(table)}")
    kwargs = {**data.get("common", {}), "split": split, **data.get(split, {})}
    extra = kwargs.pop("extra", [])
    if not isinstance(extra, list) or not all(isinstance(e, dict) for e in extra):
        raise InvalidInputError(f"[data.{split}] extra must be a list of tables, got {extra!r}")
    parts = []
    for options in [kwargs] + [{**kwargs, **e} for e in extra]:
        if "augment" in options:  # e.g. [data.train] augment = "speech": a waveform transform, training only
            from ..datasets.augment import build_transform

            options["transform"] = build_transform(options.pop("augment"))
        parts.append(table[name](**options))
    return parts[0] if len(parts) == 1 else MixedDataset(parts)


def apply_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "model.adapter.size=32"]`` → a modified deep copy (values parsed as TOML/JSON)."""
    out = copy.deepcopy(recipe)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise InvalidInputError(f"override {item!r} must look like section.key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


@dataclass
class RecipeResult:
    """What a recipe run produced."""

    bundle: Path
    history: list[dict[str, Any]]
    test_metrics: dict[str, float]
    seconds: float


def run_recipe(
    recipe: dict[str, Any] | str | Path,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overrides: list[str] | None = None,
    command: str | None = None,
) -> RecipeResult:
    """Train the recipe's model on its data and write a bundle with a model card; see the module docstring."""
    from ..perceiver import Perceiver, update_card

    name = recipe if isinstance(recipe, (str, Path)) else recipe.get("name", "recipe")
    cfg = load_recipe(recipe) if isinstance(recipe, (str, Path)) else recipe
    cfg = apply_overrides(cfg, overrides or [])
    for section in ("data", "model", "train"):
        if section not in cfg:
            raise InvalidInputError(f"recipe {name!r} has no [{section}] table")
    out = Path(out_dir or f"runs/{cfg.get('name', name)}")
    train_cfg = TrainConfig.from_dict({**cfg["train"], "out_dir": str(out)})
    data = cfg["data"]
    train_set, val_set = build_dataset(data, "train"), build_dataset(data, "val")
    labels = list(train_set.classes)
    m = cfg["model"]
    model = Perceiver(
        m["modality"], backbone=m.get("backbone", "unireplknet_a"), labels=labels,
        adapter=m.get("adapter"), head=m.get("head"), backbone_kwargs=m.get("backbone_kwargs"),
    )
    callbacks = []
    if "sparse" in cfg:  # SLaK's dynamic sparsity, e.g. [sparse] preset = "slak_t"
        from .sparse import DynamicSparsity

        sp = dict(cfg["sparse"])
        preset = sp.pop("preset", None)
        callbacks.append(DynamicSparsity.preset(preset, **sp) if preset else DynamicSparsity(**sp))
    t0 = time.perf_counter()
    trainer = Trainer(
        model, train_set, val_set, train_cfg,
        collate_fn=AdapterCollate(model.adapter, train=True), val_collate_fn=AdapterCollate(model.adapter),
        labels=labels, callbacks=callbacks,
    )
    history = trainer.fit(resume=resume)
    seconds = time.perf_counter() - t0
    final = trainer.ema.module if trainer.ema is not None else model
    final.eval()
    test_set = build_dataset(data, "test")
    trained_metrics = trainer.evaluate(test_set, model=final)
    opts = cfg.get("bundle", {})  # [bundle] deploy = true (re-parameterise), dtype = "float16"
    if opts.get("deploy", False):
        final.reparameterize()
    card = {
        "name": cfg.get("name", str(name)),
        "description": cfg.get("description", ""),
        "data": json.dumps(data),
        "command": command or f"uniperception train --recipe {name}",
        "training_time": f"{seconds / 60:.1f} minutes on {_machine()}",
        "metrics": {},
    }
    bundle = final.save_pretrained(out / "bundle", card=card, dtype=opts.get("dtype"))
    # the metrics on the card are those of the file as shipped (deploy form, stored precision), reloaded from disk
    shipped = Perceiver.from_pretrained(bundle)
    test_metrics = trainer.evaluate(test_set, model=shipped)
    update_card(bundle, metrics={
        "test": test_metrics,
        "test_before_export": trained_metrics,
        "final_val": {k: v for k, v in history[-1].items() if k.startswith("val_")},
    })  # fmt: skip
    return RecipeResult(bundle, history, test_metrics, seconds)


def _machine() -> str:
    import os
    import platform

    import torch

    return f"{torch.get_num_threads()} thread(s) on a {os.cpu_count()}-core {platform.machine()} CPU"
