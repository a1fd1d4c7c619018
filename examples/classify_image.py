"""Classify images with an official ImageNet checkpoint or a bundle.

    python examples/classify_image.py [--weights unireplknet_a_in1k_224_acc77.03.pth] [IMAGE ...]

Official weights cannot be downloaded here, so without ``--weights`` (a local official file) the example
builds an untrained classifier over three labels; with no images it uses scikit-learn's bundled photos.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uniperception import Perceiver

sys.path.insert(0, str(Path(__file__).parent))
from _common import TINY_BACKBONE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="*")
    ap.add_argument("--weights", help="an official UniRepLKNet ImageNet checkpoint file")
    ap.add_argument("--top-k", type=int, default=3)
    args = ap.parse_args()
    if args.weights:
        model = Perceiver.from_pretrained(args.weights)
    else:
        model = Perceiver("image", labels=["temple", "flower", "other"], adapter={"size": 96},
                          backbone_kwargs=TINY_BACKBONE)
    images: list = list(args.images)
    if not images:
        from sklearn.datasets import load_sample_images

        images = list(load_sample_images().images)  # china.jpg and flower.jpg as arrays
    for i, preds in enumerate(model.classify_image(images, top_k=args.top_k)):
        print(f"image {i}:", [(p.label, round(p.score, 3)) for p in preds])
    print("embedding size:", tuple(model.embed(images[0]).shape))


if __name__ == "__main__":
    main()
