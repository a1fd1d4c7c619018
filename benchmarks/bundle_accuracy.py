"""Accuracy and robustness of trained bundles (shipped ones or any bundle directory), on held-out data.

    python benchmarks/bundle_accuracy.py                       # every shipped bundle
    python benchmarks/bundle_accuracy.py runs/peer-keywords/bundle --json out.json

For each bundle the standard test split of its recipe, then the robustness sets the issue asks for:

* keywords: the test split (espeak-ng voices never heard in training), and every clip of the ``flite``
  synthesiser (a different synthesiser, never heard), per flite speaker;
* shapes: the test split at 1024 points, the same clouds at 256/512/2048/4096 points (the adapter resamples),
  and single partial views (Open3D hidden-point removal from a random camera);
* motion: the test split (sprite shapes seen in training) and a test split made only of the held-out sprite
  shapes ``cross`` and ``ring``.

Prints a markdown table; ``--json`` also writes the numbers; ``--update-card`` writes them into each bundle's
model card (``config.json`` → ``card.robustness`` and the ``README.md``), which is how the shipped cards got them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from uniperception import Perceiver, list_bundles
from uniperception.training import AdapterCollate


def accuracy(model: Perceiver, data: Dataset, batch_size: int = 64) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (samples as the datasets return them)."""
    loader = DataLoader(data, batch_size=batch_size, collate_fn=AdapterCollate(model.adapter))
    correct = total = 0
    model.eval()
    with torch.inference_mode():
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / max(total, 1)


class _Mapped(Dataset):
    """``data[i]`` with ``fn`` applied to its input (seeded by the index, so runs are reproducible)."""

    def __init__(self, data: Dataset, fn: Callable[[Any, int], Any]) -> None:
        self.data, self.fn = data, fn

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        x, *rest = self.data[i]
        return (self.fn(x, i), *rest)


def _recipe_data(model: Perceiver) -> dict[str, Any]:
    card = json.loads((model.bundle_dir / "config.json").read_text()).get("card", {})  # type: ignore[attr-defined]
    data = card.get("data")
    return json.loads(data) if isinstance(data, str) else (data or {})


def evaluate_keywords(model: Perceiver, data: dict[str, Any]) -> dict[str, float]:
    from uniperception.datasets import KeywordSpeech

    common = {k: v for k, v in data.get("common", {}).items() if k not in ("split",)}
    test = KeywordSpeech(split="test", **{**common, **data.get("test", {})})
    flite = KeywordSpeech(split="all", synth="flite", seed=common.get("seed", 0), progress=False)
    out = {"test (unseen espeak-ng voices)": accuracy(model, test),
           "flite, all speakers (unseen synthesiser)": accuracy(model, flite)}  # fmt: skip
    for voice in sorted({r["voice"] for r in flite.samples}):
        idx = [i for i, r in enumerate(flite.samples) if r["voice"] == voice]
        out[f"flite {voice}"] = accuracy(model, Subset(flite, idx))
    return out


def evaluate_shapes(model: Perceiver, data: dict[str, Any]) -> dict[str, float]:
    from uniperception.datasets import Shapes
    from uniperception.datasets.shapes import partial_view

    common = dict(data.get("common", {}))
    test_kw = {**common, **data.get("test", {})}
    out = {"test (1024 points)": accuracy(model, Shapes(split="test", **test_kw))}
    for n in (256, 512, 2048, 4096):
        out[f"test at {n} points"] = accuracy(model, Shapes(split="test", **{**test_kw, "num_points": n}))
    dense = Shapes(split="test", **{**test_kw, "num_points": 4096})
    partial = _Mapped(dense, lambda x, i: torch.from_numpy(partial_view(x.numpy(), np.random.default_rng([i, 1]))))
    out["single partial view (hidden points removed)"] = accuracy(model, partial)
    return out


def evaluate_motion(model: Perceiver, data: dict[str, Any]) -> dict[str, float]:
    from uniperception.datasets import MovingSprites

    common = {**data.get("common", {}), "progress": False}
    test_kw = {**common, **data.get("test", {})}
    seen = tuple(test_kw.get("sprite_shapes", ()))
    out = {f"test (sprite shapes seen: {', '.join(seen) or 'all'})": accuracy(model, MovingSprites(split="test", **test_kw))}
    unseen = tuple(s for s in ("circle", "square", "triangle", "diamond", "cross", "ring") if s not in seen)
    if seen and unseen:
        out[f"test, unseen sprite shapes ({', '.join(unseen)})"] = accuracy(
            model, MovingSprites(split="test", **{**test_kw, "sprite_shapes": unseen})
        )
    return out


EVALUATORS = {"keywords": evaluate_keywords, "shapes": evaluate_shapes, "sprites": evaluate_motion}


def evaluate_bundle(path: str) -> dict[str, Any]:
    """Every metric of one bundle (a shipped name or a directory)."""
    model = Perceiver.from_pretrained(path)
    from uniperception.perceiver import BUNDLE_DIR

    d = Path(path) if Path(path).is_dir() else BUNDLE_DIR / path
    model.bundle_dir = d  # type: ignore[attr-defined]
    data = _recipe_data(model)
    name = data.get("dataset")
    if name not in EVALUATORS:
        raise SystemExit(f"{path}: no evaluator for dataset {name!r}")
    t0 = time.perf_counter()
    metrics = EVALUATORS[name](model, data)
    cfg = json.loads((d / "config.json").read_text())
    return {
        "bundle": str(path), "backbone": cfg["backbone"]["name"], "dataset": name, "metrics": metrics,
        "size_mb": round((d / "model.safetensors").stat().st_size / 2**20, 2), "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def update_card(result: dict[str, Any]) -> None:
    """Record ``result`` as the bundle's ``card.robustness`` (config.json) and rewrite its README.md."""
    from uniperception.perceiver import BUNDLE_DIR
    from uniperception.perceiver import update_card as set_card

    d = Path(result["bundle"]) if Path(result["bundle"]).is_dir() else BUNDLE_DIR / result["bundle"]
    set_card(d, robustness={
        "top-1 accuracy": {k: round(v, 4) for k, v in result["metrics"].items()},
        "command": "python benchmarks/bundle_accuracy.py " + result["bundle"],
    })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="*", help="bundle names or directories (default: every shipped bundle)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--update-card", action="store_true", help="write the results into each bundle's model card")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    results = [evaluate_bundle(b) for b in (args.bundles or list_bundles())]
    print("| bundle | backbone | evaluation | top-1 accuracy |\n|---|---|---|---:|")
    for r in results:
        for k, v in r["metrics"].items():
            print(f"| {r['bundle']} | {r['backbone']} | {k} | {100 * v:.1f} % |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.update_card:
        for r in results:
            update_card(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
