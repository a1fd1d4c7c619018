"""Effective receptive field (ERF) of a backbone, the way RepLKNet and SLaK measure it.

Method (RepLKNet ``erf/visualize_erf.py`` + ``analyze_erf.py``; RepLKNet spec §11, SLaK spec §12):

1. The model in eval mode returns its final feature map (``forward_features``: last stage, before the
   final norm and pooling; stride 32).
2. Each image is warped (bicubic, aspect ratio not kept) to ``input_size × input_size`` and normalised with
   the ImageNet mean/std.
3. Per image: ``s = Σ_c ReLU(f[c, h//2, w//2])`` at the centre pixel of the final map; the gradient of ``s``
   w.r.t. the input; ReLU of that gradient (``reduction="abs"`` takes ``|·|`` instead); sum over the RGB
   channels. Maps containing NaN are skipped. The average over the images is the contribution-score matrix
   ``A`` (:attr:`ERFResult.scores`).
4. Analysis: ``m = log10(A + 1)``, ``m /= max(m)``; for t in 20 %, 30 %, 50 %, 99 %: the smallest centred
   square of side ``2i + 1`` (``i ≥ 1``) whose sum of ``m`` exceeds ``t · Σ m``; the *high-contribution area
   ratio* is ``(side / H) · (side / W)`` (RepLKNet divides by the map's own size). Where no square smaller
   than the image reaches ``t`` the ratio is 1 (the official script fails there).

The official runs use 50 ImageNet validation images at 1024 px and trained weights. Without ``images``,
:func:`erf` uses offline inputs: the two photographs shipped with scikit-learn (``china.jpg``,
``flower.jpg``) and, for the rest, smooth random colour fields with a natural-image ``1/f`` spectrum.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InvalidInputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "THRESHOLDS",
    "ERFResult",
    "area_ratios",
    "build_model",
    "erf",
    "generated_images",
    "load_images",
    "save_erf_grid",
]

logger = logging.getLogger(__name__)

#: the thresholds RepLKNet and SLaK report
THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIZE = 32


# --------------------------------------------------------------------------------------------- result
@dataclasses.dataclass
class ERFResult:
    """The contribution-score matrix of one model and its high-contribution area ratios."""

    scores: np.ndarray  # H × W, mean over the images of ReLU(∂ centre / ∂ input) summed over channels
    ratios: dict[float, float]  # threshold → area ratio (side/H · side/W)
    sides: dict[float, int]  # threshold → side of the centred square, in pixels
    input_size: int
    num_images: int
    model_name: str = "model"
    skipped: int = 0  # images whose map contained NaN

    @property
    def log_map(self) -> np.ndarray:
        """``log10(A + 1) / max`` — what the ratios are computed on and what the heat map shows."""
        return _log_map(self.scores)

    def summary(self) -> str:
        """One line: the model and its area ratios."""
        parts = ", ".join(f"{round(t * 100)}%: {self.ratios[t]:.4f} ({self.sides[t]} px)" for t in self.ratios)
        return f"{self.model_name} @ {self.input_size}px, {self.num_images} images — area ratio {parts}"

    def save_npy(self, path: str | os.PathLike[str]) -> Path:
        """Save :attr:`scores` (the official scripts' ``.npy`` matrix)."""
        p = Path(path)
        np.save(p, self.scores)
        return p

    def save_png(self, path: str | os.PathLike[str], title: str | None = None, cmap: str = "RdYlGn") -> Path:
        """Heat map of :attr:`log_map` (RepLKNet's ``RdYlGn`` colour map, colour bar on top) with the ratios."""
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5.2, 5.8))
        _draw(ax, self, title or self.model_name, cmap, fig=fig)
        fig.tight_layout()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        return p


def save_erf_grid(
    results: Sequence[ERFResult],
    path: str | os.PathLike[str],
    titles: Sequence[str] | None = None,
    cmap: str = "RdYlGn",
    suptitle: str | None = None,
) -> Path:
    """Several ERF heat maps side by side in one PNG."""
    if not results:
        raise InvalidInputError("save_erf_grid needs at least one ERFResult")
    plt = _pyplot()
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 4.4), squeeze=False)
    for i, r in enumerate(results):
        _draw(axes[0, i], r, titles[i] if titles else r.model_name, cmap, fig=fig)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency of the docs/plots extra
        raise InvalidInputError("saving ERF heat maps needs matplotlib (pip install matplotlib)") from e
    return plt


def _draw(ax: Any, r: ERFResult, title: str, cmap: str, fig: Any) -> None:
    im = ax.imshow(r.log_map, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ratios = "  ".join(f"{round(t * 100)}%: {v:.3f}" for t, v in r.ratios.items())
    ax.set_xlabel(f"area ratio  {ratios}", fontsize=7)
    bar = fig.colorbar(im, ax=ax, location="top", fraction=0.05, pad=0.02)
    bar.ax.tick_params(labelsize=6)
    bar.ax.set_title(title, fontsize=9)


# --------------------------------------------------------------------------------------------- analysis
def _log_map(scores: np.ndarray) -> np.ndarray:
    m = np.log10(np.asarray(scores, dtype=np.float64) + 1.0)
    peak = m.max() if m.size else 0.0
    return m / peak if peak > 0 else m


def area_ratios(
    scores: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
) -> tuple[dict[float, float], dict[float, int]]:
    """High-contribution area ratios of a contribution-score matrix (``log10(A+1)/max`` first, as RepLKNet).

    Returns ``({t: area ratio}, {t: side in pixels})``: the smallest centred square of odd side ``2i+1``
    (``i ≥ 1``, centred at ``(H//2, W//2)``) holding more than ``t`` of the total; ratio ``side²/(H·W)``.
    """
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 2 or min(a.shape) < 3:
        raise InvalidInputError(f"scores must be a 2-D map of at least 3×3, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise InvalidInputError("scores must be finite and non-negative")
    for t in thresholds:
        if not 0.0 < t < 1.0:
            raise InvalidInputError(f"thresholds must lie in (0, 1), got {t}")
    m = _log_map(a)
    h, w = m.shape
    total = m.sum()
    ratios: dict[float, float] = {}
    sides: dict[float, int] = {}
    if total <= 0:
        logger.warning("the contribution map is all zero: no area ratio can be computed")
        return {float(t): math.nan for t in thresholds}, {float(t): 0 for t in thresholds}
    cum = np.zeros((h + 1, w + 1))
    cum[1:, 1:] = m.cumsum(0).cumsum(1)
    cy, cx = h // 2, w // 2
    fractions = []
    for i in range(1, min(h, w) // 2):  # the official loop: range(1, H // 2)
        y0, y1, x0, x1 = cy - i, cy + i + 1, cx - i, cx + i + 1
        fractions.append((cum[y1, x1] - cum[y0, x1] - cum[y1, x0] + cum[y0, x0]) / total)
    for t in thresholds:
        side, ratio = min(h, w), 1.0
        for i, f in enumerate(fractions, start=1):
            if f > t:
                side = 2 * i + 1
                ratio = side / h * side / w
                break
        ratios[float(t)], sides[float(t)] = ratio, side
    return ratios, sides


# --------------------------------------------------------------------------------------------- inputs
def _normalise(x: Tensor) -> Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _warp(img: Any, size: int) -> Tensor:
    """A PIL image → ``3 × size × size`` float in [0, 1] (bicubic warp, as the official ``Resize((s, s))``)."""
    from PIL import Image

    img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def load_images(directory: str | os.PathLike[str], input_size: int, num_images: int | None = None) -> Tensor:
    """The images of ``directory`` (sorted by name, at most ``num_images``), warped to ``input_size`` and
    ImageNet-normalised: ``N × 3 × input_size × input_size``."""
    from PIL import Image, UnidentifiedImageError

    d = Path(directory)
    if not d.is_dir():
        raise InvalidInputError(f"image directory {d} does not exist (or is not a directory)")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InvalidInputError(
            f"no images in {d} (looked for {', '.join(IMAGE_EXTENSIONS)}); pass a directory of RGB images, "
            "or images=None for the built-in inputs"
        )
    if num_images is not None:
        if num_images > len(files):
            logger.warning("%d images asked for, %s holds %d: using %d", num_images, d, len(files), len(files))
        files = files[:num_images]
    out = []
    for f in files:
        try:
            with Image.open(f) as img:
                out.append(_warp(img, input_size))
        except (UnidentifiedImageError, OSError) as e:
            raise InvalidInputError(f"cannot read image {f}: {e}") from e
    return _normalise(torch.stack(out))


def generated_images(input_size: int, num_images: int, seed: int = 0) -> Tensor:
    """Offline inputs: scikit-learn's two sample photographs (when installed), then smooth random colour
    fields with a ``1/f`` amplitude spectrum (the spectrum of natural images); ImageNet-normalised."""
    from PIL import Image

    imgs: list[Tensor] = []
    try:
        from sklearn.datasets import load_sample_images  # type: ignore[import-untyped]

        for arr in load_sample_images().images[:num_images]:
            imgs.append(_warp(Image.fromarray(arr), input_size))
    except ImportError:
        logger.info("scikit-learn not installed: using generated fields only")
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(input_size)[:, None]
    fx = np.fft.fftfreq(input_size)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / input_size)
    while len(imgs) < num_images:
        chans = []
        base = _field(rng, amp)
        for _ in range(3):
            chans.append(0.75 * base + 0.25 * _field(rng, amp))
        x = np.stack(chans)
        x = (x - x.mean()) / (x.std() + 1e-12) * 0.22 + 0.45
        imgs.append(torch.from_numpy(np.clip(x, 0.0, 1.0).astype(np.float32)))
    return _normalise(torch.stack(imgs[:num_images]))


def _field(rng: np.random.Generator, amp: np.ndarray) -> np.ndarray:
    phase = rng.uniform(0, 2 * np.pi, amp.shape)
    f = np.real(np.fft.ifft2(amp * np.exp(1j * phase)))
    return (f - f.mean()) / (f.std() + 1e-12)


# --------------------------------------------------------------------------------------------- models
def build_model(name: str, weights: str | os.PathLike[str] | None = None) -> nn.Module:
    """A registered uniperception backbone (``create_model``, ``weights`` = an official file/directory) or, for
    other names, a timm model (``weights`` = a state-dict file); classifier removed, eval mode."""
    from ..backbones import create_model, is_model

    if is_model(name):
        model = create_model(name, pretrained=weights) if weights else create_model(name)
    else:
        try:
            import timm
        except ImportError as e:
            raise InvalidInputError(f"{name!r} is not a uniperception model and timm is not installed") from e
        if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
            raise InvalidInputError(
                f"unknown model {name!r}: not a uniperception model (`uniperception models`) nor a timm model"
            )
        model = timm.create_model(name, pretrained=False)
        if weights:
            from ..checkpoints import read_checkpoint, unwrap_state_dict

            sd, _ = unwrap_state_dict(read_checkpoint(weights))
            model.load_state_dict(sd)
    return model.eval()


def _features_fn(model: nn.Module) -> Any:
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "forward_features") and not hasattr(model, "forward_features"):
        return backbone.forward_features  # a Perceiver: the ERF of its backbone
    fn = getattr(model, "forward_features", None)
    if fn is None:
        raise InvalidInputError(
            f"{type(model).__name__} has no forward_features(): the ERF needs the model's final feature map"
        )
    return fn


# --------------------------------------------------------------------------------------------- ERF
def erf(
    model: nn.Module | str,
    images: str | os.PathLike[str] | Tensor | None = None,
    input_size: int = 512,
    num_images: int = 50,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
    reduction: str = "relu",
    thresholds: Sequence[float] = THRESHOLDS,
    seed: int = 0,
    model_name: str | None = None,
) -> ERFResult:
    """The effective receptive field of ``model`` (see the module docstring for the exact method).

    Args:
        model: a module with ``forward_features`` (a :class:`~uniperception.Perceiver` uses its backbone), or a
            model name (a registered backbone or a timm model, random weights; see :func:`build_model`).
        images: a directory of images (warped to ``input_size``, ImageNet-normalised), an already normalised
            ``N × 3 × H × W`` tensor, or ``None`` for the built-in offline inputs (:func:`generated_images`).
        input_size: image side (512 by default; the official runs use 1024; at least 32).
        num_images: how many images to average (official: 50).
        device: where to run (the model is moved there).
        batch_size: images per backward pass (the result does not depend on it in eval mode).
        reduction: ``"relu"`` (official: ReLU of the input gradient) or ``"abs"``.
        thresholds: contribution thresholds of the area ratios.
        seed: seed of the generated inputs.
        model_name: label of the result (default: the class or given name).

    Raises:
        InvalidInputError: an empty or missing image directory, an unreadable image, a too small or malformed
            input, a model without ``forward_features``, or a model that fails on the input.
    """
    if isinstance(model, str):
        model_name = model_name or model
        model = build_model(model)
    model_name = model_name or type(model).__name__
    if reduction not in ("relu", "abs"):
        raise InvalidInputError(f"reduction must be 'relu' or 'abs', got {reduction!r}")
    if not isinstance(num_images, int) or num_images < 1:
        raise InvalidInputError(f"num_images must be a positive integer, got {num_images!r}")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, Tensor):
        x_all = images.detach().float()
        if x_all.ndim != 4:
            raise InvalidInputError(f"an image tensor must be N × C × H × W, got shape {tuple(x_all.shape)}")
        if min(x_all.shape[-2:]) < MIN_SIZE:
            raise InvalidInputError(
                f"images of {tuple(x_all.shape[-2:])} px are too small: the final feature map of a stride-32 "
                f"backbone needs at least {MIN_SIZE}×{MIN_SIZE} (use larger images)"
            )
        x_all = x_all[:num_images]
    else:
        if not isinstance(input_size, int) or input_size < MIN_SIZE:
            raise InvalidInputError(
                f"input_size must be an integer of at least {MIN_SIZE} (stride-32 backbones; the official ERF "
                f"uses 1024), got {input_size!r}"
            )
        x_all = (generated_images(input_size, num_images, seed) if images is None
                 else load_images(images, input_size, num_images))
    features = _features_fn(model)
    in_chans = getattr(getattr(model, "backbone", model), "in_chans", None)
    if in_chans is not None and x_all.shape[1] != in_chans:
        raise InvalidInputError(f"the model takes {in_chans} input channels, the images have {x_all.shape[1]}")
    dev = torch.device(device)
    if any(p.device != dev for p in model.parameters()):
        model.to(dev)
    was_training = model.training
    model.eval()
    total: Tensor | None = None
    used = skipped = 0
    try:
        for start in range(0, x_all.shape[0], batch_size):
            x = x_all[start : start + batch_size].to(dev).requires_grad_(True)
            with torch.enable_grad():
                try:
                    out = features(x)
                except (RuntimeError, ValueError) as e:
                    if isinstance(e, InvalidInputError):
                        raise
                    raise InvalidInputError(
                        f"{model_name} failed on a {tuple(x.shape)} input (too small for the model?): {e}"
                    ) from e
                if not isinstance(out, Tensor) or out.ndim != 4:
                    raise InvalidInputError(
                        f"forward_features of {model_name} must return a B × C × h × w map, got "
                        f"{type(out).__name__}{'' if not isinstance(out, Tensor) else tuple(out.shape)}"
                    )
                h, w = out.shape[-2:]
                centre = torch.relu(out[:, :, h // 2, w // 2].float()).sum()
                (grad,) = torch.autograd.grad(centre, x)
            g = torch.relu(grad) if reduction == "relu" else grad.abs()
            maps = g.sum(1).double()  # per image: sum over channels
            ok = torch.isfinite(maps).flatten(1).all(1)
            skipped += int((~ok).sum())
            if ok.any():
                s = maps[ok].sum(0).cpu()
                total = s if total is None else total + s
                used += int(ok.sum())
    finally:
        model.train(was_training)
    if total is None or used == 0:
        raise InvalidInputError(f"every contribution map of {model_name} contained NaN: no ERF")
    if skipped:
        logger.warning("%s: %d image(s) skipped (NaN in the contribution map)", model_name, skipped)
    scores = (total / used).numpy()
    ratios, sides = area_ratios(scores, thresholds)
    result = ERFResult(scores=scores, ratios=ratios, sides=sides, input_size=int(x_all.shape[-1]),
                       num_images=used, model_name=model_name, skipped=skipped)
    logger.info("%s", result.summary())
    return result
