"""Make the figures and the table of ``docs/erf.md`` (PNG files in ``docs/img/``), headless, offline, on CPU.

    python docs/make_erf_figures.py                          # 224 px, 8 images (about 5-10 min on 2 cores)
    python docs/make_erf_figures.py --size 512 --images 50   # closer to the official setting (much slower)
    python docs/make_erf_figures.py --image-dir DIR          # your own images instead of the built-in inputs

Models: timm ``resnet18``, UniRepLKNet-A, RepLKNet-31B and SLaK-T, all with **random weights** (no pretrained
weights are available offline), each measured twice:

* ``init``: as built. Every one of these networks starts with its residual branches (nearly) switched off —
  timm zero-initialises the last BN of each ResNet block, UniRepLKNet and SLaK scale every block by a layer
  scale of 1e-6 — so the ERF at initialisation is that of the skip path (stem and downsampling layers) alone.
* ``open``: the same weights with those gates opened (every layer scale ``gamma`` set to 1, every BN weight
  that is exactly 0 set to 1), so that the kernels of the blocks take part. This shows what the architecture
  can reach with untrained kernels — not what a trained model does.

Inputs: scikit-learn's two sample photographs plus smooth random ``1/f`` colour fields
(:func:`uniperception.analysis.generated_images`), warped to ``--size`` and ImageNet-normalised.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch import nn

from uniperception.analysis import ERFResult, build_model, erf, save_erf_grid

logger = logging.getLogger("make_erf_figures")
IMG = Path(__file__).resolve().parent / "img"
MODELS = (("resnet18", "ResNet-18 (timm)"), ("unireplknet_a", "UniRepLKNet-A"), ("replknet_31b", "RepLKNet-31B"),
          ("slak_t", "SLaK-T"))


@torch.no_grad()
def open_gates(model: nn.Module) -> int:
    """Set every layer scale (1-D parameter named ``gamma``) and every zero BN weight to 1; returns how many."""
    n = 0
    for name, p in model.named_parameters():
        if p.ndim == 1 and name.rsplit(".", 1)[-1] == "gamma":
            p.fill_(1.0)
            n += 1
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and torch.all(m.weight == 0):
            m.weight.fill_(1.0)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--image-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=IMG)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("uniperception").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    rows: dict[str, list[ERFResult]] = {"init": [], "open": []}
    t_all = time.perf_counter()
    for name, title in MODELS:
        for setting in ("init", "open"):
            torch.manual_seed(0)
            model = build_model(name)
            if setting == "open":
                logger.info("%s: %d gates opened", name, open_gates(model))
            t0 = time.perf_counter()
            r = erf(model, args.image_dir, input_size=args.size, num_images=args.images, model_name=title)
            logger.info("%-5s %s  (%.0f s)", setting, r.summary(), time.perf_counter() - t0)
            rows[setting].append(r)
    args.out.mkdir(parents=True, exist_ok=True)
    inputs = f"{args.size} px, {rows['init'][0].num_images} images, random weights"
    save_erf_grid(rows["init"], args.out / "erf_init.png",
                  suptitle=f"ERF at initialisation ({inputs})")
    save_erf_grid(rows["open"], args.out / "erf_open.png",
                  suptitle=f"ERF with the residual gates opened ({inputs})")
    table = ["| model | weights | 20 % | 30 % | 50 % | 99 % |", "|---|---|---|---|---|---|"]
    for setting, label in (("init", "as initialised"), ("open", "gates opened")):
        for r in rows[setting]:
            cells = " | ".join(f"{r.ratios[t]:.4f} ({r.sides[t]} px)" for t in r.ratios)
            table.append(f"| {r.model_name} | {label} | {cells} |")
    sys.stdout.write("\n".join(table) + "\n")
    data = {s: [{"model": r.model_name, "ratios": r.ratios, "sides": r.sides} for r in rs] for s, rs in rows.items()}
    sys.stdout.write(json.dumps(data) + "\n")
    logger.info("total %.0f s; figures in %s", time.perf_counter() - t_all, args.out)


if __name__ == "__main__":
    main()
