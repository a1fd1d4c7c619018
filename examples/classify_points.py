"""Classify point clouds: PLY/PCD/XYZ/OFF/OBJ/NPY files, N×3 arrays or Open3D clouds.

    python examples/classify_points.py [--bundle DIR_OR_NAME] [FILE.ply ...]

With no files it samples a torus with the toolkit's shape generator and saves it as a PLY file.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from uniperception import Perceiver
from uniperception.datasets import SHAPE_CLASSES, sample_shape

sys.path.insert(0, str(Path(__file__).parent))
from _common import TINY_BACKBONE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--bundle", default="unireplknet-a-shapes", help="a bundle directory or shipped name")
    ap.add_argument("--untrained", action="store_true", help="a tiny untrained model instead of the bundle")
    ap.add_argument("--top-k", type=int, default=3)
    args = ap.parse_args()
    model = Perceiver.from_pretrained(args.bundle) if not args.untrained else Perceiver(
        "points", labels=list(SHAPE_CLASSES), backbone_kwargs=TINY_BACKBONE)
    inputs: list = list(args.files)
    if not inputs:
        pts = np.asarray(sample_shape("torus", 1024, rng=0))
        path = Path(tempfile.mkdtemp()) / "torus.xyz"
        np.savetxt(path, pts)
        inputs = [str(path), pts]  # a file and an in-memory array
    for x, preds in zip(inputs, model.classify_points(inputs, top_k=args.top_k), strict=True):
        name = x if isinstance(x, str) else f"array {np.shape(x)}"
        print(name, [(p.label, round(p.score, 3)) for p in preds])


if __name__ == "__main__":
    main()
