"""The re-parameterisation demo: the same network in training form and deploy form, side by side.

Builds a UniRepLKNet, calibrates its BatchNorm statistics on crops of a real photograph (scikit-learn's
bundled ``china.jpg``, or any image you pass) so the merge has real statistics to fold, then
re-parameterises a copy and reports parameters, outputs agreement and speed of both forms.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import create_model
from .errors import InvalidInputError

__all__ = ["DemoResult", "load_demo_image", "run_reparam_demo"]

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def load_demo_image(path: str | Path | None = None) -> Tensor:
    """An RGB image as a float ``1×3×H×W`` tensor in [0, 1]; default: scikit-learn's ``china.jpg``."""
    if path is None:
        from sklearn.datasets import load_sample_image

        arr = load_sample_image("china.jpg")
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
            raise InvalidInputError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1)[None].float() / 255.0


def _crops(img: Tensor, n: int, size: int, gen: torch.Generator) -> Tensor:
    _, _, h, w = img.shape
    out = []
    for _ in range(n):
        s = int(torch.randint(min(h, w) // 3, min(h, w) + 1, (1,), generator=gen))
        y = int(torch.randint(0, h - s + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - s + 1, (1,), generator=gen))
        crop = F.interpolate(img[..., y : y + s, x : x + s], size=(size, size), mode="bilinear", antialias=True)
        out.append(crop)
    return (torch.cat(out) - _MEAN) / _STD


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: list[Tensor]) -> None:
    """Set every BatchNorm's running statistics to the cumulative average over ``batches``."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for b in batches:
        model(b)
    for m, (mom, tr) in zip(bns, saved, strict=True):
        m.momentum = mom
        m.train(tr)


def _median_time(fn, x: Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@dataclass
class DemoResult:
    """Figures of one demo run (times in seconds, medians)."""

    model: str
    image_size: int
    batch: int
    params_train: int
    params_deploy: int
    max_abs_diff: float
    max_logit: float
    time_train: float
    time_deploy: float
    top5: list[tuple[int, float]]

    @property
    def speedup(self) -> float:
        """Training-form time over deploy-form time."""
        return self.time_train / self.time_deploy


@torch.no_grad()
def run_reparam_demo(
    model_name: str = "unireplknet_a",
    image: str | Path | None = None,
    image_size: int = 224,
    batch: int = 8,
    repeats: int = 5,
    seed: int = 0,
) -> DemoResult:
    """Run the demo and return its figures (no printing; the CLI formats them)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    img = load_demo_image(image)
    model = create_model(model_name)
    calibrate_batchnorm(model, [_crops(img, 8, image_size, gen) for _ in range(4)])
    model.eval()
    deploy = copy.deepcopy(model).reparameterize()
    x = _crops(img, batch, image_size, gen)
    ref, out = model(x), deploy(x)
    for m in (model, deploy):  # warm-up
        m(x)
    t_train = _median_time(model, x, repeats)
    t_deploy = _median_time(deploy, x, repeats)
    probs = out[0].softmax(-1)
    top = probs.topk(5)
    return DemoResult(
        model=model_name, image_size=image_size, batch=batch,
        params_train=sum(p.numel() for p in model.parameters()),
        params_deploy=sum(p.numel() for p in deploy.parameters()),
        max_abs_diff=(out - ref).abs().max().item(), max_logit=ref.abs().max().item(),
        time_train=t_train, time_deploy=t_deploy,
        top5=[(int(i), float(p)) for p, i in zip(top.values, top.indices, strict=True)],
    )
