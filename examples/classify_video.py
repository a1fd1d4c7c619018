"""Classify short videos: MP4 files (decoded with PyAV) or T×H×W×3 uint8 frame arrays.

    python examples/classify_video.py [--bundle DIR_OR_NAME] [FILE.mp4 ...]

With no files it renders a moving-sprite clip with the toolkit's dataset generator and writes it as MP4.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from uniperception import Perceiver
from uniperception.datasets import DIRECTIONS, render_sprite_clip, write_mp4

sys.path.insert(0, str(Path(__file__).parent))
from _common import TINY_BACKBONE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--bundle", default="unireplknet-a-motion", help="a bundle directory or shipped name")
    ap.add_argument("--untrained", action="store_true", help="a tiny untrained model instead of the bundle")
    ap.add_argument("--top-k", type=int, default=3)
    args = ap.parse_args()
    model = Perceiver.from_pretrained(args.bundle) if not args.untrained else Perceiver(
        "video", labels=list(DIRECTIONS), backbone_kwargs=TINY_BACKBONE)
    files = args.files
    if not files:
        import numpy as np

        frames, _ = render_sprite_clip("right", rng=np.random.default_rng(0))
        path = Path(tempfile.mkdtemp()) / "sprite.mp4"
        write_mp4(path, frames)
        files = [str(path)]
    for f, preds in zip(files, model.classify_video(files, top_k=args.top_k), strict=True):
        print(f, [(p.label, round(p.score, 3)) for p in preds])


if __name__ == "__main__":
    main()
